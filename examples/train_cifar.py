#!/usr/bin/env python
"""Train the paper's CIFAR networks with CMPE-SE layers (recipe and options: docs/TRAINING.md).

    python examples/train_cifar.py --data ~/data --dataset cifar100 --model wrn16_8 --se-mode folded_3x3
    python examples/train_cifar.py --synthetic --model preact_resnet20 --fold-width 4 --epochs 2 --steps-per-epoch 5
    torchrun --nproc_per_node 8 examples/train_cifar.py --data ~/data --model wrn28_10 --sync-bn --sync-se-bn

Recipe (Hu et al. 2018, after He et al. / Zagoruyko & Komodakis): SGD, Nesterov momentum 0.9,
global batch 128, 200 epochs, weight decay 5e-4 for every model; lr 0.1, divided by 10 at epochs
100 and 150 (pre-act ResNet) or by 5 at 60, 120 and 160 (WRN); milestones scale with ``--epochs``.
``--mixup ALPHA`` trains the ``--epochs`` with mixup, then ``--plain-epochs`` (20) without it at
the last learning rate. Standard augmentation: 4-pixel padded random crop, horizontal flip,
per-channel normalisation, done on the device on whole batches (no torchvision needed).
"""
from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training_loop as loop  # noqa: E402 - the training loop, shared with finetune_imagefolder.py

from cmpe_se_fused.dispatch import BACKEND_NAMES  # noqa: E402
from cmpe_se_fused.distributed import convert_sync_batchnorm, convert_sync_cmpe_se  # noqa: E402
from cmpe_se_fused.models import preact_resnet, wide_resnet  # noqa: E402

MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
SE_MODES = ("none", "se", "double_fc", "pair_2x1", "pair_1x1", "folded_3x3")


def model_name(text: str) -> str:
    """``--model``: preact_resnetD (D = 6n+2: basic blocks; D = 9n+2 >= 164: bottlenecks) or wrnD_K (D = 6n+4)."""
    if m := re.fullmatch(r"preact_resnet(\d+)", text):
        d = int(m[1])
        if d >= 8 and ((d - 2) % 6 == 0 or (d >= 164 and (d - 2) % 9 == 0)):
            return text
        raise argparse.ArgumentTypeError(f"{text!r}: the pre-act ResNet depth must be 6n+2 (basic blocks: 20, 56, 110, "
                                         f"...) or 9n+2 >= 164 (bottlenecks: 164, 1001), got {d}")
    if m := re.fullmatch(r"wrn(\d+)_(\d+)", text):
        d, k = int(m[1]), int(m[2])
        if d >= 10 and (d - 4) % 6 == 0 and k >= 1:
            return text
        raise argparse.ArgumentTypeError(f"{text!r}: WRN-D-K needs D = 6n+4 (10, 16, 22, 28, ...) and K >= 1")
    raise argparse.ArgumentTypeError(f"unknown model {text!r}: preact_resnetD (e.g. preact_resnet110, "
                                     "preact_resnet164) or wrnD_K (e.g. wrn16_8, wrn28_10)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--dataset", choices=("cifar10", "cifar100"), default="cifar10")
    a("--data", default="./data", help="folder holding cifar-10-batches-py / cifar-100-python")
    a("--download", action="store_true", help="download into --data (needs torchvision)")
    a("--synthetic", action="store_true", help="random images (class-dependent colour), no data needed")
    a("--synthetic-size", type=int, default=2048, help="synthetic training images (test: a quarter)")
    a("--model", default="preact_resnet164", type=model_name,
      help="preact_resnet110|preact_resnet164|wrn16_8|wrn22_10|wrn28_10 (any preact_resnetD, wrnD_K)")
    a("--se-mode", choices=SE_MODES, default="folded_3x3")
    a("--backend", default="auto", choices=("auto",) + BACKEND_NAMES, help="CMPE-SE backend (auto: the first usable)")
    a("--fold-width", type=int, help="override the fold width m (default: 16 pre-act, C/10 WRN)")
    a("--pair-filters", type=int, help="override the pair-view filter count e")
    a("--padding", type=int, choices=(0, 1), help="padding of the folded 3x3 conv (default 0)")
    a("--reduction", type=int, help="override the reduction t (default 16)")
    a("--dropout", type=float, default=0.0, help="WRN dropout between the convs")
    a("--epochs", type=int, default=200)
    a("--plain-epochs", type=int, default=20, help="epochs without mixup after the mixup ones")
    a("--mixup", type=float, default=0.0, metavar="ALPHA", help="mixup Beta(ALPHA, ALPHA); 0: off")
    a("--batch-size", type=int, default=128, help="global batch (split over the ranks)")
    a("--lr", type=float, default=0.1)
    a("--momentum", type=float, default=0.9)
    a("--wd", type=float, default=5e-4, help="weight decay (5e-4 for every model)")
    a("--no-nesterov", action="store_true")
    a("--sync-bn", action="store_true", help="nn.SyncBatchNorm for the network's BatchNorms (GPU)")
    a("--sync-se-bn", action="store_true", help="global-batch statistics in the pair-view BatchNorms")
    loop.add_run_options(p, workers=2, out="runs/cifar")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

def _read_batches(folder: Path, names, label_key):
    xs, ys = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_cifar(root: str, dataset: str, download: bool):
    """(train_x uint8 (N,3,32,32), train_y, test_x, test_y) from the python-pickle release."""
    sub = "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python"
    folder = Path(root).expanduser() / sub
    if not folder.is_dir() and download:
        try:
            import torchvision
        except ImportError:
            sys.exit("--download needs torchvision (pip install torchvision), or fetch the python version of "
                     f"{dataset} into {folder} yourself")
        cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
        for train in (True, False):
            cls(str(Path(root).expanduser()), train=train, download=True)
    if not folder.is_dir():
        sys.exit(f"no {dataset} data in {folder}: pass --download (needs torchvision), --data DIR or --synthetic")
    if dataset == "cifar10":
        train = _read_batches(folder, [f"data_batch_{i}" for i in range(1, 6)], b"labels")
        test = _read_batches(folder, ["test_batch"], b"labels")
    else:
        train = _read_batches(folder, ["train"], b"fine_labels")
        test = _read_batches(folder, ["test"], b"fine_labels")
    return (*train, *test)


def synthetic_cifar(n_train: int, num_classes: int, seed: int):
    """Noise images whose mean colour depends on the class: learnable, so curves go down."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(40, 216, (num_classes, 3, 1, 1), generator=g)

    def make(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = (colours[y] + torch.randint(-40, 41, (n, 3, 32, 32), generator=g)).clamp(0, 255).to(torch.uint8)
        return x, y

    return (*make(n_train), *make(max(1, n_train // 4)))


def augment(x_uint8, mean, std, train: bool):
    """Normalise; in training also a random 32x32 crop of the 4-padded image and a random flip."""
    x = (x_uint8.float() / 255 - mean) / std
    if not train:
        return x
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    oy, ox = torch.randint(0, 9, (n,), device=x.device), torch.randint(0, 9, (n,), device=x.device)
    ar = torch.arange(32, device=x.device)
    rows, cols = (oy[:, None] + ar)[:, :, None], (ox[:, None] + ar)[:, None, :]
    x = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(n, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x).contiguous()


# ------------------------------------------------------------------------------------------------
# model, optimiser, schedule
# ------------------------------------------------------------------------------------------------

def model_config(args, num_classes):
    se_kwargs = {k: v for k, v in dict(fold_width=args.fold_width, pair_filters=args.pair_filters,
                                       padding=args.padding, reduction=args.reduction).items() if v is not None}
    se_kwargs["backend"] = args.backend
    return dict(model=args.model, num_classes=num_classes, se_mode=None if args.se_mode == "none" else args.se_mode,
                dropout=args.dropout, se_kwargs=se_kwargs)


def build_model(config):
    """The network of a config dict (as saved in checkpoints: model, num_classes, se_mode, se_kwargs)."""
    name, kw = config["model"], dict(config.get("se_kwargs", {}))
    if m := re.fullmatch(r"preact_resnet(\d+)", name):
        return preact_resnet(int(m[1]), config["num_classes"], se_mode=config["se_mode"], **kw)
    if m := re.fullmatch(r"wrn(\d+)_(\d+)", name):
        return wide_resnet(int(m[1]), int(m[2]), config["num_classes"], se_mode=config["se_mode"],
                           dropout=config.get("dropout", 0.0), **kw)
    raise SystemExit(f"unknown --model {name!r}: preact_resnetD (D = 6n+2 or 9n+2) or wrnD_K (D = 6n+4)")


def schedule(args):
    """(milestones, gamma) of the paper's step schedule, scaled to --epochs."""
    if args.model.startswith("wrn"):
        fractions, gamma = (0.3, 0.6, 0.8), 0.2
    else:
        fractions, gamma = (0.5, 0.75), 0.1
    return sorted({max(1, round(f * args.epochs)) for f in fractions}), gamma


# ------------------------------------------------------------------------------------------------
# train / evaluate (the loop itself: training_loop.py)
# ------------------------------------------------------------------------------------------------

FIELDS = ("epoch", "lr", "mixup", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "images_per_s")


def make_loaders(args, data, rank, world):
    train_x, train_y, test_x, test_y = data
    return loop.loaders(args, TensorDataset(train_x, train_y), TensorDataset(test_x, test_y), rank, world)


def prepare_model(args, config, device, world):
    """(core model for state_dicts, the model to call)."""
    core = build_model(config).to(device)
    if args.sync_bn or args.sync_se_bn:
        if args.sync_bn and device.type == "cpu" and world > 1:
            raise SystemExit("--sync-bn needs GPUs (torch's SyncBatchNorm); --sync-se-bn works on CPU")
        core = convert_sync_batchnorm(core, cmpe_se=args.sync_se_bn) if args.sync_bn else convert_sync_cmpe_se(core)
    return loop.wrap_model(args, core, device, world)


def load_data(args, num_classes, rank, world):
    if args.synthetic:
        return synthetic_cifar(args.synthetic_size, num_classes, args.seed)
    if args.download and world > 1:  # rank 0 downloads, the others wait for it
        if rank == 0:
            load_cifar(args.data, args.dataset, True)
        dist.barrier()
    return load_cifar(args.data, args.dataset, args.download and rank == 0)


def make_optimiser(args, core, device):
    opt = torch.optim.SGD(core.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd,
                          nesterov=not args.no_nesterov)
    milestones, gamma = schedule(args)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    return opt, sched, scaler


def check_model(args, num_classes):
    """Build the network on the meta device (no memory, no time): a configuration the layers
    reject is a usage error, said before any data is loaded."""
    try:
        with torch.device("meta"):
            build_model(model_config(args, num_classes))
    except (ValueError, TypeError) as exc:
        hint = ""
        if args.se_mode == "folded_3x3" and "fold" in str(exc):
            hint = " Set the fold with --fold-width M (M must divide every stage's channels) or --padding 1."
        print(f"train_cifar.py: error: --model {args.model} --se-mode {args.se_mode}: {exc}.{hint}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv=None):
    args = parse_args(argv)
    num_classes = 10 if args.dataset == "cifar10" else 100
    check_model(args, num_classes)
    rank, world, device = loop.setup_distributed(args)
    np.random.seed(args.seed + rank)
    data = load_data(args, num_classes, rank, world)
    config = model_config(args, num_classes)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    core, model = prepare_model(args, config, device, world)
    torch.manual_seed(args.seed + rank)
    opt, sched, scaler = make_optimiser(args, core, device)
    out = Path(args.out)
    history, start = loop.resume_from(args, out, core, opt, sched, scaler, device)
    total = args.epochs + (args.plain_epochs if args.mixup > 0 else 0)
    if history and start >= total:
        if rank == 0:
            print(f"{args.resume if args.resume != 'auto' else out / 'last.pt'}: the run is finished (epoch {start} of "
                  f"{total}); nothing to train. Raise --epochs (or --plain-epochs with --mixup) to train on.",
                  flush=True)
        if world > 1:
            dist.destroy_process_group()
        return history
    train_loader, test_loader, sampler = make_loaders(args, data, rank, world)
    mean = torch.tensor(MEAN[args.dataset], device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD[args.dataset], device=device).view(1, 3, 1, 1)
    ctx = loop.run_context(args, device, rank, augment=lambda x, train: augment(x, mean, std, train))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{args.model} se_mode={args.se_mode} backend={args.backend}: "
              f"{sum(p.numel() for p in core.parameters()) / 1e6:.3f}M parameters; {world} process(es), device "
              f"{device}; lr milestones {sorted(sched.milestones)} x{sched.gamma}", flush=True)
    for epoch in range(start, total):
        mixing = args.mixup if epoch < args.epochs else 0.0
        lr, tr, elapsed = loop.train_epoch(model, train_loader, sampler, epoch, ctx, opt, scaler, world, mixing)
        if epoch < args.epochs:
            sched.step()
        te = loop.reduce_sums(loop.run_epoch(model, test_loader, ctx, False, desc="test"), device, world)
        history.append(dict(epoch=epoch + 1, lr=lr, mixup=mixing, train_loss=tr[0] / tr[2], train_acc=tr[1] / tr[2],
                            test_loss=te[0] / te[2], test_acc=te[1] / te[2], epoch_time_s=round(elapsed, 3),
                            images_per_s=round(tr[2] / elapsed, 1)))
        if rank == 0:
            print(loop.format_row(history[-1]), flush=True)
            loop.save(out, core, opt, sched, scaler, history, config, args, FIELDS, ("train", "test"))
    if world > 1:
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
