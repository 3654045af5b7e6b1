"""Data-parallel training: synchronised pair-view BatchNorm and the network's BatchNorms.

In training mode the pair-view BatchNorm (``pair_bn``) of a CMPE-SE layer normalises with the
statistics of the *local* batch: under DDP every rank uses its own ``N/world`` samples, exactly
as ``nn.BatchNorm2d`` does. :class:`SyncCMPESE` (made by :func:`convert_sync_cmpe_se`) uses the
statistics of the global batch instead:

    S1 = all_reduce(sum a_i),  S2 = all_reduce(sum a_i^2),  M = all_reduce(count)
    mu_i = S1 / M,             var_i = S2 / M - mu_i^2        (biased; running_var gets M/(M-1))

The maps ``a_i`` are ``N x e x map`` (a few hundred numbers per sample), so the all-reduce is tiny;
sums are taken in float64 so the one-pass variance loses nothing. The all-reduce is
``torch.distributed.nn.functional.all_reduce``, which is autograd-aware (its backward
all-reduces the incoming gradients), so the backward is the synchronised-BN backward: every
rank's ``da`` uses the global ``mean(db)`` and ``mean(db * n)``. The small network (squeeze,
pair-view conv, BN, MLP, gate) and the rescale ``Y = s * U + X`` then run in the eager reference
pieces of :mod:`cmpe_se_fused.reference` (the fused ops compute the BN statistics inside the
kernel and cannot take global ones). This path is used only where it matters: training mode, a
pair mode, and an initialised process group of more than one rank; everywhere else (evaluation,
``se``/``double_fc``, single process) the layer is the fused :class:`CMPESE`, bit for bit.

State dicts keep the SPEC names (``pair_bn`` stays an ``nn.BatchNorm2d``), so checkpoints move
freely between ``SyncCMPESE``, ``CMPESE`` and ``CMPESEReference``.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from . import reference
from .convert import _adopt, _plain_bn, _swap, is_cmpe_se_layer, layer_config
from .modules import CMPESE
from .reference import PAIR_MODES, acc_dtype

__all__ = [
    "SyncCMPESE",
    "convert_sync_batchnorm",
    "convert_sync_cmpe_se",
    "revert_sync_cmpe_se",
    "synced_batch_norm",
]


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def synced_batch_norm(a, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, group=None):
    """:func:`cmpe_se_fused.reference.batch_norm` with the statistics of every rank's ``a``.

    ``a: (N, e, Hm, Wm)`` (``N`` may differ between ranks, and be 0). Differentiable: gradients
    flow to every rank's ``a`` through the autograd-aware all-reduce.
    """
    if not training:
        return reference.batch_norm(a, bn_weight, bn_bias, running_mean, running_var, False, momentum, eps)
    from torch.distributed.nn.functional import all_reduce
    e = a.shape[1]
    a64 = a.to(torch.float64)
    count = a64.new_full((e,), a.numel() // e if e else 0)
    local = torch.cat([a64.sum((0, 2, 3)), (a64 * a64).sum((0, 2, 3)), count])
    total = all_reduce(local, op=dist.ReduceOp.SUM, group=group) if _world_size(group) > 1 else local
    s1, s2, m = total[:e], total[e:2 * e], total[2 * e:].detach()  # no .item(): no host sync per layer
    mean64 = s1 / m
    var64 = (s2 / m - mean64 * mean64).clamp_min(0)
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_((momentum * mean64).to(running_mean.dtype))
        running_var.mul_(1 - momentum).add_((momentum * var64 * (m / (m - 1))).to(running_var.dtype))
    mean, var = mean64.to(a.dtype), var64.to(a.dtype)
    invstd = torch.rsqrt(var + eps)
    b = (a - mean.view(1, e, 1, 1)) * (invstd * bn_weight).view(1, e, 1, 1) + bn_bias.view(1, e, 1, 1)
    return b, mean, invstd


class SyncCMPESE(CMPESE):
    """:class:`CMPESE` whose pair-view BatchNorm uses global-batch statistics in training.

    Same constructor plus ``process_group`` (``None``: the default group). Same parameters,
    buffers and state_dict keys as ``CMPESE``. See the module docstring for which path runs.
    """

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _needs_sync(self) -> bool:
        return self.training and self.mode in PAIR_MODES and _world_size(self.process_group) > 1

    def forward(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self._needs_sync():
            return super().forward(u, x)
        device_type = u.device.type
        if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            u, x = u.to(dtype), x.to(dtype)
        no_autocast = torch.autocast(device_type, enabled=False) if device_type in ("cuda", "cpu") else nullcontext()
        with no_autocast:  # SPEC section 4: the small network in fp32 whatever the autocast dtype
            return self._sync_forward(u, x)

    def _sync_forward(self, u, x):
        acc = acc_dtype(u.dtype)
        bn = self.pair_bn
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        pool_u, pool_x = reference.squeeze(u, x)
        a = reference.pair_view_conv(pool_u, pool_x, self.pair_conv.weight.to(acc), self.mode, self.fold_width,
                                     self.padding)
        b, _, _ = synced_batch_norm(a, bn.weight.to(acc), bn.bias.to(acc), bn.running_mean, bn.running_var,
                                    True, momentum, bn.eps, self.process_group)
        z = b.mean(1).flatten(1)
        hidden = torch.relu(z @ self.fc1.weight.to(acc).t())
        gate = torch.sigmoid(hidden @ self.fc2.weight.to(acc).t())
        return reference.rescale(gate, u, x)

    def extra_repr(self):
        return super().extra_repr() + ", sync_stats=True"


def convert_sync_cmpe_se(model: nn.Module, process_group=None, inplace: bool = True) -> nn.Module:
    """Make every CMPE-SE layer's pair-view BatchNorm use global-batch statistics.

    ``CMPESE`` layers keep their backend; eager layers (``CMPESEReference``, duck-typed) get
    ``backend="auto"``. Parameters and buffers are adopted, not copied (see
    :mod:`cmpe_se_fused.convert`). In place by default, like ``nn.SyncBatchNorm.convert_sync_batchnorm``;
    use the return value.
    """
    if not inplace:
        import copy
        model = copy.deepcopy(model)

    def fn(m):
        if not is_cmpe_se_layer(m):
            return None
        if isinstance(m, SyncCMPESE):
            m.process_group = process_group
            return m
        new = _adopt(SyncCMPESE, m, layer_config(m), backend=getattr(m, "backend", "auto"),
                     process_group=process_group)
        if isinstance(getattr(new, "pair_bn", None), nn.SyncBatchNorm):
            new.pair_bn = _plain_bn(new.pair_bn)
        return new

    return _swap(model, fn)


def revert_sync_cmpe_se(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Every ``SyncCMPESE`` back to a plain ``CMPESE`` (same backend, local statistics)."""
    if not inplace:
        import copy
        model = copy.deepcopy(model)
    return _swap(model, lambda m: _adopt(CMPESE, m, layer_config(m), backend=m.backend)
                 if isinstance(m, SyncCMPESE) else None)


def convert_sync_batchnorm(model: nn.Module, process_group=None, cmpe_se: bool = False) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` for the network's BatchNorms, leaving the
    CMPE-SE layers' ``pair_bn`` alone (``torch``'s converter would turn it into an
    ``nn.SyncBatchNorm`` that the fused op ignores). ``cmpe_se=True`` also applies
    :func:`convert_sync_cmpe_se`. In place; use the return value."""
    def fn(m):
        if is_cmpe_se_layer(m):
            return convert_sync_cmpe_se(m, process_group) if cmpe_se else m
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return nn.SyncBatchNorm.convert_sync_batchnorm(m, process_group)
        return None

    return _swap(model, fn)

