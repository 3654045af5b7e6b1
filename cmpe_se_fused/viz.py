"""What the CMPE-SE layers see and do: record through forward hooks, plot as in the paper's appendix.

For every CMPE-SE layer (``CMPESE``, ``SyncCMPESE``, ``CMPESEReference``, duck-typed; see
:mod:`cmpe_se_fused.convert`) and every sample, :class:`AttentionRecorder` keeps (``C`` channels,
``P = H*W``):

* ``pool_u = mean_p U``, ``pool_x = mean_p X`` (``N x C``): the squeezed residual and identity;
* ``gate = s`` (``N x C``): the excitation, values in (0, 1);
* ``v`` (``N x Hm x Wm``, pair modes only): the averaged pair-view map, the relation vector ``z``
  before flattening (SPEC section 1);
* derived: ``pool_y = mean_p Y = s * pool_u + pool_x``; the inner-imaged maps
  ``fold_before = F(pool_u, pool_x)`` and ``fold_after = F(s * pool_u, pool_x)`` (``N x 2k x m``),
  the SPEC fold of the two flows before and after the re-weighting (``s * pool_u = mean_p(s U)``,
  so ``fold_after`` holds exactly the two summands of ``pool_y``). ``m`` is the layer's fold width
  when it divides C (any mode), else C (one row pair);
* per block: the mean and the (population) variance of the gate over all ``N x C`` values.

The hook recomputes ``s`` and ``v`` from the pools with the eager reference pieces and the layer's
own weights (training mode: the batch statistics of this batch, updating *copies* of the running
statistics), under ``no_grad``: the model's outputs, gradients, buffers and RNG are untouched.
The recomputed gate equals the layer's to rounding (the fused kernels' summation order differs);
for a ``SyncCMPESE`` in training mode it uses the local batch statistics.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from . import reference
from .layer_swap import is_cmpe_se_layer
from .reference import PAIR_MODES

__all__ = [
    "AttentionRecorder",
    "LayerRecord",
    "gate_statistics",
    "plot_gate_curves",
    "plot_gate_stats",
    "plot_maps",
]


@dataclass
class LayerRecord:
    """Recorded values of one CMPE-SE layer (CPU, float32), samples stacked along dim 0."""

    name: str
    mode: str
    fold_width: int
    pool_u: torch.Tensor
    pool_x: torch.Tensor
    gate: torch.Tensor
    v: torch.Tensor | None

    @property
    def pool_y(self) -> torch.Tensor:
        return self.gate * self.pool_u + self.pool_x

    def _fold(self, a, b):
        return reference.fold(a, b, self.fold_width)[:, 0]

    @property
    def fold_before(self) -> torch.Tensor:
        """``F(pool_u, pool_x)``: ``N x 2k x m``, rows alternate residual / identity."""
        return self._fold(self.pool_u, self.pool_x)

    @property
    def fold_after(self) -> torch.Tensor:
        """``F(s * pool_u, pool_x)``: the same image after the residual flow is re-weighted."""
        return self._fold(self.gate * self.pool_u, self.pool_x)

    @property
    def gate_mean(self) -> float:
        return self.gate.mean().item()

    @property
    def gate_var(self) -> float:
        return self.gate.var(unbiased=False).item()

    def to_dict(self) -> dict:
        return dict(name=self.name, mode=self.mode, fold_width=self.fold_width, pool_u=self.pool_u,
                    pool_x=self.pool_x, gate=self.gate, v=self.v)


def _gate_and_map(module, u, x):
    """(gate (N, C), v (N, Hm, Wm) or None) of a CMPE-SE layer, recomputed without side effects."""
    acc = reference.acc_dtype(u.dtype)
    pool_u, pool_x = reference.squeeze(u, x)
    w = (lambda name: getattr(module, name).weight.to(acc))
    mode, v = module.mode, None
    if mode == "double_fc":
        hidden = torch.cat([torch.relu(pool_u @ w("fc1").t()), torch.relu(pool_x @ w("fc1_identity").t())], 1)
    else:
        z = pool_u
        if mode in PAIR_MODES:
            bn = module.pair_bn
            padding = module.pair_conv.padding[0]
            a = reference.pair_view_conv(pool_u, pool_x, w("pair_conv"), mode, getattr(module, "fold_width", 16),
                                         padding)
            b, _, _ = reference.batch_norm(a, bn.weight.to(acc), bn.bias.to(acc), bn.running_mean.clone(),
                                           bn.running_var.clone(), module.training, bn.momentum or 0.0, bn.eps)
            v = b.mean(1)
            z = v.flatten(1)
        hidden = torch.relu(z @ w("fc1").t())
    return pool_u, pool_x, torch.sigmoid(hidden @ w("fc2").t()), v


class AttentionRecorder:
    """Forward hooks on every CMPE-SE layer of ``model`` (or those named in ``layers``).

    Use as a context manager (hooks removed on exit) or call :meth:`remove`. ``max_samples``
    caps the samples kept per layer (the first ones seen). ``records``: name -> :class:`LayerRecord`.

        with AttentionRecorder(model) as rec:
            model(images)
        plot_maps(rec.records, "maps.png")
    """

    def __init__(self, model: nn.Module, layers=None, max_samples: int | None = None):
        self.max_samples = max_samples
        self._raw: dict[str, dict] = {}
        self._handles = []
        for name, m in model.named_modules():
            if is_cmpe_se_layer(m) and (layers is None or name in layers):
                self._handles.append(m.register_forward_hook(self._hook(name or type(m).__name__), with_kwargs=True))
        if not self._handles:
            raise ValueError("the model has no CMPE-SE layer to record")

    def _hook(self, name):
        def hook(module, args, kwargs, output):
            u = args[0] if args else kwargs["u"]
            x = args[1] if len(args) > 1 else kwargs["x"]
            kept = self._raw.get(name, {}).get("pool_u")
            if self.max_samples is not None and kept is not None and kept.shape[0] >= self.max_samples:
                return
            dev = u.device.type
            no_autocast = torch.autocast(dev, enabled=False) if dev in ("cuda", "cpu") else nullcontext()
            with torch.no_grad(), no_autocast:
                pool_u, pool_x, gate, v = _gate_and_map(module, u.detach(), x.detach())
            m = module.fold_width if module.mode == "folded_3x3" or \
                u.shape[1] % getattr(module, "fold_width", 16) == 0 else u.shape[1]
            rec = self._raw.setdefault(name, dict(mode=module.mode, fold_width=m))
            for key, t in (("pool_u", pool_u), ("pool_x", pool_x), ("gate", gate), ("v", v)):
                if t is not None:
                    t = t.detach().float().cpu()
                    rec[key] = t if key not in rec else torch.cat([rec[key], t])
                    if self.max_samples is not None:
                        rec[key] = rec[key][:self.max_samples]
        return hook

    @property
    def records(self) -> dict[str, LayerRecord]:
        return {name: LayerRecord(name, r["mode"], r["fold_width"], r["pool_u"], r["pool_x"], r["gate"], r.get("v"))
                for name, r in self._raw.items()}

    def clear(self):
        self._raw.clear()

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def gate_statistics(records: dict[str, LayerRecord]) -> list[dict]:
    """Per block, in forward order: ``{block, name, mode, channels, mean, var}`` of the gate values."""
    return [dict(block=i, name=r.name, mode=r.mode, channels=r.gate.shape[1], mean=r.gate_mean, var=r.gate_var)
            for i, r in enumerate(records.values())]


# ------------------------------------------------------------------------------------------------
# plots (matplotlib, imported on use)
# ------------------------------------------------------------------------------------------------

def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("cmpe_se_fused.viz plots need matplotlib: pip install matplotlib") from exc
    return plt


def _pick(t, sample):
    return t.mean(0) if sample is None else t[sample]


def plot_maps(records: dict[str, LayerRecord], path, sample: int | None = None, blocks=None):
    """Heatmaps per block: ``F(u, x)``, ``F(s*u, x)`` and the averaged pair-view map ``v``
    (``sample=None``: averaged over the recorded samples). ``blocks``: names or indices to show."""
    plt = _plt()
    items = [(i, r) for i, r in enumerate(records.values())
             if blocks is None or i in blocks or r.name in blocks]
    has_v = any(r.v is not None for _, r in items)
    cols = ["fold F(u, x)", "fold F(s*u, x)"] + (["pair-view map v"] if has_v else [])
    fig, axes = plt.subplots(len(items), len(cols), figsize=(3.2 * len(cols), 1.9 * len(items) + 0.6),
                             squeeze=False)
    for row, (i, r) in enumerate(items):
        before, after = _pick(r.fold_before, sample), _pick(r.fold_after, sample)
        lim = max(before.abs().max().item(), after.abs().max().item(), 1e-12)
        images = [before, after] + ([_pick(r.v, sample) if r.v is not None else None] if has_v else [])
        for col, img in enumerate(images):
            ax = axes[row][col]
            ax.set_xticks([]), ax.set_yticks([])
            if img is None:
                ax.axis("off")
                continue
            kw = dict(vmin=-lim, vmax=lim) if col < 2 else {}
            im = ax.imshow(img.numpy(), cmap="coolwarm" if col < 2 else "viridis", aspect="auto", **kw)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
            if row == 0:
                ax.set_title(cols[col], fontsize=9)
        axes[row][0].set_ylabel(f"{i}: {r.name}\n{r.mode}", fontsize=7)
    fig.suptitle("inner-imaged maps" + (" (mean over samples)" if sample is None else f" (sample {sample})"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gate_curves(records: dict[str, LayerRecord], path, ncols: int = 4):
    """Per block: the gate of every channel (mean over samples, band: +- one std over samples)."""
    plt = _plt()
    recs = list(records.values())
    nrows = -(-len(recs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.2 * nrows), squeeze=False, sharey=True)
    for i, ax in enumerate(axes.flat):
        if i >= len(recs):
            ax.axis("off")
            continue
        g = recs[i].gate
        mean, std = g.mean(0).numpy(), g.std(0, unbiased=False).numpy()
        ch = range(g.shape[1])
        ax.plot(ch, mean, lw=1)
        ax.fill_between(ch, mean - std, mean + std, alpha=0.3)
        ax.set_ylim(0, 1)
        ax.set_title(f"{i}: {recs[i].name}", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.supxlabel("channel")
    fig.supylabel("gate s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gate_stats(runs: dict[str, dict[str, LayerRecord]], path):
    """Per-block mean and variance of the gates, one line per run (models / modes to compare)."""
    plt = _plt()
    fig, (ax_m, ax_v) = plt.subplots(1, 2, figsize=(11, 3.8))
    for label, records in runs.items():
        stats = gate_statistics(records)
        blocks = [s["block"] for s in stats]
        ax_m.plot(blocks, [s["mean"] for s in stats], marker="o", ms=3, label=label)
        ax_v.plot(blocks, [s["var"] for s in stats], marker="o", ms=3, label=label)
    ax_m.set(xlabel="block", ylabel="mean of s", title="gate mean per block")
    ax_v.set(xlabel="block", ylabel="variance of s", title="gate variance per block")
    for ax in (ax_m, ax_v):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
