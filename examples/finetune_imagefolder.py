#!/usr/bin/env python
"""Fine-tune a torchvision or timm ResNet with CMPE-SE layers on an ImageFolder dataset.

    python examples/finetune_imagefolder.py --data ~/data/flowers --model torchvision:resnet50 \\
        --pretrained resnet50_plain.pt --se-mode folded_3x3 --amp bf16 --channels-last --compile
    python examples/finetune_imagefolder.py --data DIR --model timm:seresnet50 --pretrained seresnet50.pth
    torchrun --nproc_per_node 8 examples/finetune_imagefolder.py --data DIR --model torchvision:resnet101

``--data`` holds ``train/`` and optionally ``val/``, each with one folder of images per class
(``torchvision.datasets.ImageFolder``). The model is built plain (``--model family:name``,
``weights=None``: nothing is downloaded), ``--pretrained`` loads a plain checkpoint you keep on disk
(a state_dict, or a dict holding one under ``model``/``state_dict``), then
``cmpe_se_fused.convert.add_cmpe_se`` puts a CMPE-SE layer in every residual block (timm's SE
modules are replaced). Checkpoint keys that do not fit (a 1000-class head for a 10-class dataset)
are dropped and listed; the only other keys left out are the new layers'.

Recipe: SGD (momentum 0.9, Nesterov), cosine learning rate over the epochs, weight decay 1e-4,
label smoothing 0.1, RandomResizedCrop + flip for training, resize + centre crop for evaluation.
Writes OUT/log.csv, OUT/curves.png and OUT/last.pt (``--resume auto`` continues from it).
Needs torchvision (and timm for ``timm:`` models): ``pip install 'cmpe_se_fused[vision]'``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training_loop as loop  # noqa: E402 - the training loop, shared with train_cifar.py

from cmpe_se_fused.convert import add_cmpe_se  # noqa: E402

SE_MODES = ("none", "se", "double_fc", "pair_2x1", "pair_1x1", "folded_3x3")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FIELDS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "images_per_s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--data", required=True, help="folder with train/ (and val/) ImageFolder trees")
    a("--model", default="torchvision:resnet50", help="torchvision:NAME (resnet18..152, resnext50_32x4d, "
      "wide_resnet50_2, ...) or timm:NAME (resnet50, seresnet50, resnext50_32x4d, ...); bare NAME: torchvision")
    a("--pretrained", help="plain checkpoint of the same model (state_dict file), loaded before training")
    a("--se-mode", choices=SE_MODES, default="folded_3x3", help="CMPE-SE mode; none: the plain model")
    a("--backend", default="auto", help="CMPE-SE backend: auto|reference|cpu|triton|cuda")
    a("--reduction", type=int, help="override the reduction t (default 16)")
    a("--fold-width", type=int, help="override the fold width m (default 16)")
    a("--pair-filters", type=int, help="override the pair-view filters e (default C/64 bottleneck, C/16 basic)")
    a("--padding", type=int, choices=(0, 1), help="padding of the folded 3x3 conv (default 0)")
    a("--image-size", type=int, default=224)
    a("--epochs", type=int, default=30)
    a("--batch-size", type=int, default=64, help="global batch (split over the ranks)")
    a("--lr", type=float, default=0.01)
    a("--momentum", type=float, default=0.9)
    a("--wd", type=float, default=1e-4)
    a("--label-smoothing", type=float, default=0.1)
    loop.add_run_options(p, workers=4, out="runs/finetune")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# data and model
# ------------------------------------------------------------------------------------------------

def make_datasets(args):
    """(train ImageFolder, val ImageFolder or None)."""
    try:
        from torchvision import datasets, transforms
    except ImportError:
        sys.exit("this example needs torchvision: pip install 'cmpe_se_fused[vision]'")
    root = Path(args.data).expanduser()
    if not (root / "train").is_dir():
        sys.exit(f"no {root / 'train'}: --data must hold train/ (and val/) with one folder per class")
    norm = transforms.Normalize(MEAN, STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(args.image_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    val_tf = transforms.Compose([transforms.Resize(round(args.image_size / 0.875)),
                                 transforms.CenterCrop(args.image_size), transforms.ToTensor(), norm])
    train = datasets.ImageFolder(str(root / "train"), train_tf)
    val = datasets.ImageFolder(str(root / "val"), val_tf) if (root / "val").is_dir() else None
    if val is not None and val.classes != train.classes:
        sys.exit(f"val/ classes {val.classes} differ from train/ classes {train.classes}")
    return train, val


def build_plain(name: str, num_classes: int):
    """The plain model of ``family:name`` with a ``num_classes`` head, random weights."""
    family, _, model = name.rpartition(":")
    family = family or "torchvision"
    if family == "torchvision":
        import torchvision.models as tvm
        if not callable(getattr(tvm, model, None)):
            sys.exit(f"unknown torchvision model {model!r}")
        return getattr(tvm, model)(weights=None, num_classes=num_classes)
    if family == "timm":
        try:
            import timm
        except ImportError:
            sys.exit("timm: models need timm: pip install 'cmpe_se_fused[vision]'")
        return timm.create_model(model, pretrained=False, num_classes=num_classes)
    sys.exit(f"--model must be torchvision:NAME or timm:NAME, got {name!r}")


def read_state_dict(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def load_plain_checkpoint(model, path, log):
    """Load a plain checkpoint into the converted ``model`` (strict=False): keys whose shapes do
    not fit are dropped; anything missing beyond those and the CMPE-SE layers is an error."""
    state = read_state_dict(path)
    own = model.state_dict()
    dropped = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    res = model.load_state_dict({k: v for k, v in state.items() if k not in dropped}, strict=False)
    other = [k for k in res.missing_keys if ".cmpe_se." not in k and k not in dropped]
    if other:
        sys.exit(f"{path} does not fit --model: missing {other[:8]}{' ...' if len(other) > 8 else ''}")
    log(f"loaded {path}: {len(state) - len(dropped) - len(res.unexpected_keys)} tensors; new (CMPE-SE): "
        f"{sum('.cmpe_se.' in k for k in res.missing_keys)}; dropped (shape): {dropped}; "
        f"unused: {res.unexpected_keys[:8]}{' ...' if len(res.unexpected_keys) > 8 else ''}")
    return res


def model_config(args, num_classes, classes):
    layer = {k: v for k, v in dict(reduction=args.reduction, fold_width=args.fold_width,
                                   pair_filters=args.pair_filters, padding=args.padding).items() if v is not None}
    return dict(model=args.model, num_classes=num_classes, classes=classes,
                se_mode=None if args.se_mode == "none" else args.se_mode, backend=args.backend, layer_kwargs=layer)


def build_model(config):
    """The network of a config dict (as saved in checkpoints), random weights."""
    model = build_plain(config["model"], config["num_classes"])
    if config["se_mode"] is not None:
        model = add_cmpe_se(model, config["se_mode"], backend=config["backend"], inplace=True,
                            **config["layer_kwargs"])
    return model


def prepare_model(args, config, device, world, log):
    """(core model for state_dicts, the model to call)."""
    core = build_model(config)
    if args.pretrained:
        load_plain_checkpoint(core, args.pretrained, log)
    return loop.wrap_model(args, core.to(device), device, world)


# ------------------------------------------------------------------------------------------------
# train / evaluate / log (the loop itself: training_loop.py)
# ------------------------------------------------------------------------------------------------

def make_loaders(args, train_set, val_set, rank, world):
    # drop the last partial batch only where a whole global batch exists (a tiny dataset still trains)
    per_rank = max(1, args.batch_size // world)
    return loop.loaders(args, train_set, val_set, rank, world, drop_last=len(train_set) >= per_rank * world)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = loop.setup_distributed(args)
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    train_set, val_set = make_datasets(args)
    config = model_config(args, len(train_set.classes), train_set.classes)
    torch.manual_seed(args.seed)  # the same initial CMPE-SE weights on every rank
    core, model = prepare_model(args, config, device, world, log)
    torch.manual_seed(args.seed + rank)
    opt = torch.optim.SGD(core.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, args.epochs))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    out = Path(args.out)
    history, start = loop.resume_from(args, out, core, opt, sched, scaler, device)
    train_loader, val_loader, sampler = make_loaders(args, train_set, val_set, rank, world)
    ctx = loop.run_context(args, device, rank, smoothing=args.label_smoothing)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        log(f"{args.model} se_mode={args.se_mode} backend={args.backend}: "
            f"{sum(p.numel() for p in core.parameters()) / 1e6:.3f}M parameters; {len(train_set.classes)} classes, "
            f"{len(train_set)} training images; {world} process(es), device {device}")
    for epoch in range(start, args.epochs):
        lr, tr, elapsed = loop.train_epoch(model, train_loader, sampler, epoch, ctx, opt, scaler, world)
        sched.step()
        row = dict(epoch=epoch + 1, lr=lr, train_loss=tr[0] / tr[2], train_acc=tr[1] / tr[2], val_loss="",
                   val_acc="", epoch_time_s=round(elapsed, 3), images_per_s=round(tr[2] / elapsed, 1))
        if val_loader is not None:
            va = loop.reduce_sums(loop.run_epoch(model, val_loader, ctx, False, desc="val"), device, world)
            row.update(val_loss=va[0] / va[2], val_acc=va[1] / va[2])
        history.append(row)
        if rank == 0:
            log(loop.format_row(row))
            loop.save(out, core, opt, sched, scaler, history, config, args, FIELDS, ("train", "val"))
    if world > 1:
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
