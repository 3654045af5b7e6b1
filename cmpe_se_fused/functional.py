"""``cmpe_se(u, x, ...)``: the layer for users who hold their own weights.

Validates every argument (clear ``TypeError``/``ValueError`` naming it, before any computation),
applies the autocast policy, picks the backend and runs it. Equivalent eager code::

    pool_u, pool_x = u.mean((2, 3)), x.mean((2, 3))
    gate = sigmoid(excite(pool_u, pool_x))       # SPEC.md section 1, per mode
    return gate[:, :, None, None] * u + x
"""
from __future__ import annotations

import contextlib
import numbers
import operator

import torch

from . import deploy, reference
from .dispatch import choose
from .reference import KERNEL_SIZE, MODES, PAIR_MODES, acc_dtype, map_shape, relation_dim

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_tensor(name, t, ndim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_shape(name, t, shape):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def as_int(value):
    """``value`` as a Python int when it is integer-like (``int``, numpy integers, anything with
    ``__index__``), else None (floats, strings, ...)."""
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_fold(mode, channels, fold_width, padding, *, default=16):
    """``padding`` is 0 or 1; for ``folded_3x3``, ``fold_width`` divides C and the fold is big
    enough for a 3x3 conv (2k >= 3 and m >= 3 with padding 0). Integer-like values (numpy
    integers) are accepted; returns ``(fold_width, padding)`` as Python ints (``fold_width``
    unchanged outside ``folded_3x3``). A bad ``fold_width`` is reported with the valid ones for C,
    nearest C/10 first (the networks' rule, SPEC section 5), and, when it is ``default`` (the
    constructor's and the function's default), says so: the user may never have passed it."""
    if as_int(padding) not in (0, 1):
        raise ValueError(f"padding must be 0 or 1, got {padding!r}")
    padding = as_int(padding)
    if mode != "folded_3x3":
        return (as_int(fold_width) if as_int(fold_width) is not None else fold_width), padding
    fold_width = as_int(fold_width) if as_int(fold_width) is not None else fold_width

    def valid_widths():
        ok = [m for m in range(1, channels + 1)
              if channels % m == 0 and min(map_shape(mode, channels, m, padding)) >= 1]
        ok.sort(key=lambda m: (abs(m - channels / 10), m))
        if not ok:
            return f"no fold width works for C={channels} with padding={padding} (try padding=1 or another mode)"
        shown = ", ".join(map(str, ok[:8])) + (", ..." if len(ok) > 8 else "")
        return f"valid fold widths for C={channels} with padding={padding}, nearest C/10 first: {shown}"

    given = f"{fold_width!r}" + (" (the default fold_width, used when none is passed)" if fold_width == default else "")
    if not isinstance(fold_width, int) or fold_width < 1 or channels % fold_width:
        raise ValueError(f"fold_width must be a positive divisor of the channel count {channels}, got {given}; "
                         f"{valid_widths()}")
    hm, wm = map_shape(mode, channels, fold_width, padding)
    if hm < 1 or wm < 1:
        raise ValueError(f"fold too small for a 3x3 conv with padding={padding}: {2 * (channels // fold_width)} rows "
                         f"x {fold_width} columns (needs >= 3 each with padding 0), fold_width {given}; lower "
                         f"fold_width or use padding=1; {valid_widths()}")
    return fold_width, padding


def _overlaps(a, b):
    """Whether two 1-D tensors share a memory location (conservative: same storage and
    intersecting byte ranges)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    span = lambda t: (t.data_ptr(), t.data_ptr() + ((t.numel() - 1) * t.stride(0) + 1) * t.element_size())  # noqa: E731
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def validate(u, x, fc1_weight, fc2_weight, fc1_identity_weight, pair_weight, bn_weight, bn_bias,
             running_mean, running_var, *, mode, training, fold_width, padding, momentum=0.1, eps=1e-5):
    """Every check the kernels rely on, with the argument's name in the message. Returns
    ``(fold_width, padding)`` as Python ints."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_tensor("u", u, 4)
    _check_tensor("x", x, 4)
    if u.dtype not in FLOAT_DTYPES:
        raise TypeError(f"u must be float32, float16, bfloat16 or float64, got {u.dtype}")
    if x.shape != u.shape:
        raise ValueError(f"x must have the same shape as u {tuple(u.shape)}, got {tuple(x.shape)}")
    if x.dtype != u.dtype:
        raise TypeError(f"x must have the same dtype as u ({u.dtype}), got {x.dtype}")
    if x.device != u.device:
        raise ValueError(f"x must be on the same device as u ({u.device}), got {x.device}")
    n, c, h, w = u.shape
    if c == 0 or h == 0 or w == 0:  # N = 0 is an empty batch: an empty output, as nn.BatchNorm2d gives
        raise ValueError(f"u must have at least one channel and one pixel, got shape {tuple(u.shape)}")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float (the running statistics' update factor), got {momentum!r}; "
                        f"the functional form keeps no batch count: for a cumulative average (nn.BatchNorm2d's "
                        f"momentum=None) pass momentum=1/k at the k-th call, or use the CMPESE module")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {eps!r}")
    fold_width, padding = check_fold(mode, c, fold_width, padding)
    weights = {"fc1_weight": fc1_weight, "fc2_weight": fc2_weight}
    if mode == "double_fc":
        weights["fc1_identity_weight"] = fc1_identity_weight
    if mode in PAIR_MODES:
        weights.update(pair_weight=pair_weight, bn_weight=bn_weight, bn_bias=bn_bias,
                       running_mean=running_mean, running_var=running_var)
    for name, t in weights.items():
        if t is None:
            raise ValueError(f"{name} is required in mode {mode!r}")
        _check_tensor(name, t)
        if t.device != u.device:
            raise ValueError(f"{name} must be on the same device as u ({u.device}), got {t.device}")
    if fc1_weight.dim() != 2:
        raise ValueError(f"fc1_weight must be 2-D [r, {relation_dim(mode, c, fold_width, padding)}], "
                         f"got {tuple(fc1_weight.shape)}")
    r = fc1_weight.shape[0]
    _check_shape("fc1_weight", fc1_weight, (r, relation_dim(mode, c, fold_width, padding)))
    _check_shape("fc2_weight", fc2_weight, (c, 2 * r if mode == "double_fc" else r))
    if mode == "double_fc":
        _check_shape("fc1_identity_weight", fc1_identity_weight, (r, c))
    if mode in PAIR_MODES:
        e = pair_weight.shape[0] if pair_weight.dim() == 4 else -1
        _check_shape("pair_weight", pair_weight, (max(e, 1), 1) + KERNEL_SIZE[mode])
        for name in ("bn_weight", "bn_bias", "running_mean", "running_var"):
            _check_shape(name, weights[name], (e,))
        if training:
            hm, wm = map_shape(mode, c, fold_width, padding)
            if n and n * hm * wm <= 1:
                raise ValueError(f"training-mode BatchNorm needs more than one value per filter; batch {n} with "
                                 f"a {hm}x{wm} map gives {n * hm * wm}")
            # written in place: an element must not be reachable twice (expand()ed buffers) and the
            # two must not share memory; the kernels would write through the alias
            for name in ("running_mean", "running_var"):
                if e > 1 and weights[name].stride(0) == 0:
                    raise ValueError(f"{name} is updated in place in training mode and must not overlap itself "
                                     f"(it has stride 0, e.g. from expand()); pass a tensor with its own memory, "
                                     f"e.g. {name}.clone()")
            if not torch.compiler.is_compiling() and _overlaps(running_mean, running_var):  # storage: eager only
                raise ValueError("running_mean and running_var are updated in place in training mode and must not "
                                 "share memory; pass two separate tensors")
    return fold_width, padding


def _functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running (False while compiling)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def cmpe_se(u, x, fc1_weight, fc2_weight, fc1_identity_weight=None, pair_weight=None, bn_weight=None,
            bn_bias=None, running_mean=None, running_var=None, *, mode, training, momentum=0.1, eps=1e-5,
            fold_width=16, padding=0, backend="auto"):
    """CMPE-SE: ``sigmoid(excite(mean_p U, mean_p X)) * U + X``.

    ``U, X: (N, C, H, W)``; weights as in SPEC.md section 1 (``fc1_weight [r, Dz]``,
    ``fc2_weight [C, r]`` (``[C, 2r]`` for double_fc), ``pair_weight [e, 1, kh, kw]``, BN vectors
    ``[e]``). ``mode`` and ``training`` are required. Training mode updates ``running_mean``/``running_var``
    in place with the float ``momentum`` (they must not overlap themselves or each other). Under
    autocast the layer runs in the autocast dtype with fp32 accumulation (float64 inputs are left
    alone, as PyTorch's autocast does); weights are used in fp32. An empty batch (N = 0) gives an
    empty output and leaves the running statistics alone, as ``nn.BatchNorm2d`` does.
    ``torch.func`` transforms need ``backend="reference"``.
    """
    return _cmpe_se(u, x, fc1_weight, fc2_weight, fc1_identity_weight, pair_weight, bn_weight, bn_bias,
                    running_mean, running_var, mode=mode, training=training, momentum=momentum, eps=eps,
                    fold_width=fold_width, padding=padding, backend=backend)


def _cmpe_se(u, x, fc1_weight, fc2_weight, fc1_identity_weight=None, pair_weight=None, bn_weight=None, bn_bias=None,
             running_mean=None, running_var=None, *, mode, training, momentum=0.1, eps=1e-5, fold_width=16,
             padding=0, backend="auto", on_validated=None):
    """:func:`cmpe_se`; ``on_validated(chosen backend, u)`` (the CMPESE module's batch count and call
    plan) runs once every check has passed, before any kernel. Returns ``y``."""
    fold_width, padding = validate(u, x, fc1_weight, fc2_weight, fc1_identity_weight, pair_weight, bn_weight,
                                   bn_bias, running_mean, running_var, mode=mode, training=training,
                                   fold_width=fold_width, padding=padding, momentum=momentum, eps=eps)
    device_type = u.device.type
    # PyTorch's autocast rule: float64 is left alone; every other float runs in the autocast dtype
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type) and u.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device_type)
        u, x = u.to(dtype), x.to(dtype)
    chosen = choose(deploy.export_backend(backend, training), u)  # ONNX export: the reference (deploy.py)
    if chosen.name != "reference" and _functorch_active():
        raise RuntimeError(
            f"cmpe_se: torch.func transforms (grad, vmap, jacrev, jvp, ...) cannot run the compiled "
            f"{chosen.name!r} backend (a custom op without functorch rules). Use backend='reference' "
            f"(plain PyTorch: every transform works) for torch.func, or torch.autograd.grad / .backward() "
            f"with any backend.")
    if on_validated is not None:
        on_validated(chosen, u)
    if chosen.name == "reference" or u.shape[0] == 0:
        # N = 0: nothing to compute; the reference gives the empty output (and gradients) every backend
        # would, and leaves the running statistics alone, as nn.BatchNorm2d does.
        # The small network runs in fp32 whatever autocast says (SPEC section 4), as in the kernels
        no_autocast = (torch.autocast(device_type, enabled=False) if device_type in ("cuda", "cpu")
                       else contextlib.nullcontext())
        with no_autocast:
            return reference.cmpe_se_reference(
                u, x, fc1_weight, fc2_weight, fc1_identity_weight, pair_weight, bn_weight, bn_bias, running_mean,
                running_var, mode=mode, training=training, momentum=momentum, eps=eps, fold_width=fold_width,
                padding=padding)
    acc = acc_dtype(u.dtype)
    cast = (lambda t: None if t is None else t.to(acc))  # noqa: E731
    if mode not in PAIR_MODES:
        running_mean = running_var = u.new_empty(0, dtype=acc)
    forward_op, _ = chosen.ops
    outs = forward_op(u, x, cast(fc1_weight), cast(fc1_identity_weight), cast(fc2_weight), cast(pair_weight),
                      cast(bn_weight), cast(bn_bias), running_mean, running_var, mode, bool(training),
                      float(momentum), float(eps), int(fold_width), int(padding))
    return outs[0]
