"""CMPE-SE in torchvision's and timm's ResNets: the residual-block wrapper :func:`add_cmpe_se` uses.

A wrapped block keeps the original block's child modules under their original names (so the
original state_dict keys are unchanged) and adds one child, ``cmpe_se`` (a :class:`CMPESE`).
Its forward is the original block's with the sum ``U + X`` replaced by the layer::

    U = residual branch(x)            # conv-bn-act ... conv-bn, exactly the original's modules
    X = downsample(x) if downsample else x
    y = act(cmpe_se(U, X))            # original: act(U + X)  (post-activation blocks)

timm's blocks keep their ``drop_block``, ``aa`` (anti-aliasing) and ``drop_path`` (stochastic
depth). timm applies ``drop_path`` to the branch after its SE module, so here it drops the gated
branch: ``y = X + drop_path(cmpe_se(U, X) - X)`` in training (eval: ``y = cmpe_se(U, X)``).
timm's ``se`` child (an ``SEModule`` in ``seresnet*``/``seresnext*``) is left out: CMPE-SE replaces it.

The blocks known (exact types; a subclass may change ``forward``, so it is refused):
``torchvision.models.resnet.BasicBlock`` / ``Bottleneck`` and ``timm.models.resnet.BasicBlock`` /
``Bottleneck``.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from .modules import CMPESE

__all__ = ["CMPESEResidualBlock", "block_spec", "default_fold_width", "default_pair_filters", "resnet_classes"]

#: per (family, block class name): (branch modules in order, final activation, bottleneck?)
_BRANCH = {
    ("torchvision", "BasicBlock"): (("conv1", "bn1", "relu", "conv2", "bn2"), "relu", False),
    ("torchvision", "Bottleneck"): (("conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3"), "relu", True),
    ("timm", "BasicBlock"): (("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2"), "act2", False),
    ("timm", "Bottleneck"): (("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa", "conv3", "bn3"),
                             "act3", True),
}
_MODULES = {"torchvision": "torchvision.models.resnet", "timm": "timm.models.resnet"}


def resnet_classes() -> dict:
    """``{family: module}`` for the ResNet implementations already imported (a model of a family
    cannot exist before its module is imported, so nothing is imported here)."""
    return {fam: sys.modules[name] for fam, name in _MODULES.items() if name in sys.modules}


def block_spec(block: nn.Module):
    """``(family, branch, act, bottleneck)`` for a known residual block, else None."""
    for fam, mod in resnet_classes().items():
        for cls_name in ("BasicBlock", "Bottleneck"):
            if type(block) is getattr(mod, cls_name, None):
                return (fam, *_BRANCH[(fam, cls_name)])
    return None


def default_fold_width(channels: int) -> int:
    """SPEC section 5: ``m = 16`` (pre-activation ResNet); these widths (64 * 2^k, 256 * 2^k) are
    multiples of 16."""
    return 16


def default_pair_filters(channels: int, bottleneck: bool) -> int:
    """SPEC section 5: ``e = width / 16`` with ``width = C / 4`` for bottlenecks (``C / 64``, the
    same as ``preact_resnet50``; ResNeXt's and wide_resnet50_2's wider inner convs do not change
    it: the layer sees C channels), and ``e = C / 16`` for basic blocks (the layer's default)."""
    return max(1, channels // (64 if bottleneck else 16))


def _out_channels(block, bottleneck):
    bn = getattr(block, "bn3" if bottleneck else "bn2")
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise ValueError(f"{type(block).__module__}.{type(block).__name__}: expected a BatchNorm as "
                         f"{'bn3' if bottleneck else 'bn2'}, got {type(bn).__name__}")
    return bn.num_features


class CMPESEResidualBlock(nn.Module):
    """A torchvision/timm residual block with a CMPE-SE layer on ``(U, X)`` before the final activation.

    ``CMPESEResidualBlock(block, mode, backend, **layer_kwargs)`` adopts ``block``'s children
    (``add_cmpe_se`` builds one per block); ``block_type`` names the wrapped class.
    """

    def __init__(self, block: nn.Module, mode: str = "folded_3x3", backend: str = "auto", **layer_kwargs):
        super().__init__()
        spec = block_spec(block)
        if spec is None:
            raise ValueError(f"unknown residual block type {type(block).__module__}.{type(block).__name__}; "
                             "known: torchvision.models.resnet.BasicBlock/Bottleneck, "
                             "timm.models.resnet.BasicBlock/Bottleneck")
        family, branch, act, bottleneck = spec
        self.block_type = f"{type(block).__module__}.{type(block).__name__}"
        self._branch, self._act = branch, act
        missing = [n for n in (*branch, act) if not isinstance(getattr(block, n, None), nn.Module)]
        if missing:
            raise ValueError(f"{self.block_type} has no module(s) {missing}: this version of {family} is not the "
                             "one cmpe_se_fused.vision was written for")
        attn = getattr(block, "se", None)
        if attn is not None and type(attn).__name__ != "SEModule":
            raise ValueError(f"{self.block_type} has attention {type(attn).__name__} in its 'se' slot; CMPE-SE "
                             "replaces only timm's SEModule (seresnet*, seresnext*)")
        for name, child in block.named_children():
            if name != "se":
                setattr(self, name, child)
        self.downsample = getattr(block, "downsample", None)
        self.drop_path = getattr(block, "drop_path", None)
        for attr in ("stride", "dilation"):
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))
        channels = _out_channels(block, bottleneck)
        kw = dict(layer_kwargs)
        for key, default in (("fold_width", default_fold_width(channels)),
                             ("pair_filters", default_pair_filters(channels, bottleneck))):
            value = kw.get(key)
            kw[key] = default if value is None else value(channels) if callable(value) else value
        ref = getattr(block, "bn3" if bottleneck else "bn2").weight
        layer = CMPESE(channels, mode=mode, backend=backend, **kw)
        if ref is not None:
            layer = layer.to(device=ref.device, dtype=ref.dtype)
        self.cmpe_se = layer.train(block.training)
        self.training = block.training  # not .train(): children keep their own flags (frozen BatchNorms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x
        for name in self._branch:
            u = getattr(self, name)(u)
        identity = x if self.downsample is None else self.downsample(x)
        y = self.cmpe_se(u, identity)
        if self.drop_path is not None and self.training:
            y = identity + self.drop_path(y - identity)
        return getattr(self, self._act)(y)

    def extra_repr(self) -> str:
        return f"wraps {self.block_type}"
