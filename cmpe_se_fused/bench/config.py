"""What the suite measures: shape sets named after networks, presets, axes, the case grid.

A *shape* is one CMPE-SE layer of a network: ``U, X: (N, C, H, W)`` plus the layer's fold width
``m`` and pair-view filter count ``e`` (SPEC.md section 5). A *case* is a shape in one mode,
dtype, layout and phase (train/eval); each case is timed for every pass (fwd, bwd, fwdbwd) and
every provider.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = ("nchw", "cl")
PHASES = ("train", "eval")
PASSES = ("fwd", "bwd", "fwdbwd")
ALL_MODES = ("se", "double_fc", "pair_2x1", "pair_1x1", "folded_3x3")
DEFAULT_MODES = ("se", "folded_3x3")


@dataclass(frozen=True)
class Shape:
    """One CMPE-SE layer of a network: ``(N, C, H, W)``, fold width m, pair filters e."""
    net: str
    stage: str
    n: int
    c: int
    h: int
    w: int
    fold_width: int
    pair_filters: int

    @property
    def label(self) -> str:
        return f"{self.net}/{self.stage}"

    @property
    def dims(self) -> str:
        return f"{self.n}x{self.c}x{self.h}x{self.w}"

    def with_batch(self, n: int) -> Shape:
        return replace(self, n=n)


def _wrn28_10(n=128):
    # fold width m = C/10 (20-row fold), pair filters e = C/16 (SPEC section 5)
    return [Shape("wrn28-10", f"s{i + 1}", n, c, s, s, c // 10, c // 16)
            for i, (c, s) in enumerate(((160, 32), (320, 16), (640, 8)))]


def _resnet164(n=128):
    # bottleneck output C = 4 * width; e = width / 16 = C / 64; m = 16
    return [Shape("resnet164", f"s{i + 1}", n, c, s, s, 16, max(1, c // 64))
            for i, (c, s) in enumerate(((64, 32), (128, 16), (256, 8)))]


def _resnet50(batches=(64, 256)):
    return [Shape("resnet50", f"s{i + 1}", n, c, s, s, 16, max(1, c // 64))
            for n in batches for i, (c, s) in enumerate(((256, 56), (512, 28), (1024, 14), (2048, 7)))]


SHAPE_SETS = {"wrn28-10": _wrn28_10, "resnet164": _resnet164, "resnet50": _resnet50}


@dataclass(frozen=True)
class Case:
    shape: Shape
    mode: str
    dtype: str
    layout: str
    phase: str

    @property
    def training(self) -> bool:
        return self.phase == "train"

    def axis(self, name: str) -> str:
        """The case's value on an axis, for preset filters (``net``, ``stage``, ``mode``, ...)."""
        if name in ("net", "stage"):
            return getattr(self.shape, name)
        return getattr(self, name)


@dataclass
class Preset:
    """A named selection of shapes and axes. ``limits``: provider -> {axis: allowed values}:
    which cases a costly provider (torch.compile) runs in this preset; ``--compile-all`` lifts them."""
    name: str
    doc: str
    shapes: list
    modes: tuple = DEFAULT_MODES
    dtypes: dict = field(default_factory=lambda: {"cpu": ("fp32",), "cuda": ("fp32", "bf16")})
    layouts: tuple = LAYOUTS
    phases: tuple = PHASES
    passes: tuple = PASSES
    limits: dict = field(default_factory=dict)
    e2e: bool = True
    e2e_modes: tuple | None = None      # None: the --modes axis
    e2e_dtypes: tuple | None = None     # None: the --dtypes axis
    e2e_nets: tuple | None = None       # None: every net of bench.e2e.NETS
    e2e_batches: dict = field(default_factory=dict)  # net -> batches (others: --e2e-batch / its default)
    budget_s: float | None = None
    providers: tuple | None = None      # default providers on CUDA (None: every provider of the device)


#: end-to-end batches of torchvision ResNet-50 (224x224) in the GPU presets
RESNET50_E2E_BATCHES = {"resnet50-tv": (64, 128)}
CIFAR_E2E_NETS = ("wrn16-8", "resnet164")


def _preset_table() -> dict:
    quick_shapes = [s.with_batch(16) for s in (_resnet164()[0], _wrn28_10()[2])]
    gpu_compile_limits = {
        "compile": {"layout": ("nchw",), "phase": ("train",)},
        "compile-max": {"layout": ("nchw",), "phase": ("train",), "dtype": ("bf16",), "mode": ("folded_3x3",)},
        "variants": {"layout": ("nchw",), "phase": ("train",), "dtype": ("bf16",)},
    }
    presets = [
        Preset("quick", "about a minute on a 2-core CPU: ResNet-164 stage 1 and WRN-28-10 stage 3 at N=16, "
               "fp32 NCHW; torch.compile only on folded_3x3 in train mode; end-to-end rows of torchvision ResNet-50 "
               "(+ folded_3x3 CMPE-SE, timm seresnet50) at N=2 when torchvision and timm are installed (pip install "
               "'cmpe_se_fused[vision]'), else left out", quick_shapes, layouts=("nchw",),
               dtypes={"cpu": ("fp32",), "cuda": ("fp32",)},
               limits={"compile": {"phase": ("train",), "mode": ("folded_3x3",)},
                       "compile-max": {"phase": ("train",), "mode": ("folded_3x3",)}},
               e2e_nets=("resnet50-tv",), e2e_modes=("folded_3x3",), e2e_batches={"resnet50-tv": (2,)}),
        Preset("gpu", "gpu_check.sh (~3 min on an H100): WRN-28-10 and ResNet-164 stages at N=128, "
               "fp32+bf16, NCHW+channels_last, train+eval, every pass; torch.compile limited to NCHW train "
               "(max-autotune: bf16 folded_3x3); end-to-end rows (torchvision ResNet-50 at N=64 and 128)",
               _wrn28_10() + _resnet164(), dtypes={"cpu": ("fp32",), "cuda": ("fp32", "bf16")},
               limits=gpu_compile_limits, e2e_modes=("folded_3x3",), e2e_dtypes=("fp32", "bf16"), budget_s=200.0,
               e2e_batches=RESNET50_E2E_BATCHES),
        Preset("targets", "the project's headline GPU shapes first (gpu_check.sh, ~2 min): WRN-28-10 stage 1 and "
               "ResNet-164 stage 3 at N=128, se and folded_3x3, fp32+bf16, NCHW, eval then train, every pass; "
               "providers eager, compile (WRN stage 1), triton, cuda, cuda@resident(_c8)",
               [_wrn28_10()[0], _resnet164()[2]], layouts=("nchw",), phases=("eval", "train"),
               dtypes={"cpu": ("fp32",), "cuda": ("fp32", "bf16")}, e2e=False, budget_s=120.0,
               limits={"compile": {"stage": ("s1",)}},
               providers=("eager", "compile", "triton", "cuda", "cuda@resident", "cuda@resident_c8")),
        Preset("wrn28-10", "WRN-28-10 stages 1-3 at N=128 (C=160/320/640, m=C/10, e=C/16)", _wrn28_10(),
               e2e_nets=CIFAR_E2E_NETS),
        Preset("resnet164", "pre-act ResNet-164 stages at N=128 (C=64/128/256, m=16, e=C/64)", _resnet164(),
               e2e_nets=CIFAR_E2E_NETS),
        Preset("resnet50", "pre-act ResNet-50 stages at N=64 and N=256 (C=256..2048, m=16, e=C/64); end-to-end "
               "rows of torchvision ResNet-50 (N=64 and 128)", _resnet50(), e2e_nets=("resnet50-tv",),
               e2e_batches=RESNET50_E2E_BATCHES),
    ]
    return {p.name: p for p in presets}


PRESETS = _preset_table()


def parse_list(text: str | None, allowed, what: str, default):
    """``"a,b"`` -> ``("a", "b")``, checked against ``allowed``; ``all`` -> every allowed value."""
    if text is None:
        return tuple(default)
    items = [t.strip() for t in text.split(",") if t.strip()]
    if items == ["all"]:
        return tuple(allowed)
    bad = [t for t in items if t not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {bad}; expected some of {list(allowed)} (or 'all')")
    return tuple(dict.fromkeys(items))


def make_cases(shapes, modes, dtypes, layouts, phases) -> list[Case]:
    """The grid in priority order: phase, dtype, layout and mode vary slowest, the shape fastest,
    so a run cut short by its time budget still covers every shape at the first values of the
    axes (train, the first dtype, NCHW). The tables sort rows by shape for reading."""
    return [Case(s, m, d, lay, ph) for ph in phases for d in dtypes for lay in layouts for m in modes
            for s in shapes if _legal(s, m)]


def _legal(shape: Shape, mode: str) -> bool:
    if mode != "folded_3x3":
        return True
    return shape.c % shape.fold_width == 0 and 2 * (shape.c // shape.fold_width) >= 3 and shape.fold_width >= 3


def limit_reason(preset: Preset, provider: str, case: Case) -> str | None:
    """Why the preset skips ``provider`` on ``case`` (None: it runs). Launch variants
    (``backend@name``) share the rule ``variants``."""
    base = "variants" if "@" in provider else provider
    rule = preset.limits.get(base)
    if not rule:
        return None
    for axis, allowed in rule.items():
        if case.axis(axis) not in allowed:
            wanted = ", ".join(f"{a}={'/'.join(v)}" for a, v in rule.items())
            return f"preset {preset.name!r} runs {base} only on {wanted} (--compile-all lifts this)"
    return None
