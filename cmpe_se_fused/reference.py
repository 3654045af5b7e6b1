"""The CMPE-SE layer in plain PyTorch: the oracle every backend is tested against.

This file implements ``docs/SPEC.md`` literally and readably. Three entry points:

* :func:`cmpe_se_reference` -- the whole layer, differentiable by PyTorch's own autograd
  (the ``reference`` backend, and the eager baseline of the benchmarks);
* :func:`forward_op_reference` / :func:`backward_op_reference` -- the two op contracts of
  ``docs/ARCHITECTURE.md`` (same arguments, same outputs as ``torch.ops.cmpe_se.forward`` /
  ``backward``), the oracle for every kernel's saved tensors and gradients.

Shapes: ``U, X: (N, C, H, W)``, pools ``(N, C)``, hidden ``(N, r)`` (``(N, 2r)`` for
``double_fc``), pair-view map ``a: (N, e, Hm, Wm)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("se", "double_fc", "pair_2x1", "pair_1x1", "folded_3x3")
PAIR_MODES = ("pair_2x1", "pair_1x1", "folded_3x3")
KERNEL_SIZE = {"pair_2x1": (1, 2), "pair_1x1": (1, 1), "folded_3x3": (3, 3)}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype (SPEC section 4): float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def map_shape(mode: str, channels: int, fold_width: int = 16, padding: int = 0) -> tuple[int, int]:
    """(Hm, Wm): the pair-view output map of one filter."""
    if mode == "pair_2x1":
        return channels, 1
    if mode == "pair_1x1":
        return channels, 2
    if mode == "folded_3x3":
        k = channels // fold_width
        return 2 * k - 2 + 2 * padding, fold_width - 2 + 2 * padding
    raise ValueError(f"mode {mode!r} has no pair-view map")


def relation_dim(mode: str, channels: int, fold_width: int = 16, padding: int = 0) -> int:
    """Length of the relation vector z that fc1 reads (``fc1.weight`` is ``[r, relation_dim]``)."""
    if mode in ("se", "double_fc", "pair_2x1"):
        return channels
    hm, wm = map_shape(mode, channels, fold_width, padding)
    return hm * wm


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------

def squeeze(u: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial means of both flows, accumulated in the acc dtype: ``(N, C)`` each."""
    acc = acc_dtype(u.dtype)
    return u.to(acc).mean(dim=(2, 3)), x.to(acc).mean(dim=(2, 3))


def pair_map(pool_u: torch.Tensor, pool_x: torch.Tensor) -> torch.Tensor:
    """The pair map as a one-channel image: ``(N, 1, C, 2)``, column 0 = u, column 1 = x."""
    return torch.stack([pool_u, pool_x], dim=-1).unsqueeze(1)


def fold(pool_u: torch.Tensor, pool_x: torch.Tensor, fold_width: int) -> torch.Tensor:
    """The folded pair map ``(N, 1, 2k, m)``: ``F[2q, j] = u[q*m + j]``, ``F[2q+1, j] = x[q*m + j]``."""
    n, c = pool_u.shape
    k = c // fold_width
    rows = torch.stack([pool_u.reshape(n, k, fold_width), pool_x.reshape(n, k, fold_width)], dim=2)  # (N, k, 2, m)
    return rows.reshape(n, 1, 2 * k, fold_width)


def pair_view_conv(pool_u, pool_x, pair_weight, mode, fold_width, padding):
    """``a: (N, e, Hm, Wm)``, each filter cross-correlated with the pair map (or the fold)."""
    if mode == "folded_3x3":
        return F.conv2d(fold(pool_u, pool_x, fold_width), pair_weight, padding=padding)
    return F.conv2d(pair_map(pool_u, pool_x), pair_weight)


def batch_norm(a, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps):
    """BatchNorm over (N, Hm, Wm) per filter, exactly as ``nn.BatchNorm2d`` (explicit formulas).

    Returns ``(b, mean, invstd)`` where mean/invstd are the statistics used to normalise.
    Training mode updates ``running_mean``/``running_var`` in place (in their own dtype).
    """
    e = a.shape[1]
    m = a.numel() // e
    if training:
        if m == 1:
            raise ValueError(f"pair_bn: expected more than 1 value per filter in training mode, got {m} "
                             f"(batch {a.shape[0]}, map {tuple(a.shape[2:])})")
        mean = a.mean(dim=(0, 2, 3))
        var = ((a - mean.view(1, e, 1, 1)) ** 2).mean(dim=(0, 2, 3))  # biased
        if m == 0:  # an empty batch: nothing to normalise, running statistics untouched (nn.BatchNorm2d)
            return a.clone(), mean, torch.rsqrt(var + eps)
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_((momentum * mean.detach()).to(running_mean.dtype))
            unbiased = var.detach() * (m / (m - 1))
            running_var.mul_(1 - momentum).add_((momentum * unbiased).to(running_var.dtype))
    else:
        mean = running_mean.to(a.dtype)
        var = running_var.to(a.dtype)
    invstd = torch.rsqrt(var + eps)
    b = (a - mean.view(1, e, 1, 1)) * (invstd * bn_weight).view(1, e, 1, 1) + bn_bias.view(1, e, 1, 1)
    return b, mean, invstd


def relation(pool_u, pool_x, pair_weight, bn_weight, bn_bias, running_mean, running_var, *,
             mode, training, momentum, eps, fold_width, padding):
    """Pair-view conv, BN per filter, filter average: ``z = v.flatten(1)``, plus the BN stats."""
    a = pair_view_conv(pool_u, pool_x, pair_weight, mode, fold_width, padding)   # (N, e, Hm, Wm)
    b, mean, invstd = batch_norm(a, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps)
    v = b.mean(dim=1)                                                            # (N, Hm, Wm)
    return v.flatten(1), mean, invstd


def excite(pool_u, pool_x, fc1_weight, fc1_identity_weight, fc2_weight, pair_weight, bn_weight, bn_bias,
           running_mean, running_var, *, mode, training, momentum, eps, fold_width, padding):
    """The channel-relation network: pools -> ``(gate, hidden, bn_mean, bn_invstd)``."""
    empty = pool_u.new_empty(0)
    mean, invstd = empty, empty
    if mode == "double_fc":
        hidden = torch.cat([F.relu(pool_u @ fc1_weight.t()), F.relu(pool_x @ fc1_identity_weight.t())], dim=1)
    else:
        if mode == "se":
            z = pool_u
        else:
            z, mean, invstd = relation(pool_u, pool_x, pair_weight, bn_weight, bn_bias, running_mean, running_var,
                                       mode=mode, training=training, momentum=momentum, eps=eps,
                                       fold_width=fold_width, padding=padding)
        hidden = F.relu(z @ fc1_weight.t())                                     # (N, r)
    gate = torch.sigmoid(hidden @ fc2_weight.t())                               # (N, C)
    return gate, hidden, mean, invstd


def rescale(gate: torch.Tensor, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Y = gate * U + X`` in the acc dtype, written in U's dtype and memory format."""
    acc = gate.dtype
    y = gate[:, :, None, None] * u.to(acc) + x.to(acc)
    return torch.empty_like(u).copy_(y)


# ---------------------------------------------------------------------------------------------
# the whole layer (autograd by PyTorch)
# ---------------------------------------------------------------------------------------------

def cmpe_se_reference(u, x, fc1_weight, fc2_weight, fc1_identity_weight=None, pair_weight=None,
                      bn_weight=None, bn_bias=None, running_mean=None, running_var=None, *,
                      mode, training, momentum=0.1, eps=1e-5, fold_width=16, padding=0):
    """``sigmoid(excite(mean_p U, mean_p X)) * U + X``. Equivalent eager code of every backend.

    Weights may be in any float dtype; they are used in the acc dtype (fp32, fp64 for fp64).
    """
    acc = acc_dtype(u.dtype)
    cast = (lambda t: None if t is None else t.to(acc))
    pool_u, pool_x = squeeze(u, x)
    gate, _, _, _ = excite(pool_u, pool_x, cast(fc1_weight), cast(fc1_identity_weight), cast(fc2_weight),
                           cast(pair_weight), cast(bn_weight), cast(bn_bias), running_mean, running_var,
                           mode=mode, training=training, momentum=momentum, eps=eps,
                           fold_width=fold_width, padding=padding)
    return rescale(gate, u, x)


# ---------------------------------------------------------------------------------------------
# the op contracts (docs/ARCHITECTURE.md), in plain PyTorch
# ---------------------------------------------------------------------------------------------

def forward_op_reference(u, x, fc1_weight, fc1_identity_weight, fc2_weight, pair_weight, bn_weight, bn_bias,
                         running_mean, running_var, mode, training, momentum, eps, fold_width, padding):
    """Same arguments and outputs as ``torch.ops.cmpe_se.forward``:
    ``(y, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd)``."""
    with torch.no_grad():
        pool_u, pool_x = squeeze(u, x)
        gate, hidden, mean, invstd = excite(pool_u, pool_x, fc1_weight, fc1_identity_weight, fc2_weight,
                                            pair_weight, bn_weight, bn_bias, running_mean, running_var,
                                            mode=mode, training=training, momentum=momentum, eps=eps,
                                            fold_width=fold_width, padding=padding)
        return rescale(gate, u, x), pool_u, pool_x, gate, hidden, mean, invstd


def _bn_backward(db, a, mean, invstd, bn_weight, training):
    """SPEC section 2: gradients of one BN layer per filter, given ``db`` of its output."""
    e = a.shape[1]
    n_hat = (a - mean.view(1, e, 1, 1)) * invstd.view(1, e, 1, 1)
    dims = (0, 2, 3)
    dgamma = (db * n_hat).sum(dims)
    dbeta = db.sum(dims)
    scale = (bn_weight * invstd).view(1, e, 1, 1)
    if training:
        da = scale * (db - db.mean(dims, keepdim=True) - n_hat * (db * n_hat).mean(dims, keepdim=True))
    else:
        da = scale * db
    return da, dgamma, dbeta


def backward_op_reference(grad_y, u, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd,
                          fc1_weight, fc1_identity_weight, fc2_weight, pair_weight, bn_weight, bn_bias,
                          mode, training, fold_width, padding):
    """Same arguments and outputs as ``torch.ops.cmpe_se.backward``: ``(grad_u, grad_x, grad_fc1_weight,
    grad_fc1_identity_weight, grad_fc2_weight, grad_pair_weight, grad_bn_weight, grad_bn_bias)``;
    absent weights get ``[0]``-sized gradients. SPEC section 2, formula by formula."""
    acc = gate.dtype
    empty = gate.new_empty(0)
    n, c, h, w = u.shape
    p = h * w
    with torch.no_grad():
        g_sum = (grad_y.to(acc) * u.to(acc)).sum(dim=(2, 3))                    # G: (N, C)
        dg = g_sum * gate * (1 - gate)
        d_fc2 = dg.t() @ hidden                                                  # (C, H)
        dh_pre = (dg @ fc2_weight) * (hidden > 0)
        d_fc1_id = d_pair = d_gamma = d_beta = empty
        if mode == "double_fc":
            r = fc1_weight.shape[0]
            d_fc1 = dh_pre[:, :r].t() @ pool_u
            d_fc1_id = dh_pre[:, r:].t() @ pool_x
            du, dx = dh_pre[:, :r] @ fc1_weight, dh_pre[:, r:] @ fc1_identity_weight
        elif mode == "se":
            d_fc1 = dh_pre.t() @ pool_u
            du, dx = dh_pre @ fc1_weight, torch.zeros_like(pool_x)
        else:
            e = pair_weight.shape[0]
            a = pair_view_conv(pool_u, pool_x, pair_weight, mode, fold_width, padding)   # (N, e, Hm, Wm)
            n_hat = (a - bn_mean.view(1, e, 1, 1)) * bn_invstd.view(1, e, 1, 1)
            z = (n_hat * bn_weight.view(1, e, 1, 1) + bn_bias.view(1, e, 1, 1)).mean(1).flatten(1)
            d_fc1 = dh_pre.t() @ z
            dv = (dh_pre @ fc1_weight).view(n, 1, *a.shape[2:])
            db = (dv / e).expand_as(a)
            da, d_gamma, d_beta = _bn_backward(db, a, bn_mean, bn_invstd, bn_weight, training)
            with torch.enable_grad():  # the conv is linear: its adjoint via autograd on tiny tensors
                pu, px, wt = (t.detach().requires_grad_(True) for t in (pool_u, pool_x, pair_weight))
                a2 = pair_view_conv(pu, px, wt, mode, fold_width, padding)
                du, dx, d_pair = torch.autograd.grad(a2, (pu, px, wt), da)
        grad_u = torch.empty_like(u).copy_(gate[:, :, None, None] * grad_y.to(acc) + (du / p)[:, :, None, None])
        grad_x = torch.empty_like(u).copy_(grad_y.to(acc) + (dx / p)[:, :, None, None])
        return grad_u, grad_x, d_fc1, d_fc1_id, d_fc2, d_pair, d_gamma, d_beta


# ---------------------------------------------------------------------------------------------
# the eager module, written the way a PyTorch user would (nn layers, nn.BatchNorm2d itself)
# ---------------------------------------------------------------------------------------------

def build_layers(module, channels, mode, reduction, pair_filters, fold_width, padding, bn_eps, bn_momentum):
    """Create the SPEC section 1 layers on ``module`` (``fc1``, ``fc1_identity``, ``fc2``,
    ``pair_conv``, ``pair_bn``) and its size attributes; shared by every CMPE-SE module so the
    state_dicts cannot drift apart. Default pair filters: ``e = max(1, C // 16)``."""
    from torch import nn
    module.channels, module.mode, module.reduction = channels, mode, reduction
    module.hidden = max(1, channels // reduction)
    module.fold_width, module.padding = fold_width, padding
    module.pair_filters = (pair_filters or max(1, channels // 16)) if mode in PAIR_MODES else 0
    module.fc1 = nn.Linear(relation_dim(mode, channels, fold_width, padding), module.hidden, bias=False)
    if mode == "double_fc":
        module.fc1_identity = nn.Linear(channels, module.hidden, bias=False)
    module.fc2 = nn.Linear(2 * module.hidden if mode == "double_fc" else module.hidden, channels, bias=False)
    if mode in PAIR_MODES:
        pad = padding if mode == "folded_3x3" else 0
        module.pair_conv = nn.Conv2d(1, module.pair_filters, KERNEL_SIZE[mode], padding=pad, bias=False)
        module.pair_bn = nn.BatchNorm2d(module.pair_filters, eps=bn_eps, momentum=bn_momentum)


def _pair_bn(bn, a):
    """``bn(a)``: ``nn.BatchNorm2d`` itself (batch statistics, running update, its hooks) when its
    tensors are in ``a``'s dtype (the acc dtype); otherwise (a ``.half()``/``.bfloat16()`` module,
    float64 input into a float32 module) the same computation, ``_BatchNorm.forward`` step by step,
    in the acc dtype, with the running statistics updated in their own dtype, as :class:`CMPESE` does
    (SPEC section 4)."""
    if all(t is None or t.dtype == a.dtype for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)):
        return bn(a)
    factor = bn.momentum
    if bn.training:  # build_layers' BatchNorm2d: affine, tracking running statistics
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    mean, var = bn.running_mean.to(a.dtype), bn.running_var.to(a.dtype)  # copies: the dtypes differ
    out = F.batch_norm(a, mean, var, bn.weight.to(a.dtype), bn.bias.to(a.dtype), bn.training, factor or 0.0, bn.eps)
    if bn.training:
        with torch.no_grad():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    return out


class CMPESEReference(torch.nn.Module):
    """Plain-PyTorch CMPE-SE block with the SPEC parameter names (``fc1``, ``fc1_identity``,
    ``fc2``, ``pair_conv``, ``pair_bn``). Same constructor as :class:`cmpe_se_fused.CMPESE`
    minus ``backend``; state_dicts are interchangeable with ``strict=True``."""

    def __init__(self, channels, mode="folded_3x3", reduction=16, pair_filters=None, fold_width=16, padding=0,
                 bn_eps=1e-5, bn_momentum=0.1):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        build_layers(self, channels, mode, reduction, pair_filters, fold_width, padding, bn_eps, bn_momentum)

    def forward(self, u, x):
        acc = acc_dtype(u.dtype)
        pool_u, pool_x = u.to(acc).mean((2, 3)), x.to(acc).mean((2, 3))
        params = {k: v.to(acc) for k, v in self.named_parameters()}
        fc1 = lambda z: F.linear(z, params["fc1.weight"])  # noqa: E731
        if self.mode == "double_fc":
            h = torch.cat([F.relu(fc1(pool_u)), F.relu(F.linear(pool_x, params["fc1_identity.weight"]))], 1)
        else:
            if self.mode == "se":
                z = pool_u
            else:
                img = fold(pool_u, pool_x, self.fold_width) if self.mode == "folded_3x3" else pair_map(pool_u, pool_x)
                a = F.conv2d(img, params["pair_conv.weight"], padding=self.pair_conv.padding)
                z = _pair_bn(self.pair_bn, a).mean(1).flatten(1)
            h = F.relu(fc1(z))
        gate = torch.sigmoid(F.linear(h, params["fc2.weight"]))
        return torch.empty_like(u).copy_(gate[:, :, None, None] * u.to(acc) + x.to(acc))
