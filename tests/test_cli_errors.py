"""The command lines a new user runs first (issue 13, items 11 and 12): bad arguments give a clear
error naming the option and what it accepts (argparse's exit status 2, no traceback), and what the
tools say they did is what they did."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cmpe_se_fused.bench import __main__ as bench_cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(args, timeout=180):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout, check=False)


def load_train_cifar():
    spec = importlib.util.spec_from_file_location("train_cifar", EXAMPLES / "train_cifar.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tc():
    return load_train_cifar()


# ---- python -m cmpe_se_fused.bench ------------------------------------------------------------

BENCH_BAD = [
    (["--compare", "/missing/old.json"], "--compare"),
    (["--device", "tpu"], "--device"),
    (["--batch", "-3"], "--batch"),
    (["--batch", "0"], "--batch"),
    (["--threads", "0"], "--threads"),
    (["--e2e-batch", "-1"], "--e2e-batch"),
]


@pytest.mark.parametrize("argv,option", BENCH_BAD, ids=[" ".join(a) for a, _ in BENCH_BAD])
def test_bench_bad_arguments_are_usage_errors(argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_cli.main(["--list", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err or f"{option}:" in err, err


def test_bench_compare_not_json_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "old.json"
    bad.write_text("not json")
    with pytest.raises(SystemExit) as exc:
        bench_cli.main(["--list", "--compare", str(bad)])
    assert exc.value.code == 2
    assert "--compare" in capsys.readouterr().err


def test_bench_bad_argument_in_a_fresh_process():
    """As a user meets it: no traceback, the option named."""
    res = run(["-m", "cmpe_se_fused.bench", "--compare", "/missing/old.json"])
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "--compare" in res.stderr, res.stderr[-2000:]


def test_bench_help_speaks_of_the_project_not_of_work_items():
    text = bench_cli.build_parser().format_help()
    assert not re.search(r"\bissues? \d", text), text


def test_bench_without_matplotlib_does_not_claim_a_plot(tmp_path):
    """A tiny real run in a fresh process where ``import matplotlib`` fails."""
    code = ("import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.pyplot'] = None\n"
            "from cmpe_se_fused.bench.__main__ import main\n"
            f"sys.exit(main(['--modes', 'se', '--eval', '--passes', 'fwd', '--batch', '2', '--threads', '1',"
            f" '--providers', 'eager', '--layouts', 'nchw', '--dtypes', 'fp32', '--no-e2e', '--device', 'cpu',"
            f" '--budget-s', '20', '--out', {str(tmp_path)!r}]))\n")
    res = run(["-c", code], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "bench.json").exists() and not (tmp_path / "bench.png").exists()
    wrote = [line for line in res.stderr.splitlines() if "wrote" in line]
    assert wrote and not any("bench.png" in line for line in wrote), wrote
    assert "matplotlib" in res.stderr, res.stderr[-2000:]


# ---- examples/train_cifar.py ------------------------------------------------------------------

TC_BAD = [
    (["--backend", "bogus"], "--backend"),
    (["--model", "preact_resnet21"], "--model"),
    (["--model", "vgg16"], "--model"),
    (["--model", "wrn27_10"], "--model"),
]


@pytest.mark.parametrize("argv,option", TC_BAD, ids=[" ".join(a) for a, _ in TC_BAD])
def test_train_cifar_bad_arguments_are_usage_errors(tc, argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        tc.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err, err


@pytest.mark.parametrize("model", ["preact_resnet20", "preact_resnet110"])
def test_train_cifar_folded_default_too_small_names_stage_and_option(tc, model, capsys):
    """Pre-act ResNet-20/110 start with 16 channels: the default fold width 16 leaves a 2-row fold."""
    with pytest.raises(SystemExit) as exc:
        tc.main(["--synthetic", "--model", model, "--device", "cpu", "--workers", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "stage 1" in err and "16 channels" in err and "--fold-width" in err and "--padding" in err, err


def test_train_cifar_bad_configuration_in_a_fresh_process():
    res = run([str(EXAMPLES / "train_cifar.py"), "--synthetic", "--model", "preact_resnet110", "--device", "cpu"])
    assert res.returncode == 2 and "Traceback" not in res.stderr and "--fold-width" in res.stderr, res.stderr[-3000:]


def test_train_cifar_resume_of_a_finished_run_says_so(tc, tmp_path, capsys):
    tiny = ["--synthetic", "--synthetic-size", "16", "--model", "preact_resnet8", "--se-mode", "se",
            "--batch-size", "8", "--steps-per-epoch", "1", "--workers", "0", "--no-progress", "--device", "cpu",
            "--backend", "reference", "--epochs", "1", "--out", str(tmp_path)]
    tc.main(tiny)
    capsys.readouterr()
    history = tc.main([*tiny, "--resume", "auto"])
    out = capsys.readouterr().out
    assert len(history) == 1
    assert "finished" in out and "--epochs" in out, out
