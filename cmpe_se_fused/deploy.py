"""Deployment: ONNX export, and the compiled libraries for processes that never import this package.

See docs/DEPLOY.md for the paths (ONNX, ``torch.export`` + AOTInductor in Python or C++, plain PyTorch).

**ONNX.** ``torch.onnx.export(model, args, dynamo=True)`` runs ``torch.export`` on the model and translates
the graph op by op. The fused ops cannot be translated there: they update the BatchNorm running statistics
in place (``Tensor(a!)`` in their schema), so ``torch.export`` wraps each call in the
``auto_functionalized`` higher-order op, which the exporter neither translates nor decomposes (a
translation or a decomposition registered for ``cmpe_se::forward`` is never looked up). So the layer swaps
at export time instead: while an ONNX export traces the model, :func:`export_backend` sends every CMPE-SE
call to the ``reference`` backend (plain PyTorch, the spec), which the exporter turns into standard ONNX
ops (ReduceMean, Conv, MatMul/Gemm, Sigmoid, Mul, Add). Eager calls, ``torch.compile`` and
``torch.export.export`` keep the fused ops. Nothing here imports ``torch.onnx`` (it costs ~0.3 s): the
exporter imports it, and :func:`export_backend` only looks for it in ``sys.modules``.

**Libraries.** ``_C`` and ``_C_cuda`` are plain shared libraries (``_loader``): ``library_paths()`` gives the
files to load with ``torch.ops.load_library`` (Python) or ``dlopen`` (C++) before loading an exported or
AOTInductor-compiled model that holds the fused ops. ``python -m cmpe_se_fused.deploy`` prints them.
"""
from __future__ import annotations

import argparse
import sys

from . import _loader

DEPLOY_DOC = "docs/DEPLOY.md"
TRAINING_ONNX = ("cmpe_se: ONNX export of a CMPE-SE layer in training mode is not supported (its pair-view "
                 "BatchNorm would normalise with batch statistics and the running-statistics update cannot be "
                 "expressed); call model.eval() before torch.onnx.export. For a training graph use "
                 f"torch.export.export, which keeps the fused op ({DEPLOY_DOC}).")
LEGACY_ONNX = ("cmpe_se: the TorchScript-based ONNX exporter (torch.onnx.export(..., dynamo=False)) cannot export "
               "CMPE-SE layers. Use torch.onnx.export(model, args, f, dynamo=True) (the default since torch 2.9), "
               f"which writes the layer in standard ONNX ops ({DEPLOY_DOC}).")


def library_paths() -> list[str]:
    """The compiled libraries of this installation, in the order to load them (``_C`` first: it defines
    the op schemas; then ``_C_cuda`` if it was built). Empty for a pure-Python install."""
    return [p for p in (_loader.find(name) for name in _loader.LIBRARIES) if p is not None]


def library_path(name: str = "_C") -> str:
    """The path of one compiled library: ``_C`` (schemas and CPU kernels) or ``_C_cuda`` (CUDA kernels).
    Raises ``FileNotFoundError`` (saying why, from the build record) when it was not built."""
    path = _loader.find(name)
    if path is None:
        from . import ops
        why = ops.EXTENSION_STATUS.get(name) or "not built"
        raise FileNotFoundError(f"cmpe_se_fused.{name}: {why}")
    return path


def _onnx_export_kind() -> str | None:
    """``"dynamo"`` or ``"legacy"`` while ``torch.onnx.export`` traces a model, else None."""
    onnx = sys.modules.get("torch.onnx")  # imported by whoever exports; never imported here
    if onnx is None:
        return None
    # The dynamo exporter's own flag (torch >= 2.8): read directly because torch.compile folds
    # torch.onnx.is_in_onnx_export() to False, and the exporter's second capture strategy is strict
    # (dynamo) torch.export
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    if getattr(flags, "_is_onnx_exporting", False):
        return "dynamo"
    return "legacy" if onnx.is_in_onnx_export() else None


def export_backend(backend: str, training: bool) -> str:
    """The backend a CMPE-SE call uses: ``backend`` itself, except during an ONNX export, where it is
    ``"reference"`` (eval mode) or an error naming what works (training mode, the legacy exporter)."""
    kind = _onnx_export_kind()
    if kind is None:
        return backend
    if kind == "legacy":
        raise RuntimeError(LEGACY_ONNX)
    if training:
        raise RuntimeError(TRAINING_ONNX)
    return "reference"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cmpe_se_fused.deploy",
        description="Print the compiled libraries to load in a process that does not import cmpe_se_fused, one path "
                    f"a line, in load order ({DEPLOY_DOC}).")
    parser.parse_args(argv)
    paths = library_paths()
    if not paths:
        print("cmpe_se_fused: no compiled library is built in this installation (a pure-Python install runs and "
              "exports the reference backend, which needs none)", file=sys.stderr)
        return 1
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
