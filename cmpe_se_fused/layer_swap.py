"""Layer swapping, what :mod:`cmpe_se_fused.convert` and :mod:`cmpe_se_fused.distributed` both do: recognise a
CMPE-SE layer, read the constructor arguments of an equivalent one from its children, build that layer around
the same children, and replace modules throughout a model.

Users import these names from :mod:`cmpe_se_fused.convert`, whose docstring states the duck-typing rule and
what adoption keeps. They live here so that ``convert`` (which makes :class:`~cmpe_se_fused.distributed.SyncCMPESE`
layers) and ``distributed`` (which converts to and from them) both import them and not each other: the
package's import graph has no cycle (``python tests/import_graph.py``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import CMPESE
from .reference import KERNEL_SIZE, MODES, PAIR_MODES, relation_dim

__all__ = ["SPEC_CHILDREN", "is_cmpe_se_layer", "layer_config"]

#: child modules of a CMPE-SE layer, by mode (SPEC section 1)
SPEC_CHILDREN = {
    "se": ("fc1", "fc2"),
    "double_fc": ("fc1", "fc1_identity", "fc2"),
    **{m: ("fc1", "fc2", "pair_conv", "pair_bn") for m in PAIR_MODES},
}
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def is_cmpe_se_layer(module: nn.Module) -> bool:
    """True for a :class:`CMPESE` and for any module meeting the duck-typing rule (module docstring)."""
    if isinstance(module, CMPESE):
        return True
    mode = getattr(module, "mode", None)
    if not isinstance(mode, str) or mode not in MODES:
        return False
    children = dict(module.named_children())
    return all(isinstance(children.get(name), nn.Module) for name in SPEC_CHILDREN[mode])


def _spec_keys(mode):
    keys = {f"{c}.weight" for c in SPEC_CHILDREN[mode] if c != "pair_bn"}
    if mode in PAIR_MODES:
        keys |= {f"pair_bn.{k}" for k in _BN_KEYS}
    return keys


def _reduction_for(channels, hidden, preferred=None):
    """A reduction ``t`` with ``max(1, C // t) == hidden`` (the constructor's rule), or None."""
    candidates = ([preferred] if isinstance(preferred, int) and preferred >= 1 else []) + list(range(1, channels + 2))
    return next((t for t in candidates if max(1, channels // t) == hidden), None)


def layer_config(module: nn.Module) -> dict:
    """Constructor arguments of an equivalent :class:`CMPESE`, read from a CMPE-SE layer's children.

    Raises ``ValueError`` (naming the layer's class and the problem) when the module meets the
    duck-typing rule but is not a faithful CMPE-SE layer.
    """
    if not is_cmpe_se_layer(module):
        raise ValueError(f"{type(module).__name__} is not a CMPE-SE layer (see cmpe_se_fused.convert's docstring)")
    mode, where = module.mode, type(module).__name__

    def bad(msg):
        return ValueError(f"cannot convert {where} (mode {mode!r}): {msg}")

    keys, want = set(module.state_dict().keys()), _spec_keys(mode)
    if keys != want:
        raise bad(f"its state_dict must hold exactly {sorted(want)}; extra {sorted(keys - want)}, "
                  f"missing {sorted(want - keys)}")
    linears = [c for c in SPEC_CHILDREN[mode] if c.startswith("fc")]
    for name in linears:
        if not isinstance(getattr(module, name), nn.Linear):
            raise bad(f"{name} must be an nn.Linear, got {type(getattr(module, name)).__name__}")
    fc1, fc2 = module.fc1, module.fc2
    channels, hidden = fc2.out_features, fc1.out_features
    if fc2.in_features != (2 * hidden if mode == "double_fc" else hidden):
        raise bad(f"fc2 takes {fc2.in_features} features but fc1 gives {hidden}")
    if mode == "double_fc" and tuple(module.fc1_identity.weight.shape) != (hidden, channels):
        raise bad(f"fc1_identity.weight must be [{hidden}, {channels}], got {tuple(module.fc1_identity.weight.shape)}")
    cfg = dict(channels=channels, mode=mode, hidden=hidden, pair_filters=None, padding=0,
               fold_width=getattr(module, "fold_width", 16), bn_eps=1e-5, bn_momentum=0.1,
               reduction=_reduction_for(channels, hidden, getattr(module, "reduction", None)))
    if mode in PAIR_MODES:
        conv, bn = module.pair_conv, module.pair_bn
        if not isinstance(conv, nn.Conv2d) or conv.in_channels != 1 or conv.groups != 1:
            raise bad("pair_conv must be an nn.Conv2d with one input channel")
        if tuple(conv.kernel_size) != KERNEL_SIZE[mode] or tuple(conv.stride) != (1, 1) or \
                tuple(conv.dilation) != (1, 1) or not isinstance(conv.padding, tuple):
            raise bad(f"pair_conv must have kernel {KERNEL_SIZE[mode]}, stride 1, dilation 1, numeric padding")
        pad = conv.padding[0]
        if conv.padding[0] != conv.padding[1] or pad not in ((0, 1) if mode == "folded_3x3" else (0,)):
            raise bad(f"pair_conv padding {conv.padding} is not allowed (0, or 0/1 for folded_3x3)")
        if not isinstance(bn, _BatchNorm) or bn.num_features != conv.out_channels:
            raise bad(f"pair_bn must be a BatchNorm over the {conv.out_channels} pair_conv filters")
        cfg.update(pair_filters=conv.out_channels, padding=pad, bn_eps=bn.eps, bn_momentum=bn.momentum)
        if mode == "folded_3x3":
            cfg["fold_width"] = _fold_width(module, channels, pad, fc1.in_features, bad)
    if fc1.in_features != relation_dim(mode, channels, cfg["fold_width"], cfg["padding"]):
        raise bad(f"fc1 reads {fc1.in_features} features; SPEC needs "
                  f"{relation_dim(mode, channels, cfg['fold_width'], cfg['padding'])}")
    return cfg


def _fold_width(module, channels, pad, dz, bad):
    m = getattr(module, "fold_width", None)
    if isinstance(m, int):
        return m
    fits = [d for d in range(1, channels + 1) if channels % d == 0
            and 2 * (channels // d) - 2 + 2 * pad >= 1 and d - 2 + 2 * pad >= 1
            and relation_dim("folded_3x3", channels, d, pad) == dz]
    if len(fits) != 1:
        raise bad(f"no fold_width attribute and fc1's {dz} inputs fit fold widths {fits}; set module.fold_width")
    return fits[0]


def _adopt(cls, old: nn.Module, cfg: dict, **extra) -> nn.Module:
    """A ``cls`` layer (CMPESE, SyncCMPESE or CMPESEReference) that adopts ``old``'s children."""
    kwargs = dict(mode=cfg["mode"], reduction=cfg["reduction"] or 1, pair_filters=cfg["pair_filters"],
                  fold_width=cfg["fold_width"], padding=cfg["padding"], bn_eps=cfg["bn_eps"],
                  bn_momentum=cfg["bn_momentum"], **extra)
    with torch.device("meta"):  # no allocation, no RNG draw: every child is replaced below
        new = cls(cfg["channels"], **kwargs)
    new.hidden, new.reduction = cfg["hidden"], cfg["reduction"]  # reduction None: fc1's width is not C // t
    for name in SPEC_CHILDREN[cfg["mode"]]:
        setattr(new, name, getattr(old, name))
    new.train(old.training)
    return new


def _plain_bn(bn: nn.SyncBatchNorm) -> nn.BatchNorm2d:
    """An ``nn.BatchNorm2d`` sharing ``bn``'s parameters and buffers (the inverse of convert_sync_batchnorm)."""
    with torch.device("meta"):
        out = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    for k in ("weight", "bias"):
        setattr(out, k, getattr(bn, k))
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(out, k, getattr(bn, k))
    out.train(bn.training)
    return out


def _swap(model: nn.Module, fn) -> nn.Module:
    """Replace every module ``m`` with ``fn(m)`` when that is not None, without descending into
    replaced modules; a module reachable by two paths gets one replacement."""
    memo: dict[int, nn.Module] = {}

    def visit(module):
        if id(module) in memo:
            return memo[id(module)]
        new = fn(module)
        if new is None:
            for name, child in list(module._modules.items()):  # named_children() skips repeats
                repl = visit(child) if child is not None else None
                if repl is not child:
                    setattr(module, name, repl)
            new = module
        memo[id(module)] = new
        return new

    return visit(model)
