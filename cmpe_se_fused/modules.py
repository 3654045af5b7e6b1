"""``CMPESE``: the drop-in layer. Parameter and buffer names follow SPEC.md section 1, so a
state_dict moves between backends and to/from :class:`cmpe_se_fused.reference.CMPESEReference`
with ``strict=True``."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .dispatch import BACKEND_NAMES
from .functional import _cmpe_se, as_int, check_fold
from .hostpath import HostPlan
from .reference import MODES, PAIR_MODES, acc_dtype, build_layers


def check_config(channels, mode, reduction, pair_filters, fold_width, padding, backend):
    """Validate the constructor's arguments; returns ``(channels, reduction, pair_filters,
    fold_width, padding)`` as Python ints (integer-like values such as numpy integers accepted)."""
    if as_int(channels) is None or as_int(channels) < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if as_int(reduction) is None or as_int(reduction) < 1:
        raise ValueError(f"reduction must be a positive int, got {reduction!r}")
    if pair_filters is not None and (as_int(pair_filters) is None or as_int(pair_filters) < 1):
        raise ValueError(f"pair_filters must be a positive int or None, got {pair_filters!r}")
    if backend not in ("auto",) + BACKEND_NAMES:
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
    channels = as_int(channels)
    fold_width, padding = check_fold(mode, channels, fold_width, padding)
    return channels, as_int(reduction), None if pair_filters is None else as_int(pair_filters), fold_width, padding


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
        channels, reduction, pair_filters, fold_width, padding = check_config(
            channels, mode, reduction, pair_filters, fold_width, padding, backend)
        build_layers(self, channels, mode, reduction, pair_filters, fold_width, padding, bn_eps, bn_momentum)
        self.backend = backend
        #: call plans (hostpath.HostPlan) for eval and training: set by the first successful call
        self._host_plans = [None, None]

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

    def _warn_child_hooks(self):
        """The fused op never calls ``fc1``, ``fc2``, ``pair_conv`` or ``pair_bn`` as modules, so
        hooks registered on them do not fire: say so once per layer (eager calls only)."""
        hooked = [name for name, child in self._modules.items() if child is not None and (
            child._forward_hooks or child._forward_pre_hooks or child._backward_hooks
            or child._backward_pre_hooks)]
        if hooked:
            self._child_hooks_warned = True
            warnings.warn(f"{type(self).__name__}: hooks registered on its children {hooked} do not fire: the fused "
                          f"layer computes them inside one op and never calls them as modules. Register hooks on "
                          f"the layer itself (or use CMPESEReference, whose pair_bn is called).", stacklevel=3)

    def _apply(self, *args, **kwargs):  # .to(), .cuda(), .double(), ...: the call plans are stale
        self._host_plans = [None, None]
        return super()._apply(*args, **kwargs)

    def forward(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # the thin path (hostpath.py): a plan recorded by a successful full call with inputs like these
        plans = None if torch.compiler.is_compiling() else self.__dict__.get("_host_plans")
        if plans is not None:
            plan = plans[self.training]
            if plan is not None:
                y = plan.replay(self, u, x)
                if y is not None:
                    return y
        return self._forward_full(u, x, plans)

    def _forward_full(self, u, x, plans):
        """Every check, the backend choice, autocast; records a call plan in ``plans`` when it can."""
        if isinstance(u, torch.Tensor) and u.dim() == 4 and u.shape[1] != self.channels:
            raise ValueError(f"u must have {self.channels} channels (this CMPESE's channels), got shape "
                             f"{tuple(u.shape)}")
        if not torch.compiler.is_compiling() and not getattr(self, "_child_hooks_warned", False):
            self._warn_child_hooks()
        bn_kwargs = {}
        pair = self.mode in PAIR_MODES
        cumulative, bn, running_mean, running_var = False, None, None, None
        if pair:
            bn = self.pair_bn
            running_mean, running_var = bn.running_mean, bn.running_var
            momentum = 0.0 if bn.momentum is None else bn.momentum
            cumulative = self.training and bn.momentum is None
            if cumulative:
                # cumulative moving average (nn.BatchNorm2d's momentum=None): the op writes this batch's
                # statistics into fresh buffers (momentum 1), the average is formed below with tensor ops,
                # so no float() of num_batches_tracked: torch.compile(fullgraph=True) traces it
                running_mean, running_var = torch.zeros_like(running_mean), torch.zeros_like(running_var)
                momentum = 1.0
            bn_kwargs = dict(pair_weight=self.pair_conv.weight, bn_weight=bn.weight, bn_bias=bn.bias,
                             running_mean=running_mean, running_var=running_var, eps=bn.eps, momentum=momentum)
        fc1_identity = self.fc1_identity.weight if self.mode == "double_fc" else None
        weights = (self.fc1.weight, fc1_identity, self.fc2.weight, bn_kwargs.get("pair_weight"),
                   bn_kwargs.get("bn_weight"), bn_kwargs.get("bn_bias"))

        def on_validated(chosen, u_run):
            if pair and self.training:
                # counted before the kernel, as nn.BatchNorm2d does (activation checkpointing's recompute
                # counts too), and only once every check has passed (a failed call leaves it alone)
                bn.num_batches_tracked.add_(1)
            if plans is None:
                return
            plans[self.training] = None  # a plan for other inputs would miss on these anyway
            if not cumulative and _plannable(chosen, u_run, u, x, weights):
                running = (running_mean, running_var) if pair else (u.new_empty(0, dtype=weights[0].dtype),) * 2
                plans[self.training] = HostPlan(self, u, chosen, weights, running)

        y = _cmpe_se(u, x, self.fc1.weight, self.fc2.weight, fc1_identity, mode=self.mode, training=self.training,
                     fold_width=self.fold_width, padding=self.padding, backend=self.backend,
                     on_validated=on_validated, **bn_kwargs)
        if cumulative and u.shape[0] > 0:  # an empty batch leaves the statistics alone (nn.BatchNorm2d)
            with torch.no_grad():
                # nn.BatchNorm2d: factor = 1.0 / float(num_batches_tracked), the update in double
                f = 1.0 / bn.num_batches_tracked.to(torch.float64)
                for run, batch in ((bn.running_mean, running_mean), (bn.running_var, running_var)):
                    run.copy_(batch.to(torch.float64) * f + run.to(torch.float64) * (1.0 - f))
        return y


def _plannable(chosen, u_run, u, x, weights) -> bool:
    """Whether the full call just validated may be replayed by a HostPlan: a compiled backend, plain
    tensors, no autocast cast, a non-empty batch, every weight already in the acc dtype."""
    if chosen.name == "reference" or u_run is not u or type(u) is not torch.Tensor or type(x) is not torch.Tensor:
        return False
    if u.shape[0] == 0 or torch.is_autocast_enabled(u.device.type):
        return False
    acc = acc_dtype(u.dtype)
    return all(w is None or w.dtype == acc for w in weights)
