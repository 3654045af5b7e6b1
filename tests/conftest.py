"""Shared test helpers: random layer parameters and the tolerance rule.

Tolerance rule (STYLE.md, after flash-attention): a backend's error against a float64 reference
must be at most a small multiple of the error plain PyTorch (the eager reference) makes in the
same dtype, plus a tiny absolute floor for outputs that are exactly representable.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from cmpe_se_fused.reference import KERNEL_SIZE, PAIR_MODES, relation_dim

TOL_MULTIPLE = 4.0


def has_cuda() -> bool:
    return torch.cuda.is_available()


def _first_import_of_triton_for_the_interpreter() -> bool:
    """Without a GPU, import triton here, before any test module, with ``TRITON_INTERPRET=1``.

    Triton makes its own language functions interpreted only if the variable is set at its first
    import, and ``tests/test_triton.py`` can run its cases in this process only then. Left to
    collection order, the first import came from a module that imports torchvision (which imports
    torch._dynamo, which imports triton), so with torchvision installed (CI) every Triton case was
    reported as skipped and all of them ran in one serial subprocess instead. The variable is unset
    again at once: kernels decorated later are compiled ones unless their module sets it (as
    test_triton.py does). True when this import was the first."""
    if has_cuda() or TRITON_IMPORTED_BEFORE_CONFTEST or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
    return True


TRITON_IMPORTED_BEFORE_CONFTEST = "triton" in sys.modules  # e.g. by a plugin (``-p``)
TRITON_INTERPRETER_FIRST = _first_import_of_triton_for_the_interpreter()


# The longest tests of a CPU run (seconds in CI, docs/TESTING.md), longest first. Collection puts
# them at the front (a stable sort: the rest keep their order) so that pytest-xdist starts them first
# and the two workers finish together instead of one running a 90 s test alone at the end.
# Scheduling only: every test still runs; a name missing here just runs in collection order.
LONG_FIRST = (
    "test_triton.py::test_interpreter_subprocess",
    "test_bench.py::test_environment_variant_runs_in_a_child_process",
    "test_finetune_example.py::test_torchrun_from_a_plain_torchvision_checkpoint",
    "test_train_example.py::test_torchrun_two_processes_sync_se_bn",
    "test_ops.py::test_compile_resnet_block_inductor",
    "test_bench.py::test_tiny_run_compile",
    "test_first_contact.py::test_compile_first_call_fresh_process",
    "test_cuda.py::test_emulated_kernels_match_reference",
    "test_cuda.py::test_emulated_eps_and_momentum",
    "test_gpu_evidence.py::test_gpu_check_packs_results_into_an_archive",
    "test_distributed.py::test_two_processes_gloo",
    "test_train_example.py::test_smoke_run_resume_checkpoint_and_plots",
    "test_cli_errors.py::test_bench_without_matplotlib_does_not_claim_a_plot",
    "test_cpu_kernels.py::test_baseline_isa_build",
    "test_triton.py::test_compiles_for_sm90",
    "test_cuda.py::test_cuda_kernels_registered",
    "test_cuda.py::test_kernels_compile_for_sm80",
    "test_gpu_evidence.py::test_streaming_phases_are_coalesced",
    "test_gpu_evidence.py::test_triton_bytes_documented_budget_fast",
    "test_kernel_edge_cases.py::test_triton_nonfinite_batch_variance_reaches_running_var",
    "test_distribution.py::test_auto_warns_once_when_an_extension_is_missing",
    "test_gpu_evidence.py::test_triton_counter_sees_a_reread",
)


def _long_rank(item) -> int:
    nodeid = item.nodeid.split("/")[-1]
    for rank, name in enumerate(LONG_FIRST):
        if nodeid == name or nodeid.startswith(name + "["):
            return rank
    return len(LONG_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_long_rank)
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def make_params(mode, channels, *, reduction=4, pair_filters=3, fold_width=8, padding=0, dtype=torch.float64,
                device="cpu", seed=0):
    """Random weights for the functional API (weights in ``dtype``), running stats included."""
    g = torch.Generator().manual_seed(seed)
    r = max(1, channels // reduction)
    dz = relation_dim(mode, channels, fold_width, padding)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)  # noqa: E731
    p = {"fc1_weight": rnd(r, dz) / dz ** 0.5,
         "fc2_weight": rnd(channels, 2 * r if mode == "double_fc" else r) / r ** 0.5}
    if mode == "double_fc":
        p["fc1_identity_weight"] = rnd(r, channels) / channels ** 0.5
    if mode in PAIR_MODES:
        e = pair_filters
        p["pair_weight"] = rnd(e, 1, *KERNEL_SIZE[mode])
        p["bn_weight"] = (1 + 0.3 * rnd(e))
        p["bn_bias"] = 0.3 * rnd(e)
        p["running_mean"] = 0.1 * rnd(e)
        p["running_var"] = (1 + 0.2 * rnd(e).abs())
    return p


def assert_close_rule(out, ref64, eager, name="output", multiple=TOL_MULTIPLE, atol_floor=1e-6):
    """``|out - ref64|`` within ``multiple * |eager - ref64| + floor`` (max norm, per tensor)."""
    out64, eager64 = out.double(), eager.double()
    assert torch.equal(torch.isnan(out64), torch.isnan(ref64)), f"{name}: NaN pattern differs"
    finite = torch.isfinite(ref64)
    err = (out64 - ref64)[finite].abs().max().item() if finite.any() else 0.0
    base = (eager64 - ref64)[finite].abs().max().item() if finite.any() else 0.0
    scale = ref64[finite].abs().max().item() if finite.any() else 1.0
    bound = multiple * base + atol_floor * max(scale, 1.0)
    assert err <= bound, f"{name}: max error {err:.3e} > {multiple} x eager error {base:.3e} + floor"


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests choose backends explicitly; a CMPE_SE_BACKEND in the environment must not leak in."""
    if "CMPE_SE_BACKEND" in os.environ:
        monkeypatch.delenv("CMPE_SE_BACKEND")


@pytest.fixture
def one_thread():
    """One intra-op thread: these tests check behaviour, not speed, and OpenMP barriers stall on a
    busy 2-core CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
