#!/usr/bin/env python
"""Draw what the CMPE-SE layers of a trained network see and do (cmpe_se_fused.viz; docs/TRAINING.md).

    python examples/plot_attention.py runs/cifar/last.pt --out figs
    python examples/plot_attention.py runs/wrn_3x3/last.pt --compare runs/wrn_se/last.pt runs/wrn_1x1/last.pt --out figs

Loads a checkpoint written by ``examples/train_cifar.py`` (it holds the model config), runs
``--num-images`` test images (CIFAR from ``--data`` when present, else synthetic ones) through
the network in evaluation mode, and writes into ``--out``:

* ``maps.png``: per block, the folded inner-imaged maps F(u, x) and F(s*u, x) and the averaged
  pair-view map v (mean over the images; ``--sample I`` for one image);
* ``gates.png``: per block, the gate of every channel (mean +- std over the images);
* ``gate_stats.png`` / ``gate_stats.csv``: per-block mean and variance of the gates, for this
  checkpoint and every ``--compare`` checkpoint (several models or modes in one figure);
* ``records.pt``: the raw recordings (``LayerRecord.to_dict()`` per layer).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_cifar import MEAN, STD, augment, build_model, load_cifar, synthetic_cifar

from cmpe_se_fused.viz import AttentionRecorder, gate_statistics, plot_gate_curves, plot_gate_stats, plot_maps


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--compare", nargs="*", default=[], help="more checkpoints for the gate-statistics figure")
    p.add_argument("--data", default="./data", help="CIFAR folder (synthetic images when absent)")
    p.add_argument("--synthetic", action="store_true", help="use synthetic images even if data is present")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--sample", type=int, help="draw maps for this image instead of the mean")
    p.add_argument("--backend", default="auto", help="CMPE-SE backend to run (any loads any checkpoint)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def load(path, backend, device):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "config" not in ckpt:
        raise SystemExit(f"{path}: no model config; expected a checkpoint written by examples/train_cifar.py")
    config = dict(ckpt["config"])
    config["se_kwargs"] = {**config.get("se_kwargs", {}), "backend": backend}
    model = build_model(config)
    model.load_state_dict(ckpt["model"], strict=True)
    dataset = ckpt.get("args", {}).get("dataset", "cifar10" if config["num_classes"] == 10 else "cifar100")
    return model.to(device).eval(), config, dataset


def images(args, dataset, num_classes, device):
    data_dir = Path(args.data).expanduser() / ("cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python")
    if not args.synthetic and data_dir.is_dir():
        x = load_cifar(args.data, dataset, download=False)[2]
    else:
        x = synthetic_cifar(4 * args.num_images, num_classes, seed=0)[2]
    x = x[:args.num_images].to(device)
    mean, std = (torch.tensor(t, device=device).view(1, 3, 1, 1) for t in (MEAN[dataset], STD[dataset]))
    return augment(x, mean, std, train=False)


def record(model, x):
    with AttentionRecorder(model) as rec, torch.no_grad():
        for chunk in x.split(128):
            model(chunk)
    return rec.records


def label_of(path, config):
    return f"{config['model']} {config['se_mode'] or 'plain'} ({Path(path).parent.name})"


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, config, dataset = load(args.checkpoint, args.backend, args.device)
    if config["se_mode"] is None:
        raise SystemExit(f"{args.checkpoint}: a plain network (se_mode none) has no CMPE-SE layer to draw")
    x = images(args, dataset, config["num_classes"], args.device)
    records = record(model, x)
    plot_maps(records, out / "maps.png", sample=args.sample)
    plot_gate_curves(records, out / "gates.png")
    runs = {label_of(args.checkpoint, config): records}
    for i, path in enumerate(args.compare, start=2):
        other, other_config, _ = load(path, args.backend, args.device)
        label = label_of(path, other_config)
        runs[label if label not in runs else f"{label} #{i}"] = record(other, x)
    plot_gate_stats(runs, out / "gate_stats.png")
    with open(out / "gate_stats.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=("run", "block", "name", "mode", "channels", "mean", "var"))
        w.writeheader()
        for label, recs in runs.items():
            w.writerows({"run": label, **s} for s in gate_statistics(recs))
    torch.save({name: r.to_dict() for name, r in records.items()}, out / "records.pt")
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")


if __name__ == "__main__":
    main()
