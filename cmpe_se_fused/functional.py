"""``cmpe_se(u, x, ...)``: the layer for users who hold their own weights.

Validates every argument (clear ``TypeError``/``ValueError`` naming it, before any computation),
applies the autocast policy, picks the backend and runs it. Equivalent eager code::

    pool_u, pool_x = u.mean((2, 3)), x.mean((2, 3))
    gate = sigmoid(excite(pool_u, pool_x))       # SPEC.md section 1, per mode
    return gate[:, :, None, None] * u + x
"""
from __future__ import annotations

import contextlib

import torch

from . import reference
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


def check_fold(mode, channels, fold_width, padding):
    """``padding`` is 0 or 1; for ``folded_3x3``, ``fold_width`` divides C and the fold is big
    enough for a 3x3 conv (2k >= 3 and m >= 3 with padding 0)."""
    if padding not in (0, 1):
        raise ValueError(f"padding must be 0 or 1, got {padding!r}")
    if mode != "folded_3x3":
        return
    if not isinstance(fold_width, int) or fold_width < 1 or channels % fold_width:
        raise ValueError(f"fold_width must be a positive divisor of the channel count {channels}, got {fold_width!r}")
    hm, wm = map_shape(mode, channels, fold_width, padding)
    if hm < 1 or wm < 1:
        raise ValueError(f"fold too small for a 3x3 conv with padding={padding}: {2 * (channels // fold_width)} rows "
                         f"x {fold_width} columns (needs >= 3 each with padding 0); lower fold_width or use padding=1")


def validate(u, x, fc1_weight, fc2_weight, fc1_identity_weight, pair_weight, bn_weight, bn_bias,
             running_mean, running_var, *, mode, training, fold_width, padding):
    """Every check the kernels rely on, with the argument's name in the message."""
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
    if n == 0 or c == 0 or h == 0 or w == 0:
        raise ValueError(f"u must be non-empty, got shape {tuple(u.shape)}")
    check_fold(mode, c, fold_width, padding)
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
            if n * hm * wm <= 1:
                raise ValueError(f"training-mode BatchNorm needs more than one value per filter; batch {n} with "
                                 f"a {hm}x{wm} map gives {n * hm * wm}")


def cmpe_se(u, x, fc1_weight, fc2_weight, fc1_identity_weight=None, pair_weight=None, bn_weight=None,
            bn_bias=None, running_mean=None, running_var=None, *, mode, training, momentum=0.1, eps=1e-5,
            fold_width=16, padding=0, backend="auto"):
    """CMPE-SE: ``sigmoid(excite(mean_p U, mean_p X)) * U + X``.

    ``U, X: (N, C, H, W)``; weights as in SPEC.md section 1 (``fc1_weight [r, Dz]``,
    ``fc2_weight [C, r]`` (``[C, 2r]`` for double_fc), ``pair_weight [e, 1, kh, kw]``, BN vectors
    ``[e]``). Training mode updates ``running_mean``/``running_var`` in place. Under autocast the
    layer runs in the autocast dtype with fp32 accumulation; weights are used in fp32.
    """
    validate(u, x, fc1_weight, fc2_weight, fc1_identity_weight, pair_weight, bn_weight, bn_bias,
             running_mean, running_var, mode=mode, training=training, fold_width=fold_width, padding=padding)
    device_type = u.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        u, x = u.to(dtype), x.to(dtype)
    chosen = choose(backend, u)
    if chosen.name == "reference":
        # the small network runs in fp32 whatever autocast says (SPEC section 4), as in the kernels
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
