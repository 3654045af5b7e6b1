"""End-to-end rows: one training step (forward, cross-entropy, backward, SGD step) of
CMPE-SE-WRN-16-8 and CMPE-SE-ResNet-164 (CIFAR-100 heads, 32x32 inputs), and of torchvision's
ResNet-50 with ``add_cmpe_se`` (net ``resnet50-tv``: ImageNet head, 224x224 inputs on GPU, 64x64
on CPU), with the CMPE-SE layers on each provider, beside the plain network (``se_mode=None``,
provider ``plain``). ``resnet50-tv`` also has the SE baseline users would otherwise pick: timm's
``seresnet50`` (se_mode ``timm_se``, provider ``timm``; the same network with timm's SE modules).

The layer's share of a real step is what users feel: ``overhead_vs_plain`` is
``step time / plain step time - 1`` (the cost of adding CMPE-SE, or timm's SE, to the network).
Nets that need torchvision or timm are skipped with the reason when the package is missing.
"""
from __future__ import annotations

import importlib.util
import statistics
import time

import torch
import torch.nn.functional as F

from ..models import preact_resnet, wide_resnet
from . import stability
from .config import DTYPES
from .providers import provider_reasons
from .timing import peak_memory_mb


def torchvision_resnet50(se_mode=None, backend="auto"):
    """torchvision ``resnet50(weights=None)``, with ``add_cmpe_se(se_mode, backend)`` unless None."""
    from torchvision.models import resnet50

    from ..convert import add_cmpe_se
    model = resnet50(weights=None)
    return model if se_mode is None else add_cmpe_se(model, se_mode, backend=backend, inplace=True)


def timm_seresnet50():
    import timm
    return timm.create_model("seresnet50", pretrained=False)


NETS = {"wrn16-8": lambda **kw: wide_resnet(16, 8, num_classes=100, **kw),
        "resnet164": lambda **kw: preact_resnet(164, num_classes=100, **kw),
        "resnet50-tv": torchvision_resnet50}
#: per net: ``{device type: input side}`` (default 32), classes (default 100), package needed
IMAGE_SIZE = {"resnet50-tv": {"cuda": 224, "cpu": 64}}
CLASSES = {"resnet50-tv": 1000}
REQUIRES = {"resnet50-tv": "torchvision"}
#: per net: extra rows ``(se_mode label, provider, builder, package needed)``, timed like the others
BASELINES = {"resnet50-tv": (("timm_se", "timm", timm_seresnet50, "timm"),)}


def e2e_row(net, batch, se_mode, dtype, layout, provider) -> dict:
    return {"kind": "e2e", "net": net, "N": batch, "se_mode": se_mode or "plain", "dtype": dtype, "layout": layout,
            "provider": provider, "status": "skipped", "reason": None, "median_us": None, "reps": None,
            "iqr_us": None, "images_per_s": None, "overhead_vs_plain": None, "speedup_vs_eager": None,
            "peak_mem_mb": None, "mem_vs_eager": None, "rep_us": [], "spread": None, "other_load": None, "flags": []}


def _builder(net, se_mode, provider):
    """(model constructor, its kwargs, the package it needs or None)."""
    for label, prov, fn, package in BASELINES.get(net, ()):
        if (label, prov) == (se_mode, provider):
            return fn, {}, package
    backend = "reference" if provider == "eager" else provider
    return NETS[net], ({} if se_mode is None else {"se_mode": se_mode, "backend": backend}), REQUIRES.get(net)


def _build(net, se_mode, provider, device, layout, state=None):
    fn, kwargs, _ = _builder(net, se_mode, provider)
    torch.manual_seed(0)
    model = fn(**kwargs)
    if state is not None:
        model.load_state_dict(state)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    return model.to(device=device, memory_format=fmt).train()


def _missing(package):
    if package and importlib.util.find_spec(package) is None:
        return f"{package} is not installed (pip install 'cmpe_se_fused[vision]')"
    return None


def missing_packages(net) -> str | None:
    """What ``net``'s rows need and this environment lacks (its net and its baselines), with the
    install command; None when nothing is missing."""
    needed = [REQUIRES.get(net)] + [pkg for _, _, _, pkg in BASELINES.get(net, ())]
    missing = [p for p in dict.fromkeys(needed) if p and importlib.util.find_spec(p) is None]
    return f"needs {', '.join(missing)} (pip install 'cmpe_se_fused[vision]')" if missing else None


def e2e_configs(net, se_modes, providers):
    """(se_mode, provider) of every row of ``net``: plain, each mode on each provider, baselines."""
    return [(None, "plain")] + [(m, p) for m in se_modes for p in providers] + \
        [(label, prov) for label, prov, _, _ in BASELINES.get(net, ())]


def _step_fn(model, data, target, dtype, device):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    amp = DTYPES[dtype] if dtype != "fp32" else None

    def step(_i=0):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(data), target)
        loss.backward()
        opt.step()
    return step


#: CPU: seconds of steps in one round of an e2e row (rounds: bench.stability)
CPU_ROUND_S = 0.7


def _time_steps(step, device, warmup, reps):
    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in evs:
            s.record()
            step()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) * 1e3 for s, e in evs]
    else:  # the first step sizes the round (~0.7 s of steps, up to 10) and counts as one of them
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e6)
        reps = int(min(10, max(reps, CPU_ROUND_S / max(times[0] * 1e-6, 1e-3))))
        for _ in range(reps - 1):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times), reps


def run_e2e(nets, se_modes, dtypes, layouts, providers, device, batch, on_row, should_skip=None, monitor=None,
            repeats=stability.REPEATS):
    """Yield-free driver: calls ``on_row(row)`` for every (net, batch, dtype, layout, config) of
    :func:`e2e_configs`. ``batch``: an int or a sequence of batches. ``should_skip()`` returns a
    reason to stop early (time budget). The configs of one (net, batch, dtype, layout) are timed
    in ``repeats`` interleaved rounds (bench.stability), the load read from ``monitor``."""
    warmup, reps = (3, max(1, -(-10 // repeats))) if device.type == "cuda" else (1, 1)
    batches = (batch,) if isinstance(batch, int) else tuple(batch)
    for net in nets:
        side = IMAGE_SIZE.get(net, {}).get(device.type, 32)
        for n in batches:
            for dtype in dtypes:
                for layout in layouts:
                    _run_configs(net, n, side, dtype, layout, se_modes, providers, device, (warmup, reps, repeats),
                                 on_row, should_skip, monitor)


def _run_configs(net, batch, side, dtype, layout, se_modes, providers, device, timing, on_row, should_skip,
                 monitor=None):
    """Build every config of one (net, batch, dtype, layout), then time them in interleaved rounds;
    the rows go to ``on_row`` in config order once all rounds are done."""
    sample = torch.empty(1, 16, 1, 1, device=device, dtype=DTYPES[dtype])
    baseline_provs = {prov for _, prov, _, _ in BASELINES.get(net, ())}
    states, rows, live = {}, [], []
    for se_mode, provider in e2e_configs(net, se_modes, providers):
        row = e2e_row(net, batch, se_mode, dtype, layout, provider)
        rows.append(row)
        reasons = [] if provider == "plain" or provider in baseline_provs else provider_reasons(provider, sample)
        missing = _missing(_builder(net, se_mode, provider)[2])
        why = should_skip() if should_skip else None
        if reasons or why or missing:
            row["reason"] = why or missing or "; ".join(reasons)
            continue
        try:
            model = _build(net, se_mode, provider, device, layout, states.get(se_mode))
            states.setdefault(se_mode, {k: v.detach().cpu() for k, v in model.state_dict().items()})
            fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
            data = torch.randn(batch, 3, side, side, device=device).contiguous(memory_format=fmt)
            target = torch.randint(0, CLASSES.get(net, 100), (batch,), device=device)
            step = _step_fn(model, data, target, dtype, device)
            step()  # optimizer state allocated before the memory baseline
            row["peak_mem_mb"] = peak_memory_mb(step, device)
            live.append((row, step))
        except Exception as exc:  # noqa: BLE001 - one broken config must not end the run
            _error(row, exc)
    _rounds(live, device, timing, monitor)
    live.clear()
    for row in rows:
        on_row(row)


def _error(row, exc):
    row.update(status="error", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")


def _rounds(live, device, timing, monitor):
    """``repeats`` rounds over the live configs, order rotated per round; then spread, load, flags."""
    warmup, reps, repeats = timing
    windows, times = {id(r): [] for r, _ in live}, {id(r): [] for r, _ in live}
    for k in range(repeats):
        for row, step in stability.rotated(live, k):
            if row["status"] == "error":
                continue
            try:
                t0 = time.perf_counter()
                # warm-up before the first round; later rounds only on GPU (one step: cheap there)
                t, n = _time_steps(step, device, warmup if k == 0 else int(device.type == "cuda"), reps)
                windows[id(row)].append((t0, time.perf_counter()))
                times[id(row)].append(float(t))
                stability.record(row, t)
                row.update(status="ok", reps=(row["reps"] or 0) + int(n))
            except Exception as exc:  # noqa: BLE001
                _error(row, exc)
    ok = [(row, times[id(row)]) for row, _ in live if row["status"] == "ok"]
    for row, _ in ok:
        other = monitor.other_in(windows[id(row)]) if monitor is not None else None
        stability.finish_row(row, other, monitor.limit if monitor is not None else float("inf"))
        row["images_per_s"] = row["N"] / (row["median_us"] * 1e-6)
    stability.flag_flips(ok)


def derive_e2e(rows: list[dict]):
    """``overhead_vs_plain`` for every ok e2e row."""
    plain = {(r["net"], r["N"], r["dtype"], r["layout"]): r["median_us"] for r in rows
             if r["kind"] == "e2e" and r["provider"] == "plain" and r["status"] == "ok"}
    for r in rows:
        if r["kind"] == "e2e" and r["status"] == "ok" and r["provider"] != "plain":
            p = plain.get((r["net"], r["N"], r["dtype"], r["layout"]))
            r["overhead_vs_plain"] = r["median_us"] / p - 1 if p else None
