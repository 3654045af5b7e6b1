"""Custom ops: schemas, fake kernels, autograd. Written once for every compiled backend.

Op pairs (see ``docs/ARCHITECTURE.md`` for the contract):

* ``cmpe_se::forward`` / ``cmpe_se::backward``: schemas defined in C++ (``csrc/ops.cpp``); CPU
  kernels in ``_C``, CUDA kernels in ``_C_cuda``.
* ``cmpe_se::triton_forward`` / ``cmpe_se::triton_backward``: same schemas, defined here, Triton
  kernels from :mod:`cmpe_se_fused.triton.streaming`.
* ``cmpe_se::infer``: ``cmpe_se::forward(..., training=False)``'s ``y`` alone (``INFER_SCHEMA``; C++,
  CPU and CUDA): nothing mutated, nothing saved, one output, so an inference call binds fewer
  arguments and allocates and wraps six tensors less. The layer's call plans use it when no
  gradient can be needed (``torch.is_grad_enabled()`` is false); its Autograd kernel raises when
  an input requires grad.

``torch.library.register_autograd`` refuses ops that mutate an input (the running statistics),
so each forward op gets an ``Autograd``-key kernel that redispatches below autograd (what
``register_autograd`` does internally): ``cmpe_se::forward`` in C++ (``csrc/autograd.cpp``, no
Python per call), ``cmpe_se::triton_forward`` here (an ``autograd.Function``). The backward op is
once-differentiable.
"""
from __future__ import annotations

import re

import torch

from . import _loader
from .reference import acc_dtype

FORWARD_SCHEMA = (
    "(Tensor u, Tensor x, Tensor fc1_weight, Tensor? fc1_identity_weight, Tensor fc2_weight, "
    "Tensor? pair_weight, Tensor? bn_weight, Tensor? bn_bias, Tensor(a!) running_mean, Tensor(b!) running_var, "
    "str se_mode, bool training, float momentum, float eps, int fold_width, int padding) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_y, Tensor u, Tensor pool_u, Tensor pool_x, Tensor gate, Tensor hidden, "
    "Tensor bn_mean, Tensor bn_invstd, Tensor fc1_weight, Tensor? fc1_identity_weight, Tensor fc2_weight, "
    "Tensor? pair_weight, Tensor? bn_weight, Tensor? bn_bias, str se_mode, bool training, int fold_width, "
    "int padding) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)

INFER_SCHEMA = (
    "(Tensor u, Tensor x, Tensor fc1_weight, Tensor? fc1_identity_weight, Tensor fc2_weight, "
    "Tensor? pair_weight, Tensor? bn_weight, Tensor? bn_bias, Tensor? running_mean, Tensor? running_var, "
    "str se_mode, float eps, int fold_width, int padding) -> Tensor"
)

#: what setup.py built, skipped and why, and the CUDA architectures (``_build_info.py`` is
#: generated at build time); None for a tree that was never built by setup.py
try:
    from ._build_info import BUILD_INFO
except ImportError:
    BUILD_INFO = None

#: why an extension is missing, by module name; empty string when loaded
EXTENSION_STATUS: dict[str, str] = {}

REBUILD_HINT = "pip install --no-build-isolation --no-deps --force-reinstall . (from the source tree)"


def _try_import(name: str) -> bool:
    """Load the compiled library ``name`` (a plain shared library: see ``_loader``) and record why not."""
    try:
        _loader.load(name)
        EXTENSION_STATUS[name] = ""
        return True
    except Exception as exc:  # noqa: BLE001 - NotBuiltError, OSError (missing libcudart), ...
        skipped = (BUILD_INFO or {}).get("skipped", {})
        if name in skipped:
            EXTENSION_STATUS[name] = f"not built: {skipped[name]}"
        elif isinstance(exc, _loader.NotBuiltError):
            EXTENSION_STATUS[name] = ("not built" + ("" if BUILD_INFO else " (no build record: install with " +
                                                     REBUILD_HINT + ")"))
        else:
            EXTENSION_STATUS[name] = f"{type(exc).__name__}: {exc}"
        return False


HAS_C = _try_import("_C")
HAS_C_CUDA = HAS_C and _try_import("_C_cuda")
if not HAS_C:
    EXTENSION_STATUS.setdefault("_C_cuda", "needs cmpe_se_fused._C (the op schemas) first")

#: the C++ entry of the layers' call plans (csrc/fastpath.cpp, a Python extension module), or None: then
#: the plans call torch.ops (same results, more host time per call)
FASTPATH = None
if HAS_C:
    try:
        from . import _fastpath as FASTPATH
        EXTENSION_STATUS["_fastpath"] = ""
    except ImportError as _exc:
        _why = (BUILD_INFO or {}).get("skipped", {}).get("_fastpath")
        EXTENSION_STATUS["_fastpath"] = f"not built: {_why}" if _why else f"{type(_exc).__name__}: {_exc}"


def _code_version(code: str) -> tuple[int, int, str]:
    """``sm_90a`` -> ``(9, 0, "a")``; ``compute_120`` -> ``(12, 0, "")``."""
    digits, suffix = re.fullmatch(r"(?:sm|compute)_(\d+)([a-z]?)", code).groups()
    return int(digits[:-1]), int(digits[-1]), suffix


def runs_on(capability: tuple[int, int], sass: list[str], ptx: list[str]) -> bool:
    """Whether a binary with these SASS and PTX targets has code for a device of ``capability``:
    SASS sm_XY runs on X.y for y >= Y (sm_XYa: X.Y only); PTX compute_XY is JIT-compiled for any
    capability >= X.Y (compute_XYa: X.Y only)."""
    major, minor = capability
    for code in sass:
        ma, mi, suf = _code_version(code)
        if major == ma and (minor == mi if suf == "a" else minor >= mi):
            return True
    for code in ptx:
        ma, mi, suf = _code_version(code)
        if ((major, minor) == (ma, mi)) if suf == "a" else ((major, minor) >= (ma, mi)):
            return True
    return False


def cuda_arch_reason(capability: tuple[int, int]) -> str:
    """Why ``_C_cuda`` cannot run on a device of ``capability`` ("" when it can, or when the
    build recorded no architectures)."""
    arch = (BUILD_INFO or {}).get("cuda_arch") or {}
    if not arch.get("sass") and not arch.get("ptx"):
        return ""
    if runs_on(capability, arch["sass"], arch["ptx"]):
        return ""
    cap = f"{capability[0]}.{capability[1]}"
    built = ", ".join(arch["sass"] + arch["ptx"])
    return (f"cmpe_se_fused._C_cuda carries no code for this GPU (compute capability {cap}); it was built for "
            f"{built} (TORCH_CUDA_ARCH_LIST={arch.get('list')!r}); rebuild for it with "
            f"TORCH_CUDA_ARCH_LIST={cap} {REBUILD_HINT}")


_lib = torch.library.Library("cmpe_se", "FRAGMENT")  # noqa: TOR901
_lib.define("triton_forward" + FORWARD_SCHEMA)
_lib.define("triton_backward" + BACKWARD_SCHEMA)


def _triton_forward_impl(*args):
    from .triton import streaming
    return streaming.forward(*args)


def _triton_backward_impl(*args):
    from .triton import streaming
    return streaming.backward(*args)


for _key in ("CUDA", "CPU"):  # CPU: Triton's interpreter (TRITON_INTERPRET=1), for testing
    _lib.impl("triton_forward", _triton_forward_impl, _key)
    _lib.impl("triton_backward", _triton_backward_impl, _key)


# ---------------------------------------------------------------------------------------------
# fake (meta) kernels
# ---------------------------------------------------------------------------------------------

def _fake_forward(u, x, fc1_weight, fc1_identity_weight, fc2_weight, pair_weight, bn_weight, bn_bias,
                  running_mean, running_var, mode, training, momentum, eps, fold_width, padding):
    acc = acc_dtype(u.dtype)
    n, c = u.shape[0], u.shape[1]
    e = pair_weight.shape[0] if pair_weight is not None else 0
    small = lambda *shape: u.new_empty(shape, dtype=acc)  # noqa: E731
    return (torch.empty_like(u), small(n, c), small(n, c), small(n, c), small(n, fc2_weight.shape[1]),
            small(e), small(e))


def _fake_backward(grad_y, u, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd, fc1_weight,
                   fc1_identity_weight, fc2_weight, pair_weight, bn_weight, bn_bias, mode, training,
                   fold_width, padding):
    like = lambda t: gate.new_empty(0) if t is None else torch.empty_like(t, dtype=gate.dtype)  # noqa: E731
    return (torch.empty_like(u), torch.empty_like(u), like(fc1_weight), like(fc1_identity_weight),
            like(fc2_weight), like(pair_weight), like(bn_weight), like(bn_bias))


def _fake_infer(u, x, fc1_weight, fc1_identity_weight, fc2_weight, pair_weight, bn_weight, bn_bias,
                running_mean, running_var, mode, eps, fold_width, padding):
    return torch.empty_like(u)


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------

_N_FORWARD_ARGS = 16


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on ``grad``; differentiating through it raises (the op is once-differentiable)."""

    @staticmethod
    def forward(ctx, grad, anchor):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("cmpe_se: double backward is not supported; the CMPE-SE op is once-differentiable "
                           "(use backend='reference' for higher-order gradients)")


def _make_autograd(forward_op, backward_op):
    class CMPESEFunction(torch.autograd.Function):
        """``Y = gate * U + X`` through ``forward_op``; gradients through ``backward_op``."""

        @staticmethod
        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                outs = forward_op(*args)
            (u, _x, fc1, fc1_id, fc2, pair_w, bn_w, bn_b, _rm, _rv, mode, training, _mom, _eps,
             fold_width, padding) = args
            y, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd = outs
            ctx.save_for_backward(u, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd,
                                  fc1, fc1_id, fc2, pair_w, bn_w, bn_b)
            ctx.config = (mode, training, fold_width, padding)
            ctx.mark_non_differentiable(pool_u, pool_x, gate, hidden, bn_mean, bn_invstd)
            return outs

        @staticmethod
        def backward(ctx, grad_y, *_unused):
            mode, training, fold_width, padding = ctx.config
            saved = ctx.saved_tensors
            with torch.no_grad():
                grads = backward_op(grad_y, *saved, mode, training, fold_width, padding)
            if torch.is_grad_enabled():  # create_graph=True: make a second backward fail loudly
                anchor = next((t for t in saved if t is not None and t.requires_grad), None)
                if anchor is not None or grad_y.requires_grad:
                    anchor = grad_y if anchor is None else anchor
                    grads = tuple(_NoDoubleBackward.apply(g, anchor) for g in grads)
            g_u, g_x, g_fc1, g_fc1_id, g_fc2, g_pair, g_bn_w, g_bn_b = grads
            present = (lambda g, t: g if t is not None else None)  # noqa: E731
            _u, _pu, _px, _g, _h, _m, _s, fc1, fc1_id, fc2, pair_w, bn_w, bn_b = saved
            return (g_u, g_x, g_fc1, present(g_fc1_id, fc1_id), g_fc2, present(g_pair, pair_w),
                    present(g_bn_w, bn_w), present(g_bn_b, bn_b)) + (None,) * (_N_FORWARD_ARGS - 8)

    def autograd_kernel(*args):
        return CMPESEFunction.apply(*args)

    return autograd_kernel


def _register(forward_name: str, backward_name: str):
    qual_f, qual_b = f"cmpe_se::{forward_name}", f"cmpe_se::{backward_name}"
    torch.library.register_fake(qual_f, _fake_forward, lib=_lib)
    torch.library.register_fake(qual_b, _fake_backward, lib=_lib)
    forward_op = getattr(torch.ops.cmpe_se, forward_name).default
    backward_op = getattr(torch.ops.cmpe_se, backward_name).default
    # cmpe_se::forward has its Autograd kernel in C++ (csrc/autograd.cpp): no Python autograd per call
    if not torch._C._dispatch_has_kernel_for_dispatch_key(qual_f, "Autograd"):
        _lib.impl(forward_name, _make_autograd(forward_op, backward_op), "Autograd")


#: op pairs by backend name
OPS: dict[str, tuple] = {}
#: the inference op by backend name (backends without one run their forward op)
INFER_OPS: dict[str, object] = {}
_register("triton_forward", "triton_backward")
OPS["triton"] = (torch.ops.cmpe_se.triton_forward.default, torch.ops.cmpe_se.triton_backward.default)
if HAS_C:
    _register("forward", "backward")
    OPS["cpu"] = OPS["cuda"] = (torch.ops.cmpe_se.forward.default, torch.ops.cmpe_se.backward.default)
    torch.library.register_fake("cmpe_se::infer", _fake_infer, lib=_lib)
    INFER_OPS["cpu"] = INFER_OPS["cuda"] = torch.ops.cmpe_se.infer.default


def schema_of(op_name: str) -> str:
    """The registered schema of ``cmpe_se::<op_name>`` as a string (for the schema-equality test)."""
    return str(getattr(torch.ops.cmpe_se, op_name).default._schema)
