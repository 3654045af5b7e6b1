"""The thin call path of :class:`cmpe_se_fused.CMPESE` (docs/ARCHITECTURE.md, "The host path").

The first call of a layer (per training flag) runs the full path: every argument validated with
its name in the message, autocast, the backend chosen. When that call succeeds, a :class:`HostPlan`
records what it depended on; later calls with the same inputs' shape, dtype and device only check
that nothing the plan recorded changed (the same weight and buffer objects, the same
``bn.momentum`` and ``bn.eps``, the same ``backend``/``mode``/``fold_width``/``padding``
attributes, the same ``CMPE_SE_BACKEND`` and ``TRITON_INTERPRET``, no autocast, no torch.func
transform, no new child hooks) and call the op with the recorded arguments. Anything else goes the
full way (and may record a new plan). An eval call that cannot need a gradient (``torch.no_grad()``,
``torch.inference_mode()``) calls ``cmpe_se::infer``, the forward's ``y`` alone (same kernels, same
bits), where the backend has it (cpu, cuda). For those backends the replay calls the ops through
``cmpe_se_fused._fastpath`` (``csrc/fastpath.cpp``): the recorded arguments held in C++, so a call
binds two tensors instead of the op's 16 arguments; torch.ops when that module is not built or a
torch function mode is active (it skips Python's ``__torch_function__`` handling).

Invalidated by: another shape, dtype or device of the inputs; ``module.to()`` / ``.cuda()`` /
``.double()`` (``CMPESE._apply``); replacing a parameter or buffer, or reassigning one of those
attributes (identity checks); setting ``CMPE_SE_BACKEND`` or ``TRITON_INTERPRET`` (read on every
call, as the functional form reads them); :func:`clear_host_caches` (which also drops the backend
choices). A tensor changed in place behind the plan's back (``weight.data = ...`` of another shape,
dtype or device) is caught by the op's own C++ checks, which run before it writes anything: the
plan then gives the call back to the full path (the count undone), which raises its usual error
or, for a castable dtype, runs the call as a fresh layer would.
"""
from __future__ import annotations

import operator
import os

import torch

from . import dispatch, ops

_fastpath = ops.FASTPATH  # None when not built (pure-Python install, CMPE_SE_BUILD_ONLY=cuda): torch.ops

Tensor = torch.Tensor


def clear_host_caches() -> None:
    """Forget every layer's call plan and every backend choice: the next call of each layer runs
    the full path again and reads ``CMPE_SE_BACKEND`` again."""
    dispatch.clear_choice_cache()


def _none():
    return None


_peek_interpreter_stack = torch._C._functorch.peek_interpreter_stack
_is_grad_enabled = torch.is_grad_enabled
_torch_function_mode = torch._C._is_torch_function_mode_enabled
_generation = dispatch._generation

#: the environment variables the backend choice reads (dispatch.choose's cache key), read per call
#: from os.environ's own dict (26 ns, against 1 us for os.environ.get); the same values as
#: os.environ.get sees, since os.environ[k] = v updates that dict
ENV_VARS = ("CMPE_SE_BACKEND", "TRITON_INTERPRET")
try:
    _env_get, _env_keys = os.environ._data.get, tuple(os.environ.encodekey(k) for k in ENV_VARS)
except AttributeError:  # not CPython's os._Environ: the public (slower) read
    _env_get, _env_keys = os.environ.get, ENV_VARS

#: the layer's attributes a call reads (identity-checked, as the parameters are)
LAYER_ATTRS = ("backend", "mode", "channels", "fold_width", "padding")
#: exceptions the op's checks raise (TORCH_CHECK, TORCH_CHECK_VALUE / _TYPE, Triton's Python checks)
_OP_ERRORS = (RuntimeError, ValueError, TypeError)


class HostPlan:
    """What a successful full call of ``module`` established for inputs like ``u``."""

    __slots__ = ("generation", "shape", "dtype", "device", "device_type", "training", "dicts", "keys", "objs",
                 "env", "hook_dicts", "backend", "op", "args", "counter", "infer", "infer_args", "fast")

    def __init__(self, module, u, backend, weights, running):
        self.generation = dispatch.choice_generation()
        self.shape, self.dtype, self.device, self.device_type = u.shape, u.dtype, u.device, u.device.type
        self.training = module.training
        fc1_w, fc1_id_w, fc2_w, pair_w, bn_w, bn_b = weights
        rm, rv = running
        bn = module._modules.get("pair_bn") if module.mode in ("pair_2x1", "pair_1x1", "folded_3x3") else None
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
            slots += [(bn.__dict__, "momentum", bn.momentum), (bn.__dict__, "eps", bn.eps)]
            momentum, eps = bn.momentum, bn.eps
        else:
            momentum, eps = 0.1, 1e-5
        slots += [(module.__dict__, name, module.__dict__[name]) for name in LAYER_ATTRS]
        # (dict, key, object) as three tuples, checked with one map(): the call is valid while every
        # dict[key] is still that object
        self.dicts, self.keys, self.objs = (tuple(col) for col in zip(*slots))
        # every hook dict of the children, mutated in place by register_*_hook
        self.hook_dicts = tuple(getattr(c, name) for c in module._modules.values() if c is not None
                                for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                             "_backward_pre_hooks"))
        self.env = tuple(map(_env_get, _env_keys))
        self.backend = backend.name
        self.op = getattr(backend.ops[0], "_op", backend.ops[0])  # the C++ callable: no OpOverload.__call__ frame
        mom = 0.0 if momentum is None else float(momentum)
        self.args = (fc1_w, fc1_id_w, fc2_w, pair_w, bn_w, bn_b, rm, rv, module.mode, bool(self.training), mom,
                     float(eps), int(module.fold_width), int(module.padding))
        # eval calls without grad mode: the inference op (y only), where the backend has one
        infer = None if self.training else ops.INFER_OPS.get(self.backend)
        self.infer = None if infer is None else getattr(infer, "_op", infer)
        self.infer_args = (fc1_w, fc1_id_w, fc2_w, pair_w, bn_w, bn_b, rm if bn is not None else None,
                           rv if bn is not None else None, module.mode, float(eps), int(module.fold_width),
                           int(module.padding))
        # the same calls with the arguments held in C++ (cpu and cuda: cmpe_se::forward / cmpe_se::infer)
        self.fast = _fastpath.Plan(*self.args) if _fastpath is not None and self.backend in ("cpu", "cuda") else None

    def __reduce__(self):  # deepcopy / pickle of a layer carry no plan (it holds the op and live tensors)
        return (_none, ())

    def replay(self, module, u, x):
        """``module(u, x)``'s output when the call may skip the full path (cheap checks only), else None."""
        if type(u) is not Tensor or type(x) is not Tensor or self.generation != _generation[0]:
            return None
        if u.dtype is not self.dtype or x.dtype is not self.dtype or u.shape != self.shape or x.shape != self.shape:
            return None
        if not (u.is_cpu and x.is_cpu) if self.device_type == "cpu" else (u.device != self.device
                                                                          or x.device != self.device):
            return None
        if torch.is_autocast_enabled(self.device_type) or _peek_interpreter_stack() is not None:
            return None  # autocast casts, torch.func raises: the full path
        if not all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.objs)):
            return None  # a parameter, buffer, bn.momentum / bn.eps or layer attribute was reassigned
        if tuple(map(_env_get, _env_keys)) != self.env:
            return None  # CMPE_SE_BACKEND / TRITON_INTERPRET set since: the full path chooses again
        if any(self.hook_dicts) and not module.__dict__.get("_child_hooks_warned"):
            return None  # a hook registered on a child since: the full path warns (once per layer)
        counter = self.counter
        infer = self.infer is not None and not _is_grad_enabled()
        fast = self.fast
        if fast is not None and not _torch_function_mode():
            try:  # the batch count (before the kernel, undone on an error) happens in C++ here
                return fast.infer(u, x) if infer else fast.forward(u, x, counter)
            except _OP_ERRORS:
                return None  # as below: the full path gives this call its own error (or runs it)
        if counter is not None:  # before the kernel, as nn.BatchNorm2d counts
            counter.add_(1)
        try:
            if infer:
                return self.infer(u, x, *self.infer_args)
            return self.op(u, x, *self.args)[0]
        except _OP_ERRORS:
            # a tensor changed in place (weight.data = ...): the op's checks ran before it wrote
            # anything; the full path gives this call its own error (or runs it)
            if counter is not None:
                counter.sub_(1)
            return None
