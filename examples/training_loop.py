"""The training loop both examples share (train_cifar.py, finetune_imagefolder.py): processes, loaders,
the model's wrappers, one epoch, the log, the checkpoint. What differs between them (data, models, the
recipe, the columns of the log) stays in each example."""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

# ------------------------------------------------------------------------------------------------
# options
# ------------------------------------------------------------------------------------------------

def add_run_options(parser, workers: int, out: str):
    """The options the loop reads (steps, autocast, layout, compile, loader workers, seed, device, output
    folder, resume, progress bar); ``workers`` and ``out`` are the example's defaults."""
    a = parser.add_argument
    a("--steps-per-epoch", type=int, default=0, help="cut epochs short (smoke runs); also caps evaluation")
    a("--amp", choices=("bf16", "fp16"), help="autocast dtype (fp16 uses a GradScaler)")
    a("--channels-last", action="store_true")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--workers", type=int, default=workers)
    a("--seed", type=int, default=0)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--out", default=out, help="checkpoint (last.pt), CSV log and curves go here")
    a("--resume", help="checkpoint to resume from ('auto': OUT/last.pt if it exists)")
    a("--no-progress", action="store_true")


# ------------------------------------------------------------------------------------------------
# distributed, progress, logging
# ------------------------------------------------------------------------------------------------

def setup_distributed(args):
    """(rank, world, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; multi-node the same."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(args.device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def progress(iterable, total, desc, enabled):
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def reduce_sums(values, device, world):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def write_log(out: Path, history, fields, splits):
    """OUT/log.csv (columns ``fields``) and OUT/curves.png: loss and top-1 error per epoch of each of ``splits``
    (the epochs where a split has no value, "", are left out of its curve)."""
    with open(out / "log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(history)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ep = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for split in splits:
        pts = [(e, r[f"{split}_loss"], r[f"{split}_acc"]) for e, r in zip(ep, history) if r[f"{split}_loss"] != ""]
        if pts:
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], label=split)
            ax2.plot([p[0] for p in pts], [100 * (1 - p[2]) for p in pts], label=split)
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.set(xlabel="epoch", ylabel="error (%)", title="top-1 error")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# train / evaluate
# ------------------------------------------------------------------------------------------------

def run_context(args, device, rank, **extra):
    """What :func:`run_epoch` needs besides the model and data: the device, the step cap (0: whole loader),
    the progress bar (rank 0), channels_last, the autocast dtype (None: fp32), and ``extra``: ``augment``
    (``augment(x, train)``, on the device, after the copy; default none) and ``smoothing`` (label smoothing of
    the training loss; default 0)."""
    return dict(device=device, steps=args.steps_per_epoch, show=rank == 0 and not args.no_progress,
                channels_last=args.channels_last, amp={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp),
                **extra)


def run_epoch(model, loader, ctx, train, mix_alpha=0.0, opt=None, scaler=None, desc=""):
    """One pass (``ctx``: :func:`run_context`); returns (loss sum, correct, count) of this rank."""
    model.train(train)
    loss_sum = correct = count = 0.0
    steps = len(loader) if not ctx["steps"] else min(ctx["steps"], len(loader))
    with torch.set_grad_enabled(train):
        for step, (x, y) in enumerate(progress(loader, steps, desc, ctx["show"])):
            if step >= steps:
                break
            x, y = x.to(ctx["device"], non_blocking=True), y.to(ctx["device"], non_blocking=True)
            if ctx.get("augment") is not None:
                x = ctx["augment"](x, train)
            if ctx["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            lam, perm = 1.0, None
            if mix_alpha > 0:
                lam = float(np.random.beta(mix_alpha, mix_alpha))
                perm = torch.randperm(x.shape[0], device=x.device)
                x = lam * x + (1 - lam) * x[perm]
            smoothing = ctx.get("smoothing", 0.0) if train else 0.0
            with torch.autocast(ctx["device"].type, dtype=ctx["amp"], enabled=ctx["amp"] is not None):
                out = model(x)
                loss = F.cross_entropy(out.float(), y, label_smoothing=smoothing)
                if perm is not None:
                    loss = lam * loss + (1 - lam) * F.cross_entropy(out.float(), y[perm], label_smoothing=smoothing)
            if train:
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            pred = out.argmax(1)
            hits = (pred == y).float().sum() if perm is None else \
                lam * (pred == y).float().sum() + (1 - lam) * (pred == y[perm]).float().sum()
            loss_sum += loss.item() * x.shape[0]
            correct += hits.item()
            count += x.shape[0]
    return loss_sum, correct, count


def train_epoch(model, loader, sampler, epoch, ctx, opt, scaler, world, mix_alpha=0.0):
    """One training epoch over the ranks: (its learning rate, (loss sum, correct, count), seconds)."""
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    lr = opt.param_groups[0]["lr"]
    t0 = time.perf_counter()
    tr = reduce_sums(run_epoch(model, loader, ctx, True, mix_alpha, opt, scaler, f"epoch {epoch + 1}"),
                     ctx["device"], world)
    return lr, tr, time.perf_counter() - t0


def format_row(row) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def loaders(args, train_set, eval_set, rank, world, drop_last=True):
    """(train loader, evaluation loader or None, train sampler): the global batch split over the ranks,
    training shuffled (per epoch: ``set_epoch``), evaluation in order."""
    per_rank = max(1, args.batch_size // world)
    if world > 1:
        train_sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed, drop_last=True)
        eval_sampler = DistributedSampler(eval_set, world, rank, shuffle=False) if eval_set is not None else None
    else:
        train_sampler = RandomSampler(train_set)
        eval_sampler = SequentialSampler(eval_set) if eval_set is not None else None
    kw = dict(num_workers=args.workers, pin_memory=args.device.startswith("cuda"),
              persistent_workers=args.workers > 0)
    train = DataLoader(train_set, per_rank, sampler=train_sampler, drop_last=drop_last, **kw)
    evaluate = DataLoader(eval_set, per_rank, sampler=eval_sampler, **kw) if eval_set is not None else None
    return train, evaluate, train_sampler


def wrap_model(args, core, device, world):
    """(core, the model to call): ``core`` in channels_last when asked, the model under DDP on several ranks
    and compiled when asked (state_dicts come from ``core``: no ``module.``/``_orig_mod.`` prefixes)."""
    if args.channels_last:
        core = core.to(memory_format=torch.channels_last)
    model = core
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    if args.compile:
        model = torch.compile(model)
    return core, model


def resume_from(args, out, core, opt, sched, scaler, device):
    """(history, first epoch) after loading --resume (nothing to load: ([], 0))."""
    path = str(out / "last.pt") if args.resume == "auto" and (out / "last.pt").exists() else args.resume
    if not path or path == "auto":
        return [], 0
    ckpt = torch.load(path, map_location=device, weights_only=False)
    core.load_state_dict(ckpt["model"], strict=True)
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    return ckpt["history"], ckpt["epoch"]


def save(out, core, opt, sched, scaler, history, config, args, fields, splits):
    """OUT/last.pt (what ``--resume`` loads), then the log and curves (:func:`write_log`)."""
    ckpt = dict(model=core.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                scaler=scaler.state_dict(), epoch=history[-1]["epoch"], history=history, config=config,
                args=vars(args))
    torch.save(ckpt, out / "last.pt.tmp")
    os.replace(out / "last.pt.tmp", out / "last.pt")  # never a half-written checkpoint
    write_log(out, history, fields, splits)
