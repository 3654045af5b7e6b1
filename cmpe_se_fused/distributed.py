"""Data-parallel training: synchronised pair-view BatchNorm and the network's BatchNorms.

In training mode the pair-view BatchNorm (``pair_bn``) of a CMPE-SE layer normalises with the
statistics of the *local* batch: under DDP every rank uses its own ``N/world`` samples, exactly
as ``nn.BatchNorm2d`` does. :class:`SyncCMPESE` (made by :func:`convert_sync_cmpe_se`) uses the
statistics of the global batch instead:

    S1 = all_reduce(sum a_i),  S2 = all_reduce(sum a_i^2),  M = all_reduce(count)
    mu_i = S1 / M,             var_i = S2 / M - mu_i^2        (biased; running_var gets M/(M-1))

How (:class:`SyncCMPESE`, training mode, a pair mode, more than one rank):

1. the pools and the pair-view maps ``a_i`` (``N x e x map``, tiny) are computed with the eager
   pieces of :mod:`cmpe_se_fused.reference` (one extra read of U and X), and the statistics with
   one autograd-aware all-reduce (``dist.all_reduce`` in a small autograd Function; float64 sums);
2. the fused op of the layer's backend then runs with those statistics in place of the running
   ones (evaluation-mode BN: it normalises with what it is given), so ``Y = s * U + X`` and its
   backward stay fused; the running statistics are updated here, identically on every rank;
3. backward: the op's backward treats the statistics as constants; :class:`_FusedGivenStats` adds
   their own gradients (from the op's ``dgamma``/``dbeta``), which autograd carries through the
   all-reduce to every rank's maps, pools, U and X: the synchronised-BN backward (global
   ``mean(db)`` and ``mean(db * n)``).

Everywhere else (evaluation, ``se``/``double_fc``, a single process) the layer is the fused
:class:`CMPESE`, bit for bit. State dicts keep the SPEC names (``pair_bn`` stays an
``nn.BatchNorm2d``), so checkpoints move freely between ``SyncCMPESE``, ``CMPESE`` and
``CMPESEReference``.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from . import reference
from .dispatch import choose
from .functional import validate
from .layer_swap import _adopt, _plain_bn, _swap, is_cmpe_se_layer, layer_config
from .modules import CMPESE
from .reference import PAIR_MODES, acc_dtype

__all__ = ["SyncCMPESE", "convert_sync_batchnorm", "convert_sync_cmpe_se", "global_batch_stats", "revert_sync_cmpe_se"]


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class _AllReduceSum(torch.autograd.Function):
    """``sum over ranks`` of a tensor, differentiable: the gradient of every rank's input is the
    sum over ranks of the output gradients. Plain ``dist.all_reduce`` on a copy (the autograd-aware
    ``torch.distributed.nn.functional.all_reduce`` warns that it is deprecated on every call)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def global_batch_stats(a: torch.Tensor, group=None):
    """Per filter, over every rank's ``a: (N, e, Hm, Wm)``: ``(mean, biased var, count)``.

    ``N`` may differ between ranks. Differentiable: the all-reduce is autograd-aware, so gradients
    of the statistics reach every rank's ``a``. Sums in float64 (the one-pass variance is safe).
    """
    e = a.shape[1]
    a64 = a.to(torch.float64)
    local = torch.cat([a64.sum((0, 2, 3)), (a64 * a64).sum((0, 2, 3)), a64.new_full((e,), a.numel() // e)])
    total = _AllReduceSum.apply(local, group) if _world_size(group) > 1 else local
    s1, s2, count = total[:e], total[e:2 * e], total[2 * e:].detach()  # no .item(): no host sync per layer
    mean = s1 / count
    var = (s2 / count - mean * mean).clamp_min(0)
    return mean.to(a.dtype), var.to(a.dtype), count


class _FusedGivenStats(torch.autograd.Function):
    """The fused op with the pair-view BN statistics as differentiable *inputs*.

    Forward: the op in evaluation-mode BN, with ``mean``/``var`` in place of the running
    statistics, so it normalises with them (and updates nothing). Backward: the op's backward
    (affine BN: statistics held constant) plus the gradients of the statistics themselves, which
    follow from the op's ``dgamma = sum(db * n)`` and ``dbeta = sum(db)`` of this rank:
    ``dL/dmean = -gamma * invstd * dbeta``, ``dL/dvar = -gamma * invstd^2 * dgamma / 2``.
    Autograd carries those through :func:`global_batch_stats` to every rank's maps: together the
    synchronised-BN backward of SPEC section 2.
    """

    @staticmethod
    def forward(ctx, u, x, fc1, fc2, pair_w, bn_w, bn_b, mean, var, ops, cfg):
        mode, eps, fold_width, padding = cfg
        outs = ops[0](u, x, fc1, None, fc2, pair_w, bn_w, bn_b, mean.clone(), var.clone(), mode, False, 0.0, eps,
                      fold_width, padding)
        y, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd = outs
        ctx.save_for_backward(u, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd, fc1, fc2, pair_w, bn_w, bn_b)
        ctx.ops, ctx.cfg = ops, cfg
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        u, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd, fc1, fc2, pair_w, bn_w, bn_b = ctx.saved_tensors
        mode, _eps, fold_width, padding = ctx.cfg
        g_u, g_x, g_fc1, _, g_fc2, g_pair, g_w, g_b = ctx.ops[1](
            grad_y, u, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd, fc1, None, fc2, pair_w, bn_w, bn_b,
            mode, False, fold_width, padding)
        g_mean = -bn_w * bn_invstd * g_b
        g_var = -0.5 * bn_w * bn_invstd * bn_invstd * g_w
        return g_u, g_x, g_fc1, g_fc2, g_pair, g_w, g_b, g_mean, g_var, None, None


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
        fc1, fc2, pair_w = self.fc1.weight.to(acc), self.fc2.weight.to(acc), self.pair_conv.weight.to(acc)
        bn_w, bn_b = bn.weight.to(acc), bn.bias.to(acc)
        validate(u, x, fc1, fc2, None, pair_w, bn_w, bn_b, bn.running_mean, bn.running_var, mode=self.mode,
                 training=False, fold_width=self.fold_width, padding=self.padding)
        chosen = choose(self.backend, u)
        ops = (reference.forward_op_reference, reference.backward_op_reference) if chosen.name == "reference" \
            else chosen.ops
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        # the statistics need the pools before the op runs: one extra read of U and X (2T of the ~7T)
        pool_u, pool_x = reference.squeeze(u, x)
        a = reference.pair_view_conv(pool_u, pool_x, pair_w, self.mode, self.fold_width, self.padding)
        mean, var, count = global_batch_stats(a, self.process_group)
        with torch.no_grad():
            bn.running_mean.mul_(1 - momentum).add_((momentum * mean).to(bn.running_mean.dtype))
            unbiased = var.to(torch.float64) * (count / (count - 1))
            bn.running_var.mul_(1 - momentum).add_((momentum * unbiased).to(bn.running_var.dtype))
        return _FusedGivenStats.apply(u, x, fc1, fc2, pair_w, bn_w, bn_b, mean, var, ops,
                                      (self.mode, float(bn.eps), int(self.fold_width), int(self.padding)))

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

