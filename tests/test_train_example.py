"""examples/train_cifar.py and examples/plot_attention.py: helpers in-process, a short real run."""
from __future__ import annotations

import csv
import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cmpe_se_fused import CMPESE, CMPESEReference
from cmpe_se_fused.convert import revert_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
TINY = ["--synthetic", "--synthetic-size", "64", "--model", "preact_resnet20", "--se-mode", "folded_3x3",
        "--fold-width", "4", "--pair-filters", "2", "--batch-size", "8", "--steps-per-epoch", "2", "--workers", "0",
        "--no-progress", "--device", "cpu"]


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(EXAMPLES))
    return mod


@pytest.fixture(scope="module")
def tc():
    return load_example("train_cifar")


def test_paper_schedule(tc):
    args = tc.parse_args(["--model", "preact_resnet164"])
    assert (args.epochs, args.batch_size, args.lr, args.momentum, args.wd, args.no_nesterov) == \
        (200, 128, 0.1, 0.9, 5e-4, False)
    assert tc.schedule(args) == ([100, 150], 0.1)
    assert tc.schedule(tc.parse_args(["--model", "wrn28_10"])) == ([60, 120, 160], 0.2)
    assert tc.schedule(tc.parse_args(["--model", "wrn16_8", "--epochs", "10"])) == ([3, 6, 8], 0.2)


def test_build_model_names(tc):
    args = tc.parse_args(["--model", "preact_resnet20", "--se-mode", "pair_1x1", "--backend", "reference"])
    net = tc.build_model(tc.model_config(args, 100))
    assert net.fc.out_features == 100 and len(net.stages[0]) == 3
    assert {m.backend for m in net.modules() if isinstance(m, CMPESE)} == {"reference"}
    args = tc.parse_args(["--model", "wrn10_1", "--se-mode", "none"])
    assert not any(isinstance(m, CMPESE) for m in tc.build_model(tc.model_config(args, 10)).modules())
    with pytest.raises(SystemExit):
        tc.build_model(tc.model_config(tc.parse_args(["--model", "vgg16"]), 10))


def test_augment(tc):
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    ev = tc.augment(x, mean, std, train=False)
    torch.testing.assert_close(ev, (x.float() / 255 - 0.5) / 0.25)
    tr = tc.augment(x, mean, std, train=True)
    assert tr.shape == (6, 3, 32, 32)
    # every training image is a (possibly flipped) shifted crop of the padded normalised image
    padded = torch.nn.functional.pad(ev, (4, 4, 4, 4))
    for i in range(6):
        crops = [padded[i, :, a:a + 32, b:b + 32] for a in range(9) for b in range(9)]
        assert any(torch.equal(tr[i], c) or torch.equal(tr[i], c.flip(2)) for c in crops)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_load_cifar_without_torchvision(tc, tmp_path, dataset):
    """The python-pickle release is read directly (torchvision only downloads)."""
    rng = np.random.default_rng(0)
    key = b"labels" if dataset == "cifar10" else b"fine_labels"
    folder = tmp_path / ("cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python")
    folder.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if dataset == "cifar10" else ["train", "test"]
    for name in names:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), key: [1, 2, 3, 4]}, f)
    train_x, _, test_x, test_y = tc.load_cifar(str(tmp_path), dataset, download=False)
    assert train_x.shape == ((20 if dataset == "cifar10" else 4), 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (4, 3, 32, 32) and test_y.tolist() == [1, 2, 3, 4]
    with pytest.raises(SystemExit, match="--synthetic"):
        tc.load_cifar(str(tmp_path / "nowhere"), dataset, download=False)


def read_log(out):
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


def test_smoke_run_resume_checkpoint_and_plots(tc, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # 1 mixup epoch + 1 plain epoch, in a fresh process as a user would run it
    cmd = [sys.executable, str(EXAMPLES / "train_cifar.py"), *TINY, "--epochs", "1", "--mixup", "0.4",
           "--plain-epochs", "1", "--backend", "reference", "--out", str(out)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_log(out)
    assert [(r["epoch"], float(r["mixup"])) for r in rows] == [("1", 0.4), ("2", 0.0)]
    assert all(np.isfinite(float(r["train_loss"])) for r in rows)
    assert (out / "curves.png").exists() == HAS_MPL
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["config"]["se_mode"] == "folded_3x3"
    # the checkpoint loads strictly into another backend and into the eager reference network
    other = tc.build_model({**ckpt["config"], "se_kwargs": {**ckpt["config"]["se_kwargs"], "backend": "auto"}})
    other.load_state_dict(ckpt["model"], strict=True)
    ref = revert_model(other)
    assert any(isinstance(m, CMPESEReference) for m in ref.modules())
    ref.load_state_dict(ckpt["model"], strict=True)
    # resume (in-process, cheaper): one more plain epoch, history kept
    shutil.copy(out / "log.csv", tmp_path / "log_before.csv")
    tc.main([*TINY, "--epochs", "1", "--mixup", "0.4", "--plain-epochs", "2", "--backend", "auto",
             "--out", str(out), "--resume", "auto"])
    rows2 = read_log(out)
    assert [r["epoch"] for r in rows2] == ["1", "2", "3"] and rows2[:2] == rows
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 3
    if not HAS_MPL:
        return
    pa = load_example("plot_attention")
    figs = tmp_path / "figs"
    pa.main([str(out / "last.pt"), "--out", str(figs), "--num-images", "6", "--compare", str(out / "last.pt"),
             "--data", str(tmp_path / "no_data"), "--device", "cpu"])
    for name in ("maps.png", "gates.png", "gate_stats.png", "gate_stats.csv", "records.pt"):
        assert (figs / name).stat().st_size > 0, name
    with open(figs / "gate_stats.csv") as f:
        stats = list(csv.DictReader(f))
    assert len(stats) == 2 * 9 and len({r["run"] for r in stats}) == 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and importlib.util.find_spec("torch.distributed.run") is None,
                    reason="torchrun is not available")
def test_torchrun_two_processes_sync_se_bn(tmp_path):
    """DDP through torchrun on CPU (gloo), pair-view BN synchronised, two ranks."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(EXAMPLES / "train_cifar.py"), *TINY, "--epochs", "1", "--sync-se-bn", "--backend", "reference",
           "--out", str(out)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    rows = read_log(out)
    assert len(rows) == 1 and np.isfinite(float(rows[0]["train_loss"]))
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert all("module." not in k for k in ckpt["model"])  # saved from the unwrapped model
