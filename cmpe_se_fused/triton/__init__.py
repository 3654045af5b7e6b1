"""The Triton backend (ops ``cmpe_se::triton_forward`` / ``cmpe_se::triton_backward``).

* :mod:`cmpe_se_fused.triton.streaming` -- the streaming kernels over the full-size tensors (squeeze,
  rescale plus residual add, their backward) and the Python launch path that plans them;
* :mod:`cmpe_se_fused.triton.small` -- the small-network kernels (fold, pair-view conv with filter
  averaging, BatchNorm, the FC excitation) that the streaming kernels' launches call.

Nothing here is imported by ``import cmpe_se_fused``: :mod:`cmpe_se_fused.ops` imports
``streaming`` at the first Triton call, so the package imports without Triton.
"""
