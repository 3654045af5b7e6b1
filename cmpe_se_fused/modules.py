"""``CMPESE``: the drop-in layer. Parameter and buffer names follow SPEC.md section 1, so a
state_dict moves between backends and to/from :class:`cmpe_se_fused.reference.CMPESEReference`
with ``strict=True``."""
from __future__ import annotations

import torch
from torch import nn

from .dispatch import BACKEND_NAMES
from .functional import check_fold, cmpe_se
from .reference import MODES, PAIR_MODES, build_layers


def check_config(channels, mode, reduction, pair_filters, fold_width, padding, backend):
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"reduction must be a positive int, got {reduction!r}")
    if pair_filters is not None and (not isinstance(pair_filters, int) or pair_filters < 1):
        raise ValueError(f"pair_filters must be a positive int or None, got {pair_filters!r}")
    if backend not in ("auto",) + BACKEND_NAMES:
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
    check_fold(mode, channels, fold_width, padding)


class CMPESE(nn.Module):
    """Competitive squeeze-and-excitation: ``forward(u, x) = sigmoid(excite(mean U, mean X)) * u + x``.

    Args:
        channels: C, the channel count of both flows.
        mode: ``se``, ``double_fc``, ``pair_2x1``, ``pair_1x1`` or ``folded_3x3``.
        reduction: t; hidden width ``r = max(1, C // t)``.
        pair_filters: e, pair-view filters (default ``max(1, C // 16)``).
        fold_width: m, columns of the folded pair map (``folded_3x3``; must divide C).
        padding: 0 or 1, padding of the 3x3 pair-view conv.
        bn_eps, bn_momentum: of the pair-view BatchNorm (``bn_momentum=None``: cumulative average).
        backend: ``auto``, ``reference``, ``cpu``, ``triton`` or ``cuda``.
    """

    def __init__(self, channels, mode="folded_3x3", reduction=16, pair_filters=None, fold_width=16, padding=0,
                 bn_eps=1e-5, bn_momentum=0.1, backend="auto"):
        super().__init__()
        check_config(channels, mode, reduction, pair_filters, fold_width, padding, backend)
        build_layers(self, channels, mode, reduction, pair_filters, fold_width, padding, bn_eps, bn_momentum)
        self.backend = backend

    def reset_parameters(self):
        for m in self.children():
            m.reset_parameters()

    def extra_repr(self):
        s = f"{self.channels}, mode={self.mode!r}, reduction={self.reduction} (hidden {self.hidden})"
        if self.mode in PAIR_MODES:
            s += f", pair_filters={self.pair_filters}"
        if self.mode == "folded_3x3":
            s += f", fold_width={self.fold_width}, padding={self.padding}"
        return s + f", backend={self.backend!r}"

    def forward(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if isinstance(u, torch.Tensor) and u.dim() == 4 and u.shape[1] != self.channels:
            raise ValueError(f"u must have {self.channels} channels (this CMPESE's channels), got shape "
                             f"{tuple(u.shape)}")
        bn_kwargs = {}
        if self.mode in PAIR_MODES:
            bn = self.pair_bn
            momentum = bn.momentum
            if self.training:
                bn.num_batches_tracked.add_(1)
                if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                    momentum = 1.0 / float(bn.num_batches_tracked)
            bn_kwargs = dict(pair_weight=self.pair_conv.weight, bn_weight=bn.weight, bn_bias=bn.bias,
                             running_mean=bn.running_mean, running_var=bn.running_var, eps=bn.eps,
                             momentum=0.0 if momentum is None else momentum)
        fc1_identity = self.fc1_identity.weight if self.mode == "double_fc" else None
        return cmpe_se(u, x, self.fc1.weight, self.fc2.weight, fc1_identity_weight=fc1_identity,
                       mode=self.mode, training=self.training, fold_width=self.fold_width,
                       padding=self.padding, backend=self.backend, **bn_kwargs)
