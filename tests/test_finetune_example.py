"""examples/finetune_imagefolder.py: a tiny real ImageFolder of PNG files, a plain checkpoint to start
from, a few CPU steps in a fresh process (and in-process for timm, AMP and channels_last)."""
from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("torchvision.models", reason="torchvision is not installed (pip install "
                          "'cmpe_se_fused[vision]'; CI installs it)")
timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'cmpe_se_fused[vision]'; CI installs it)")
PIL_Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (torchvision needs it)")

from cmpe_se_fused import CMPESE  # noqa: E402
from cmpe_se_fused.convert import add_cmpe_se  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune_imagefolder.py"
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
CLASSES = ("cat", "dog", "emu")


pytestmark = pytest.mark.usefixtures("one_thread")


def write_image_folder(root: Path, per_class=(4, 2), size=40):
    """train/ and val/ with one folder per class of random PNGs (class-dependent colour)."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for k, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(60 + 70 * k, 30, (size, size + 4, 3)), 0, 255).astype(np.uint8)
                PIL_Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


def load_example():
    spec = importlib.util.spec_from_file_location("finetune_imagefolder", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_log(out):
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


TINY = ["--image-size", "32", "--batch-size", "4", "--steps-per-epoch", "2", "--workers", "0", "--no-progress",
        "--device", "cpu"]


def test_timm_se_model_amp_channels_last_and_resume(tmp_path):
    ft = load_example()
    data = write_image_folder(tmp_path / "data", per_class=(2, 1))
    out = tmp_path / "run"
    args = ["--data", str(data), "--model", "timm:seresnet18", "--se-mode", "se", "--amp", "bf16", "--channels-last",
            "--out", str(out), *TINY, "--steps-per-epoch", "1"]
    ft.main([*args, "--epochs", "1"])
    ft.main([*args, "--epochs", "2", "--resume", "auto"])
    rows = read_log(out)
    assert [r["epoch"] for r in rows] == ["1", "2"] and np.isfinite(float(rows[-1]["train_loss"]))
    model = ft.build_model(torch.load(out / "last.pt", weights_only=False)["config"])
    assert not any(type(m).__name__ == "SEModule" for m in model.modules())
    assert {m.mode for m in model.modules() if isinstance(m, CMPESE)} == {"se"}


def test_bad_inputs_exit_with_a_reason(tmp_path):
    ft = load_example()
    with pytest.raises(SystemExit, match="train/"):
        ft.main(["--data", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match="torchvision:NAME or timm:NAME"):
        ft.build_plain("keras:resnet50", 3)
    data = write_image_folder(tmp_path / "data", per_class=(1, 1))
    torch.save(tvm.resnet18(weights=None).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(SystemExit, match="does not fit --model: missing"):
        ft.main(["--data", str(data), "--model", "resnet34", "--pretrained", str(tmp_path / "r18.pt"), *TINY])


@pytest.mark.skipif(importlib.util.find_spec("torch.distributed.run") is None, reason="torchrun is not available")
def test_torchrun_from_a_plain_torchvision_checkpoint(tmp_path):
    """As a user runs it: a fresh torchrun with two CPU ranks (DDP over gloo), a plain ImageNet
    checkpoint to start from, one short epoch; then the log, curves and checkpoint."""
    data = write_image_folder(tmp_path / "data")
    torch.manual_seed(0)
    plain = tvm.resnet18(weights=None)  # an ImageNet-head checkpoint: its fc does not fit 3 classes
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           "--data", str(data), "--model", "torchvision:resnet18", "--pretrained", str(tmp_path / "plain.pt"),
           "--se-mode", "folded_3x3", "--epochs", "1", "--lr", "0", "--out", str(out), *TINY]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert "dropped (shape): ['fc.bias', 'fc.weight']" in proc.stdout and "unused: []" in proc.stdout
    rows = read_log(out)
    assert [r["epoch"] for r in rows] == ["1"]
    assert all(np.isfinite(float(r[k])) for r in rows for k in ("train_loss", "val_loss"))
    assert (out / "curves.png").exists() == HAS_MPL
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["config"]["classes"] == list(CLASSES) and ckpt["epoch"] == 1
    assert all("module." not in k for k in ckpt["model"])  # saved from the unwrapped model
    # the checkpoint is the converted torchvision model and loads strictly into one
    model = add_cmpe_se(tvm.resnet18(weights=None, num_classes=3))
    model.load_state_dict(ckpt["model"], strict=True)
    assert sum(isinstance(m, CMPESE) for m in model.modules()) == 8
    # lr 0: every parameter of the plain checkpoint (all but the head) is still the checkpoint's
    params = {k for k, _ in model.named_parameters()}
    kept = [k for k in plain.state_dict() if k in params and not k.startswith("fc.")]
    assert len(kept) == 60 and all(torch.equal(plain.state_dict()[k], ckpt["model"][k]) for k in kept)
