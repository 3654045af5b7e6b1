"""Backends, what each supports, and the choice (with its reasons).

Each backend is a small object with a name and ``not_supported_reasons(u)``. ``auto`` picks the
first usable backend for the input's device (CUDA: cuda, triton, reference; CPU: cpu, reference)
and logs the choice once. An explicitly requested backend that cannot run raises with its
reasons; it never falls back silently.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings

import torch

from . import ops

logger = logging.getLogger("cmpe_se_fused")

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


# looked up once: importlib.util.find_spec is not traceable by torch.compile (dispatch runs inside
# compiled regions)
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class Backend:
    name = ""
    devices: tuple[str, ...] = ()
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

    def static_reasons(self) -> list[str]:
        """Reasons this backend cannot run on this machine at all."""
        return []

    def not_supported_reasons(self, u: torch.Tensor | None = None) -> list[str]:
        reasons = list(self.static_reasons())
        if u is not None:
            if u.device.type not in self.devices:
                reasons.append(f"input is on {u.device.type}; {self.name} runs on {'/'.join(self.devices)} tensors")
            if u.dtype not in self.dtypes:
                reasons.append(f"dtype {u.dtype} is not supported (supported: {self.dtypes})")
        return reasons

    @property
    def ops(self):
        return ops.OPS[self.name]


class ReferenceBackend(Backend):
    name, devices = "reference", ("cpu", "cuda", "meta")


class CpuBackend(Backend):
    name, devices = "cpu", ("cpu",)

    def static_reasons(self):
        if not ops.HAS_C:
            return [f"the compiled extension cmpe_se_fused._C is not available ({ops.EXTENSION_STATUS['_C']})"]
        return []


class CudaBackend(Backend):
    name, devices = "cuda", ("cuda",)

    def static_reasons(self):
        if not ops.HAS_C_CUDA:
            return [f"the CUDA extension cmpe_se_fused._C_cuda is not available "
                    f"({ops.EXTENSION_STATUS.get('_C_cuda', 'not built')})"]
        if not torch.cuda.is_available():
            return ["torch.cuda.is_available() is False (no GPU or no CUDA driver)"]
        # get_device_properties (not get_device_capability): torch.compile constant-folds it
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        why = ops.cuda_arch_reason((props.major, props.minor))
        return [why] if why else []


class TritonBackend(Backend):
    name = "triton"

    @property
    def devices(self):
        # Triton's interpreter runs the kernels on CPU tensors (tests only; slow)
        return ("cuda", "cpu") if _interpreting() else ("cuda",)

    def static_reasons(self):
        if not _HAS_TRITON:
            return ["triton is not installed"]
        if not _interpreting() and not torch.cuda.is_available():
            return ["no GPU (torch.cuda.is_available() is False) and TRITON_INTERPRET is not set"]
        return []

    def not_supported_reasons(self, u=None):
        reasons = super().not_supported_reasons(u)
        if u is not None and u.device.type == "cpu" and u.dtype == torch.bfloat16:
            reasons.append("bfloat16 does not run under Triton's CPU interpreter")
        return reasons


BACKENDS: dict[str, Backend] = {b.name: b for b in (ReferenceBackend(), CpuBackend(), TritonBackend(), CudaBackend())}
_logged: set = set()


def _report_choice(device_type: str, dtype: str, name: str, why: str) -> bool:
    """Log the auto choice once per (device, dtype, backend).

    Marked ``assume_constant_result``: inside a ``torch.compile``'d region dynamo runs it as plain
    Python at trace time and keeps its constant result, so the log line (dynamo cannot trace
    ``logging``) neither breaks the graph nor fails ``fullgraph=True``; eagerly it is a plain call.
    """
    key = (device_type, dtype, name)
    if key not in _logged:
        _logged.add(key)
        logger.info("cmpe_se: backend=auto chose %r for %s %s inputs%s", name, device_type, dtype, why)
    if name == "reference":
        _warn_missing_extension(device_type)
    return True


# What ``torch.compiler.assume_constant_result`` does, without its ``import torch._dynamo`` (1.8 s
# of CPU, most of ``import cmpe_se_fused``): dynamo reads this attribute when it traces the call.
# tests/test_first_contact.py::test_import_does_not_load_dynamo checks that the public function
# still sets exactly this (and the fullgraph compile tests that dynamo still honours it).
_report_choice._dynamo_marked_constant = True


#: (backend, CMPE_SE_BACKEND, device, dtype, TRITON_INTERPRET) -> (chosen name, auto's log suffix,
#: the machine state it was chosen in); cleared by clear_choice_cache(), which also bumps the
#: generation the layers' call plans check
_choices: dict = {}
_generation = [0]


def _machine_state() -> tuple:
    """What the backends' reasons read besides the input and the environment: the extensions, the
    build record, triton, and the torch.cuda functions asked for the GPU (objects, compared by
    identity: fixed within a process, replaced when a test fakes a GPU or a missing extension)."""
    cuda = torch.cuda
    return (ops.HAS_C, ops.HAS_C_CUDA, ops.BUILD_INFO, _HAS_TRITON, cuda.is_available, cuda.current_device,
            cuda.get_device_properties)


def choice_generation() -> int:
    return _generation[0]


def clear_choice_cache() -> None:
    """Forget the cached backend choices (and, through the generation, every layer's call plan)."""
    _choices.clear()
    _generation[0] += 1


def choose(backend: str, u: torch.Tensor) -> Backend:
    """The backend that runs ``u``: ``backend`` itself if it can, else a clear error; for
    ``auto`` (or ``CMPE_SE_BACKEND``) the first usable one in :data:`AUTO_ORDER`.

    Eagerly a successful choice is cached per (backend, ``CMPE_SE_BACKEND``, device, dtype,
    ``TRITON_INTERPRET``) and reused while the machine state it was made in (:func:`_machine_state`)
    is the same; :func:`clear_choice_cache` forgets them. Errors are not cached."""
    if torch.compiler.is_compiling():
        name, why = _choose(backend, u)
    else:
        key = (backend, os.environ.get("CMPE_SE_BACKEND"), u.device, u.dtype, _interpreting())
        state = _machine_state()
        hit = _choices.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[2], state)):
            hit = _choices[key] = (*_choose(backend, u), state)
        name, why, _ = hit
    if why is not None:  # auto: log once per (device, dtype, backend), warn for a missing extension
        _report_choice(u.device.type, str(u.dtype), name, why)
    return BACKENDS[name]


def _choose(backend: str, u: torch.Tensor) -> tuple[str, str | None]:
    """``choose`` without the cache: ``(name, auto's log suffix)``; the suffix is None for a named backend."""
    origin = ""
    if backend == "auto":
        backend = os.environ.get("CMPE_SE_BACKEND", "auto").strip() or "auto"
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"CMPE_SE_BACKEND={backend!r} is not a backend; expected one of "
                             f"{('auto',) + BACKEND_NAMES}")
        origin = f" (set by the environment variable CMPE_SE_BACKEND={backend}; unset it for backend=auto)"
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
        reasons = BACKENDS[backend].not_supported_reasons(u)
        if reasons:
            raise RuntimeError(f"cmpe_se backend {backend!r}{origin} cannot run this input: " + "; ".join(reasons))
        return backend, None
    order = AUTO_ORDER.get(u.device.type, ("reference",))
    skipped = []
    for name in order:
        reasons = BACKENDS[name].not_supported_reasons(u)
        if not reasons:
            return name, "".join(f"; {s}" for s in skipped)
        skipped.append(f"{name} skipped: {', '.join(reasons)}")
    raise RuntimeError("no cmpe_se backend can run this input: " + "; ".join(skipped))


_warned_missing: set = set()


def _warn_missing_extension(device_type: str) -> None:
    """Once per device type: ``auto`` runs the eager reference because the compiled extension for
    that device is missing (same results, slower). Not while torch.compile traces (fullgraph)."""
    ext = {"cpu": "_C", "cuda": "_C_cuda"}.get(device_type)
    loaded = ops.HAS_C if ext == "_C" else ops.HAS_C_CUDA
    if ext is None or loaded or device_type in _warned_missing or torch.compiler.is_compiling():
        return
    _warned_missing.add(device_type)
    warnings.warn(f"cmpe_se: backend='auto' runs the eager reference for {device_type} tensors because the "
                  f"compiled extension cmpe_se_fused.{ext} is missing ({ops.EXTENSION_STATUS.get(ext)}); results "
                  f"are the same, only slower. `python -m cmpe_se_fused.info` reports the build.", stacklevel=4)


def availability() -> dict[str, list[str]]:
    """Backend name -> reasons it is unusable on this machine (empty list: usable)."""
    return {name: be.static_reasons() for name, be in BACKENDS.items()}
