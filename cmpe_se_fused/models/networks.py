"""The paper's networks with a CMPE-SE layer in every residual block.

Every block computes its residual output ``U`` and its identity ``X`` (projected by a 1x1 conv
when the shape changes) and returns ``se(U, X)`` (``U + X`` when ``se_mode=None``: the plain
network). Defaults follow SPEC.md section 5: fold width 16 for pre-act ResNets and ``C/10`` for
WRN, pair filters ``C/16`` (WRN) and ``width/16`` (bottlenecks), reduction 16.
"""
from __future__ import annotations

from torch import nn

from ..modules import CMPESE


def wrn_fold_width(channels: int) -> int:
    """SPEC section 5: ``m = C/10`` (a 20-row fold). When 10 does not divide C (WRN-16-8: 128,
    256, 512) the divisor of C closest to C/10 is used (ties: the larger), so the fold stays legal."""
    divisors = [d for d in range(3, channels + 1) if channels % d == 0 and 2 * (channels // d) >= 3]
    return min(divisors, key=lambda d: (abs(d - channels / 10), -d))


def _make_se(channels, se_mode, se_kwargs, defaults):
    if se_mode is None:
        return None
    kwargs = dict(defaults)
    kwargs.update(se_kwargs)
    return CMPESE(channels, mode=se_mode, **kwargs)


def _fold_hint(se_mode, channels, uniform_fold):
    """For a folded_3x3 layer that cannot fold its stage: a fold width every stage accepts (when
    every stage uses the same one)."""
    if se_mode != "folded_3x3" or not uniform_fold:
        return ""
    fits = [m for m in range(3, min(channels) + 1)
            if all(c % m == 0 and 2 * (c // m) >= 3 for c in channels)]
    widths = ", ".join(str(c) for c in channels)
    if not fits:
        return f". No fold width fits every stage ({widths} channels) with padding 0"
    return f". fold_width={max(fits)} fits every stage ({widths} channels)"


def _combine(se, u, x):
    return u + x if se is None else se(u, x)


class PreActBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride, se_mode, se_kwargs, dropout=0.0, fold_width=16, pair_filters=None):
        super().__init__()
        out = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(in_planes, out, 1, stride, bias=False) if stride != 1 or in_planes != out else None
        self.se = _make_se(out, se_mode, se_kwargs, dict(fold_width=fold_width, pair_filters=pair_filters))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        pre = self.relu(self.bn1(x))
        identity = self.shortcut(pre) if self.shortcut is not None else x
        u = self.conv1(pre)
        u = self.conv2(self.dropout(self.relu(self.bn2(u))))
        return _combine(self.se, u, identity)


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride, se_mode, se_kwargs, dropout=0.0, fold_width=16, pair_filters=None):
        super().__init__()
        out = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.shortcut = nn.Conv2d(in_planes, out, 1, stride, bias=False) if stride != 1 or in_planes != out else None
        # SPEC section 5: e = width / 16 for the bottleneck (width = C / 4)
        pf = pair_filters if pair_filters is not None else max(1, planes // 16)
        self.se = _make_se(out, se_mode, se_kwargs, dict(fold_width=fold_width, pair_filters=pf))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        pre = self.relu(self.bn1(x))
        identity = self.shortcut(pre) if self.shortcut is not None else x
        u = self.conv1(pre)
        u = self.conv2(self.relu(self.bn2(u)))
        u = self.conv3(self.relu(self.bn3(u)))
        return _combine(self.se, u, identity)


class PreActResNet(nn.Module):
    """Pre-activation ResNet (He et al. 2016) with CIFAR or ImageNet stem."""

    def __init__(self, block, layers, widths, num_classes, se_mode, se_kwargs, stem="cifar", dropout=0.0,
                 fold_width_fn=None, pair_filters_fn=None):
        super().__init__()
        if stem == "cifar":
            in_planes = 16
            self.stem = nn.Conv2d(3, in_planes, 3, 1, 1, bias=False)
        else:
            in_planes = 64
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        stages = []
        uniform_fold = fold_width_fn is None or "fold_width" in se_kwargs
        for i, (n_blocks, planes) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                out = planes * block.expansion
                kw = {}
                if fold_width_fn is not None:
                    kw["fold_width"] = fold_width_fn(out)
                if pair_filters_fn is not None:
                    kw["pair_filters"] = pair_filters_fn(out)
                kw.update({k: v for k, v in se_kwargs.items() if k in ("fold_width", "pair_filters")})
                rest = {k: v for k, v in se_kwargs.items() if k not in ("fold_width", "pair_filters")}
                try:
                    blocks.append(block(in_planes, planes, stride, se_mode, rest, dropout=dropout, **kw))
                except ValueError as exc:
                    if se_mode is None:
                        raise
                    hint = _fold_hint(se_mode, [w * block.expansion for w in widths], uniform_fold)
                    raise ValueError(f"stage {i + 1} ({out} channels): {exc}{hint}") from exc
                in_planes = out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.in_channels > 1:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(self.pool(self.relu(self.bn(x))).flatten(1))


def preact_resnet(depth, num_classes=10, se_mode=None, bottleneck=None, **se_kwargs):
    """CIFAR pre-act ResNet: basic blocks for depth 6n+2 (110), bottlenecks for 9n+2 (164).
    ``bottleneck=None`` picks bottlenecks for depth >= 164, as in He et al."""
    if bottleneck is None:
        bottleneck = depth >= 164 and (depth - 2) % 9 == 0
    if bottleneck and (depth - 2) % 9 == 0:
        n, block = (depth - 2) // 9, PreActBottleneck
    elif not bottleneck and (depth - 2) % 6 == 0:
        n, block = (depth - 2) // 6, PreActBasicBlock
    else:
        raise ValueError(f"depth must be 6n+2 (basic blocks, e.g. 110) or 9n+2 (bottlenecks, e.g. 164), got {depth}")
    return PreActResNet(block, [n] * 3, [16, 32, 64], num_classes, se_mode, se_kwargs, stem="cifar")


def wide_resnet(depth, widen_factor, num_classes=10, se_mode=None, dropout=0.0, **se_kwargs):
    """CIFAR Wide ResNet WRN-depth-k (Zagoruyko & Komodakis), pre-activation basic blocks."""
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4 (16, 22, 28, ...), got {depth}")
    n = (depth - 4) // 6
    widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    model = PreActResNet(PreActBasicBlock, [n] * 3, widths, num_classes, se_mode, se_kwargs, stem="cifar",
                         dropout=dropout, fold_width_fn=wrn_fold_width,
                         pair_filters_fn=lambda c: max(1, c // 16))
    return model


def preact_resnet50(num_classes=1000, se_mode=None, **se_kwargs):
    """ImageNet pre-act ResNet-50 (bottlenecks [3, 4, 6, 3])."""
    return PreActResNet(PreActBottleneck, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, se_mode, se_kwargs,
                        stem="imagenet")
