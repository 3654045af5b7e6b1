"""The thin call path of :class:`cmpe_se_fused.CMPESE` (docs/ARCHITECTURE.md, "The host path").

The first call of a layer (per training flag) runs the full path: every argument validated with
its name in the message, autocast, the backend chosen. When that call succeeds, a :class:`HostPlan`
records what it depended on; later calls with the same inputs' shape, dtype and device only check
that nothing the plan recorded changed (the same weight and buffer objects, the same
``bn.momentum`` and ``bn.eps``, no autocast, no torch.func transform, no new child hooks) and call
the op with the recorded arguments. Anything else goes the full way (and may record a new plan).

Invalidated by: another shape, dtype or device of the inputs; ``module.to()`` / ``.cuda()`` /
``.double()`` (``CMPESE._apply``); replacing a parameter or buffer (identity check); changing
``bn.momentum`` or ``bn.eps``; :func:`clear_host_caches` (which also drops the backend choices, so
``CMPE_SE_BACKEND`` is read again).
"""
from __future__ import annotations

import torch

from . import dispatch

Tensor = torch.Tensor


def clear_host_caches() -> None:
    """Forget every layer's call plan and every backend choice: the next call of each layer runs
    the full path again and reads ``CMPE_SE_BACKEND`` again."""
    dispatch.clear_choice_cache()


def _none():
    return None


def _functorch_active() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None


class HostPlan:
    """What a successful full call of ``module`` established for inputs like ``u``."""

    __slots__ = ("generation", "shape", "dtype", "device", "device_type", "training", "slots", "bn", "momentum",
                 "eps", "children", "op", "args", "tail", "counter")

    def __init__(self, module, u, backend, weights, running):
        self.generation = dispatch.choice_generation()
        self.shape, self.dtype, self.device, self.device_type = u.shape, u.dtype, u.device, u.device.type
        self.training = module.training
        fc1_w, fc1_id_w, fc2_w, pair_w, bn_w, bn_b = weights
        rm, rv = running
        bn = module._modules.get("pair_bn") if module.mode in ("pair_2x1", "pair_1x1", "folded_3x3") else None
        self.bn = bn
        # (dict, key, object): the call is valid while every one of them is still that object
        slots = [(module._modules["fc1"]._parameters, "weight", fc1_w), (module._modules["fc2"]._parameters,
                                                                         "weight", fc2_w)]
        if fc1_id_w is not None:
            slots.append((module._modules["fc1_identity"]._parameters, "weight", fc1_id_w))
        self.counter = None
        if bn is not None:
            slots += [(module._modules["pair_conv"]._parameters, "weight", pair_w), (bn._parameters, "weight", bn_w),
                      (bn._parameters, "bias", bn_b), (bn._buffers, "running_mean", rm),
                      (bn._buffers, "running_var", rv)]
            if self.training:
                self.counter = bn._buffers["num_batches_tracked"]
                slots.append((bn._buffers, "num_batches_tracked", self.counter))
            self.momentum, self.eps = bn.momentum, bn.eps
        else:
            self.momentum, self.eps = 0.1, 1e-5
        self.slots = tuple(slots)
        self.children = tuple(c for c in module._modules.values() if c is not None)
        self.op = backend.ops[0]
        mom = 0.0 if self.momentum is None else float(self.momentum)
        self.args = (fc1_w, fc1_id_w, fc2_w, pair_w, bn_w, bn_b, rm, rv, module.mode, bool(self.training))
        self.tail = (mom, float(self.eps), int(module.fold_width), int(module.padding))

    def __reduce__(self):  # deepcopy / pickle of a layer carry no plan (it holds the op and live tensors)
        return (_none, ())

    def matches(self, module, u, x) -> bool:
        """Whether a call ``module(u, x)`` may skip the full path (cheap checks only)."""
        if type(u) is not Tensor or type(x) is not Tensor or self.generation != dispatch.choice_generation():
            return False
        if u.shape != self.shape or x.shape != self.shape or u.dtype != self.dtype or x.dtype != self.dtype:
            return False
        if u.device != self.device or x.device != self.device:
            return False
        if torch.is_autocast_enabled(self.device_type) or _functorch_active():
            return False
        for d, key, obj in self.slots:
            if d.get(key) is not obj:
                return False
        bn = self.bn
        if bn is not None and (bn.momentum != self.momentum or bn.eps != self.eps):
            return False
        if not module.__dict__.get("_child_hooks_warned"):
            for c in self.children:  # hooks registered on a child since: the full path warns (once per layer)
                if c._forward_hooks or c._forward_pre_hooks or c._backward_hooks or c._backward_pre_hooks:
                    return False
        return True

    def run(self, u, x):
        if self.counter is not None:  # before the kernel, as nn.BatchNorm2d counts
            self.counter.add_(1)
        return self.op(u, x, *self.args, *self.tail)[0]
