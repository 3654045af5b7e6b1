"""Drop-in use: swap the eager CMPE-SE layers of a model for the fused :class:`~cmpe_se_fused.CMPESE`
(``convert_model``) and back to :class:`~cmpe_se_fused.reference.CMPESEReference` (``revert_model``).

Nothing is copied or re-initialised: the new layer *adopts the old layer's child modules*
(``fc1``, ``fc2``, ``fc1_identity``, ``pair_conv``, ``pair_bn``), so every parameter and buffer
keeps its identity, values, device, dtype and ``requires_grad`` (an optimizer built before the
conversion still holds the right tensors when ``inplace=True``), and the state_dict keys and
bits do not change. The train/eval flag is copied. Hooks registered on a swapped layer itself are
not carried over; hooks on its children move with the children but do not fire in a fused
``CMPESE``, which never calls its children as modules (it warns once; docs/TRAINING.md).

Duck-typing rule: a module is an eager CMPE-SE layer when it has a string attribute ``mode`` in
:data:`~cmpe_se_fused.reference.MODES` and child modules with the SPEC names of that mode
(``fc1``, ``fc2``; ``fc1_identity`` for ``double_fc``; ``pair_conv``, ``pair_bn`` for the pair
modes). Such a module must then be a faithful one, or conversion raises ``ValueError``: its
state_dict holds exactly the SPEC keys (so ``nn.Linear`` without bias, a bias-free
``nn.Conv2d(1, e, kernel)`` with stride 1, an affine ``BatchNorm2d`` tracking running stats), the
shapes agree with SPEC section 1, and its ``forward(u, x)`` computes the SPEC layer. ``fold_width``
is read from the attribute of that name (``folded_3x3``; inferred from ``fc1`` when absent and
unambiguous), ``padding`` from ``pair_conv``, eps and momentum from ``pair_bn``. A
``pair_bn`` that is an ``nn.SyncBatchNorm`` turns the layer into a
:class:`~cmpe_se_fused.distributed.SyncCMPESE` (same process group), the fused equivalent.
"""
from __future__ import annotations

import copy
import warnings

from torch import nn

from .dispatch import BACKEND_NAMES
from .distributed import SyncCMPESE
from .layer_swap import SPEC_CHILDREN, _adopt, _plain_bn, _swap, is_cmpe_se_layer, layer_config
from .modules import CMPESE
from .reference import MODES, CMPESEReference

__all__ = ["SPEC_CHILDREN", "add_cmpe_se", "convert_model", "is_cmpe_se_layer", "layer_config", "revert_model"]
# SPEC_CHILDREN, is_cmpe_se_layer, layer_config live in layer_swap (distributed uses them too); this is their
# public home, as the module docstring's duck-typing rule is


def _check_backend(backend):
    if backend not in ("auto",) + BACKEND_NAMES:
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {backend!r}")


def convert_model(model: nn.Module, backend: str = "auto", inplace: bool = False) -> nn.Module:
    """Swap every CMPE-SE layer of ``model`` for the fused :class:`CMPESE` running ``backend``.

    Eager layers (:class:`CMPESEReference` or duck-typed, see the module docstring) become
    ``CMPESE``; a ``CMPESE`` with another backend is rebuilt with ``backend`` (a ``SyncCMPESE``
    stays one, same process group); a ``CMPESE`` already on ``backend`` is left alone. Returns the
    converted model (``model`` itself when it is a layer gets replaced, so use the return value).
    ``inplace=False`` (default) deep-copies ``model`` first and leaves it untouched. A model
    with no CMPE-SE layer is returned unchanged with a ``UserWarning`` naming :func:`add_cmpe_se`
    (which puts the layers into a torchvision or timm ResNet).
    """
    _check_backend(backend)
    if not inplace:
        model = copy.deepcopy(model)
    found = []

    def fn(m):
        if not is_cmpe_se_layer(m):
            return None
        found.append(m)
        bn = getattr(m, "pair_bn", None)
        if isinstance(m, CMPESE) and m.backend == backend and not isinstance(bn, nn.SyncBatchNorm):
            return m
        cfg = layer_config(m)
        if isinstance(m, SyncCMPESE):
            return _adopt(SyncCMPESE, m, cfg, backend=backend, process_group=m.process_group)
        if isinstance(bn, nn.SyncBatchNorm):  # torch's converter reached pair_bn: the fused op would ignore it
            new = _adopt(SyncCMPESE, m, cfg, backend=backend, process_group=bn.process_group)
            new.pair_bn = _plain_bn(bn)
            return new
        return _adopt(CMPESE, m, cfg, backend=backend)

    model = _swap(model, fn)
    if not found:
        warnings.warn(f"convert_model: {type(model).__module__}.{type(model).__name__} has no CMPE-SE layer, "
                      "nothing was converted; to add CMPE-SE layers to a torchvision or timm ResNet use "
                      "cmpe_se_fused.convert.add_cmpe_se(model, mode=...)", UserWarning, stacklevel=2)
    return model


def revert_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Swap every :class:`CMPESE` (``SyncCMPESE`` included) back to a :class:`CMPESEReference`.

    The inverse of :func:`convert_model` for ``CMPESEReference`` layers: the round trip gives
    bitwise the same state_dict and outputs. Duck-typed eager layers are left as they are. A
    ``SyncCMPESE`` becomes a plain (local-statistics) ``CMPESEReference``. A model with no
    ``CMPESE`` is returned unchanged with a ``UserWarning`` (naming :func:`add_cmpe_se` when it has no
    CMPE-SE layer at all).
    """
    if not inplace:
        model = copy.deepcopy(model)
    found = []

    def fn(m):
        if not isinstance(m, CMPESE):
            return None
        found.append(m)
        return _adopt(CMPESEReference, m, layer_config(m))

    model = _swap(model, fn)
    if not found:
        eager = sum(is_cmpe_se_layer(m) for m in model.modules())
        why = (f"its {eager} CMPE-SE layer(s) are already eager" if eager else
               "it has no CMPE-SE layer (to add CMPE-SE layers to a torchvision or timm ResNet use "
               "cmpe_se_fused.convert.add_cmpe_se(model, mode=...))")
        warnings.warn(f"revert_model: {type(model).__module__}.{type(model).__name__} has no fused CMPESE layer "
                      f"to revert, nothing was changed: {why}", UserWarning, stacklevel=2)
    return model


_LAYER_KWARGS = ("reduction", "pair_filters", "fold_width", "padding", "bn_eps", "bn_momentum")


def add_cmpe_se(model: nn.Module, mode: str = "folded_3x3", backend: str = "auto", inplace: bool = False,
                **layer_kwargs) -> nn.Module:
    """Put a CMPE-SE layer in every residual block of a torchvision or timm ResNet.

    Every ``torchvision.models.resnet.BasicBlock``/``Bottleneck`` (resnet18..152, resnext*,
    wide_resnet*) and ``timm.models.resnet.BasicBlock``/``Bottleneck`` (timm's resnet*, resnext*,
    seresnet*, ...) in ``model`` becomes a :class:`~cmpe_se_fused.vision.CMPESEResidualBlock`:
    the same modules under the same names plus ``cmpe_se``, a :class:`CMPESE` on the residual
    output U and the shortcut X, in place of the sum: ``act(CMPESE(U, X))``. timm's SE module
    (``seresnet*``) is dropped, CMPE-SE replaces it.

    Defaults (SPEC section 5, as ``preact_resnet50``): fold width 16, pair filters ``C / 64`` in
    bottlenecks (``width / 16``, width = C / 4) and ``C / 16`` in basic blocks, reduction 16.
    ``layer_kwargs`` go to :class:`CMPESE` (``reduction``, ``pair_filters``, ``fold_width``,
    ``padding``, ``bn_eps``, ``bn_momentum``); ``fold_width`` and ``pair_filters`` may also be a
    function of the block's channel count C. The new layers take the device and dtype of the
    block's last BatchNorm.

    Weights: ``converted.load_state_dict(plain_state_dict, strict=False)`` loads a plain
    checkpoint; the missing keys are exactly the ``cmpe_se`` layers' (for a timm SE checkpoint the
    SE weights are the unexpected keys). ``convert_model``/``revert_model`` switch the layers'
    backend as on the package's own networks. ``inplace=False`` (default) deep-copies ``model``.

    Raises ``ValueError`` before changing anything: an unknown ``mode``/``backend``; a ResNet
    stage (``layer1``, ...) holding a block of an unknown type (named in the message); a model
    that already has CMPE-SE blocks; a model with no known ResNet block.
    """
    from .vision import CMPESEResidualBlock, block_spec, resnet_classes

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_backend(backend)
    unknown = sorted(set(layer_kwargs) - set(_LAYER_KWARGS))
    if unknown:
        raise TypeError(f"add_cmpe_se got unknown layer argument(s) {unknown}; expected some of {_LAYER_KWARGS}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    nets = tuple(getattr(mod, "ResNet") for mod in resnet_classes().values() if hasattr(mod, "ResNet"))
    done = next((name for name, m in model.named_modules() if isinstance(m, CMPESEResidualBlock)), None)
    if done is not None:
        raise ValueError(f"model already has CMPE-SE blocks ({done or 'the model'}); call add_cmpe_se once, "
                         "and convert_model to change the backend")
    found = 0
    for name, m in model.named_modules():
        found += block_spec(m) is not None
        if nets and isinstance(m, nets):
            for stage_name, stage in m.named_children():
                if not (stage_name.startswith("layer") and isinstance(stage, nn.Sequential)):
                    continue
                for i, block in enumerate(stage):
                    if block_spec(block) is None:
                        where = f"{name}.{stage_name}.{i}" if name else f"{stage_name}.{i}"
                        raise ValueError(f"unknown residual block type {type(block).__module__}."
                                         f"{type(block).__name__} at {where}; add_cmpe_se knows "
                                         "torchvision.models.resnet.BasicBlock/Bottleneck and "
                                         "timm.models.resnet.BasicBlock/Bottleneck (exact types)")
    if not found:
        raise ValueError(f"no torchvision or timm ResNet block in {type(model).__module__}.{type(model).__name__}; "
                         "add_cmpe_se knows torchvision.models.resnet.BasicBlock/Bottleneck and "
                         "timm.models.resnet.BasicBlock/Bottleneck")
    if not inplace:
        model = copy.deepcopy(model)
    # every new block first (bad layer arguments raise here, the model untouched), then the swap
    new = {id(m): CMPESEResidualBlock(m, mode=mode, backend=backend, **layer_kwargs)
           for m in model.modules() if block_spec(m) is not None}
    return _swap(model, lambda m: new.get(id(m)))
