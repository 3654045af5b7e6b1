"""Issue 25, the first hour of a new user: the README's commands, silent no-ops of the model
converters, the fold-width message, and output that says nothing about the user's run. The
user-facing checks run in fresh processes with stderr captured, as a user meets them."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)\n```", text, re.S)
    assert m, f"README.md has no bash block after <!-- {marker} -->"
    return m.group(1)


def _pins(command: str) -> dict:
    return dict(re.findall(r"(?<![\w.-])([A-Za-z][\w.-]*)==([\w.+-]+)", command))


# -- items 1, 2: the README's commands -----------------------------------------------------------

def test_main_command_pins_triton_like_the_test_command():
    """pip would otherwise download the newest triton (285 MB) and backtrack to torch's pin."""
    main, test = _pins(_readme_command("main-command")), _pins(_readme_command("test-command"))
    assert "triton" in test, "the test command pins triton"
    assert main.get("triton") == test["triton"], f"main command pins {main}, test command {test}"


def test_test_command_asks_for_the_cuda_build():
    """A plain install builds _C_cuda only for a visible GPU; CI has none, so the test command (which
    CI runs) asks for it, and with FORCE_CUDA=1 a failed CUDA build fails CI instead of being skipped."""
    test = _readme_command("test-command")
    install = next(part for part in test.split("&&") if "pip install --no-build-isolation" in part)
    assert "FORCE_CUDA=1" in install and "TORCH_CUDA_ARCH_LIST=" in install, install
    assert "--require built" in test
    main = _readme_command("main-command")
    assert "FORCE_CUDA" not in main and "TORCH_CUDA_ARCH_LIST" not in main  # the main command takes the default


# -- item 5: converters that find nothing say so --------------------------------------------------

def _plain_model(kind):
    from torch import nn
    if kind == "sequential":
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(weights=None)  # the mix-up with add_cmpe_se


@pytest.mark.parametrize("kind", ["sequential", "torchvision resnet18"])
def test_convert_model_without_cmpe_se_layers_warns_naming_add_cmpe_se(kind):
    from cmpe_se_fused.convert import convert_model, revert_model
    model = _plain_model(kind)
    with pytest.warns(UserWarning, match=r"no CMPE-SE layer.*add_cmpe_se") as caught:
        out = convert_model(model)
    assert len([w for w in caught if "add_cmpe_se" in str(w.message)]) == 1
    assert type(model).__name__ in str(caught[0].message)
    assert type(out) is type(model)
    with pytest.warns(UserWarning, match=r"revert_model.*nothing was changed.*add_cmpe_se"):
        revert_model(model)


def test_converters_with_layers_do_not_warn():
    import warnings

    from cmpe_se_fused.convert import convert_model, revert_model
    from cmpe_se_fused.models import preact_resnet
    net = preact_resnet(8, se_mode="se", backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        eager = revert_model(convert_model(net, backend="reference"))
    with pytest.warns(UserWarning, match=r"already eager"):  # nothing fused left: said, without add_cmpe_se
        revert_model(eager)


# -- item 6: the fold-width message ----------------------------------------------------------------

def test_default_fold_width_error_says_it_is_the_default_and_lists_valid_widths():
    from cmpe_se_fused import CMPESE
    with pytest.raises(ValueError) as exc_info:
        CMPESE(100)
    msg = str(exc_info.value)
    assert "got 16 (the default fold_width" in msg, msg
    widths = [int(w) for w in re.search(r"nearest C/10 first: ([\d, ]+)", msg).group(1).split(", ")]
    assert widths[0] == 10 and sorted(widths) == [4, 5, 10, 20, 25, 50], msg  # divisors with a legal 3x3 fold
    CMPESE(100, fold_width=widths[0])  # the first one offered works
    with pytest.raises(ValueError) as exc_info:
        CMPESE(100, fold_width=7)
    assert "got 7;" in str(exc_info.value) and "default" not in str(exc_info.value)


def test_fold_width_suggestions_follow_padding_and_the_fold_size():
    from cmpe_se_fused import CMPESE
    with pytest.raises(ValueError, match=r"fold too small.*nearest C/10 first: 4, 8, 16$"):
        CMPESE(32, fold_width=32)
    with pytest.raises(ValueError, match=r"C=7 with padding=0.*padding=1"):
        CMPESE(7)
    with pytest.raises(ValueError, match=r"padding=1, nearest C/10 first: 1, 7"):
        CMPESE(7, padding=1)


# -- item 8: nothing the user runs prints torch's CUDA_HOME guess ------------------------------------

TORCH_LOG_LINE = re.compile(r"^[WE]\d{4} \d\d:\d\d:\d\d", re.MULTILINE)  # torch's logging format


def _user_commands(tmp_path):
    py = sys.executable
    bench = [py, "-m", "cmpe_se_fused.bench", "--batch", "2", "--modes", "folded_3x3", "--train", "--passes", "fwd",
             "--providers", "eager,compile,cpu", "--no-e2e", "--no-plot", "--threads", "1", "--out", str(tmp_path)]
    examples = [[py, str(ROOT / "examples" / name), "--help"]
                for name in ("train_cifar.py", "plot_attention.py", "finetune_imagefolder.py")]
    return [[py, "-m", "cmpe_se_fused.info"], [py, "-m", "cmpe_se_fused.demo"], bench, *examples]


@pytest.mark.slow
def test_user_commands_print_no_torch_cuda_home_warning(tmp_path):
    """With nvcc on the machine, no GPU and CUDA_HOME unset, torch.utils.cpp_extension logs a CUDA_HOME
    guess when imported (torch.utils.benchmark and torch.compile on CPU import it). A fresh process
    per command, as the user runs it; the bench run includes the compile provider."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env.setdefault("CMPE_SE_BENCH_NO_PROGRESS", "1")
    for cmd in _user_commands(tmp_path):
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
        shown = " ".join(Path(c).name for c in cmd[1:4])
        assert proc.returncode == 0, f"{shown}: rc {proc.returncode}\n{proc.stderr[-2000:]}"
        assert "CUDA_HOME" not in proc.stderr and not TORCH_LOG_LINE.search(proc.stderr), \
            f"{shown} printed torch's noise:\n{proc.stderr[-2000:]}"


# -- item 4: interleaved rounds, spread, flags, the load watched throughout ----------------------------

def _row(prov, reps, other=0.0):
    return {"kind": "layer", "provider": prov, "status": "ok", "median_us": sorted(reps)[len(reps) // 2],
            "rep_us": list(reps), "flags": [], "spread": None, "other_load": None}


def test_rows_are_flagged_for_busy_unstable_and_flipping_rounds():
    from cmpe_se_fused.bench import stability
    limit = 0.5  # 2 cores, 2 threads
    quiet = [_row("eager", [100, 104, 101]), _row("cpu", [50, 52, 51])]
    for r in quiet:
        stability.finish_row(r, 0.1, limit)
    stability.flag_flips([(r, r["rep_us"]) for r in quiet])
    assert [r["flags"] for r in quiet] == [[], []] and quiet[0]["spread"] == pytest.approx(0.04)
    assert stability.verdict(quiet, {"monitored": True})["statement"] is None
    busy, unstable = _row("eager", [100, 101, 102]), _row("cpu", [50, 120, 51])
    stability.finish_row(busy, 1.2, limit)
    stability.finish_row(unstable, 0.0, limit)
    assert busy["flags"] == ["busy"] and busy["other_load"] == 1.2 and unstable["flags"] == ["unstable"]
    a, b = _row("cpu", [50, 60, 55]), _row("triton", [58, 50, 55])  # a faster, then b faster: the order flips
    for r in (a, b):
        stability.finish_row(r, 0.0, limit)
    stability.flag_flips([(a, a["rep_us"]), (b, b["rep_us"])])
    assert a["flags"] == ["flip"] and b["flags"] == ["flip"]
    v = stability.verdict([busy, unstable, a, b, *quiet], {"monitored": True, "max_other": 2, "cores": 2,
                                                            "threads": 2})
    assert not v["trusted"] and v["busy"] == 1 and v["unstable"] == 1 and v["flip"] == 2
    assert v["statement"].startswith("This run cannot be trusted: the machine was busy during 1 of 6 rows")
    assert stability.rotated(["a", "b", "c"], 1) == ["b", "c", "a"]


def test_providers_are_interleaved_and_repeated_within_each_row(tmp_path, monkeypatch):
    """Every row: ``repeats`` rounds, each timing every provider once, the order rotated."""
    torch = pytest.importorskip("torch")
    from cmpe_se_fused.bench import runner as runner_mod
    from cmpe_se_fused.bench.config import Preset, Shape, make_cases
    from cmpe_se_fused.bench.runner import Options, Runner
    calls = []
    real = runner_mod.time_fn

    def spy(fn, *a, **kw):
        calls.append((fn.name, fn.module.backend))
        return real(fn, *a, **kw)

    monkeypatch.setattr(runner_mod, "time_fn", spy)
    shape = Shape("tiny", "s1", 2, 32, 4, 4, 8, 2)
    cases = make_cases([shape], ("se",), ("fp32",), ("nchw",), ("eval",))
    opts = Options(preset=Preset("t", "t", [shape]), device=torch.device("cpu"), cases=cases, passes=("fwd",),
                   providers=("eager", "cpu"), out=str(tmp_path), quick_timing=True, plot=False,
                   copy_bytes=8 << 20, cpu_min_time=0.01)
    result = Runner(opts).run()
    order = [backend for _, backend in calls]
    assert order == ["reference", "cpu", "cpu", "reference", "reference", "cpu"], order  # A B, B A, A B
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    assert len(rows) == 2 and all(len(r["rep_us"]) == 3 and r["spread"] is not None for r in rows)
    assert all(r["median_us"] == sorted(r["rep_us"])[1] for r in rows)
    assert result["meta"]["load"]["monitored"] and result["meta"]["load"]["samples"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "Load watched throughout" in md.split("## ")[0] and "\u00b1" in md


BENCH_SMALL = ["-m", "cmpe_se_fused.bench", "--batch", "2", "--modes", "se,folded_3x3", "--passes", "fwd",
               "--providers", "eager,cpu", "--no-e2e", "--no-plot", "--threads", "1"]
#: a busy loop that says when it runs (a Python start takes a second or more on a loaded machine)
HOG = "import time\nend = time.time() + 120\nprint('busy', flush=True)\nwhile time.time() < end:\n    pass\n"


def _bench_env():
    return dict(os.environ, CMPE_SE_BENCH_NO_PROGRESS="1")


def _read_run(out: Path):
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


@pytest.mark.slow
def test_a_quiet_run_is_not_flagged(tmp_path):
    """Small shapes, one thread: on a machine nobody else is using, no row is flagged and bench.md
    makes no statement. A machine busy with other work (the monitor says so) gets one more try,
    then the check is skipped: a busy machine cannot give a quiet run."""
    for attempt in range(2):
        out = tmp_path / f"quiet{attempt}"
        proc = subprocess.run([sys.executable, *BENCH_SMALL, "--out", str(out)], env=_bench_env(), cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        data, md = _read_run(out)
        if not data["trust"]["busy"]:
            break
        time.sleep(5)
    else:
        pytest.skip(f"the machine was busy with other work in 2 runs (load {data['meta']['load']})")
    flagged = [(r["provider"], r["pass"], r["mode"], r["rep_us"], r["flags"]) for r in data["rows"] if r["flags"]]
    assert not flagged, flagged
    assert data["trust"]["statement"] is None and "cannot be trusted" not in md
    assert "Load watched throughout" in md.split("## ")[0]


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="the load monitor reads /proc (Linux)")
def test_the_runs_own_child_processes_are_not_other_load():
    """torch.compile's compile workers are the run's own work: a busy child of the bench process counts
    as its own demand (so an idle machine's compile rows are not flagged busy), a sibling's does not."""
    from cmpe_se_fused.bench import stability
    child = subprocess.Popen([sys.executable, "-c", HOG], stdout=subprocess.DEVNULL)
    try:
        deadline, seen = time.time() + 30, 0
        while time.time() < deadline and seen < 2:
            seen = max(seen, stability._own_running())  # this thread and the child's busy loop
            time.sleep(0.05)
        assert seen >= 2, "a busy child process was not counted as the run's own"
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_a_cpu_hog_started_halfway_is_flagged(tmp_path):
    """Once a quarter of the run's cases are in bench.json (rewritten after every case), busy loops
    start, one more than there are cores: every row measured after they all run is flagged busy, and
    bench.md says at the top that the run cannot be trusted. The rows are taken from when the loops
    run, not from when they were asked for (a Python start can take a second on a loaded machine),
    and the extra loop keeps the monitor's estimate of a short row (two or three samples of the
    runnable tasks, each off by one when a thread changes state between the two reads) above the
    limit: with one loop per core, rows at 'other load 1.5' (limit 1.5) failed it under pytest -n 2."""
    out = tmp_path / "hog"
    bench = subprocess.Popen([sys.executable, *BENCH_SMALL, "--out", str(out)], env=_bench_env(), cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    hogs, hog_at, n_cases = [], None, 2 * 2 * 2  # shapes x modes x phases
    try:
        deadline = time.time() + 240
        while bench.poll() is None and time.time() < deadline:
            try:
                done = {(r["stage"], r["mode"], r["phase"]) for r in json.loads((out / "bench.json").read_text())
                        ["rows"] if r["status"] == "ok"}
            except (OSError, ValueError, KeyError):
                done = set()
            if len(done) >= n_cases // 4:
                hogs = [subprocess.Popen([sys.executable, "-c", HOG], stdout=subprocess.PIPE, text=True)
                        for _ in range((os.cpu_count() or 1) + 1)]
                for h in hogs:  # from when every busy loop runs, not when its process was asked for
                    assert h.stdout.readline() == "busy\n", "a busy loop did not start"
                hog_at = time.time()
                break
            time.sleep(0.05)
        err = bench.communicate(timeout=300)[1]
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert bench.returncode == 0, err[-2000:]
    assert hog_at is not None, "the run ended before a quarter of its cases were written"
    data, md = _read_run(out)
    hog_s = hog_at - data["meta"]["started_epoch"]
    after = [r for r in data["rows"] if r["status"] == "ok" and (r.get("at_s") or -1) > hog_s + 0.5]
    assert after, "no row was measured after the hog started"
    assert all("busy" in r["flags"] for r in after), [(r["at_s"], r["other_load"], r["flags"]) for r in after]
    assert data["trust"]["busy"] >= len(after) and not data["trust"]["trusted"]
    assert md.split("\n")[2].startswith("**This run cannot be trusted: the machine was busy"), md[:400]


# -- item 3: the default preset runs what the main command installed; no empty memory column on CPU ----

def test_default_preset_leaves_out_rows_whose_packages_are_missing(monkeypatch, capsys):
    from cmpe_se_fused.bench import __main__ as cli
    from cmpe_se_fused.bench import e2e
    from cmpe_se_fused.bench.runner import Runner
    monkeypatch.setattr(e2e.importlib.util, "find_spec", lambda name: None)  # as after the main command
    assert cli.main(["--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "e2e off" in out and "e2e rows of resnet50-tv left out: needs torchvision, timm " \
        "(pip install 'cmpe_se_fused[vision]'); add them with --e2e" in out, out
    opts = cli.options_from_args(cli.build_parser().parse_args(["--device", "cpu"]))
    assert Runner(opts).e2e_plan() == []
    asked = cli.options_from_args(cli.build_parser().parse_args(["--device", "cpu", "--e2e"]))
    assert Runner(asked).e2e_plan() == [("resnet50-tv", (2,))]  # asked for: kept, skipped with the reason
    monkeypatch.undo()
    if e2e.missing_packages("resnet50-tv") is None:  # installed: the default preset runs them
        assert Runner(opts).e2e_plan() == [("resnet50-tv", (2,))]


def test_cpu_tables_have_no_memory_column(tmp_path):
    from cmpe_se_fused.bench import report
    row = {"kind": "layer", "provider": "eager", "status": "ok", "pass": "fwdbwd", "median_us": 10.0,
           "speedup_vs_eager": 1.0, "speedup_vs_compile": None, "frac_floor": 0.5, "mem_vs_eager": None}
    header, lines = report.summary_table([row])
    assert "median mem vs eager" not in header and len(lines[0]) == len(header)
    header, _ = report.summary_table([dict(row, mem_vs_eager=0.5)])  # GPU rows: measured, shown
    assert "median mem vs eager" in header
    e2e_row = {"kind": "e2e", "net": "n", "N": 2, "se_mode": "plain", "dtype": "fp32", "layout": "nchw",
               "provider": "plain", "status": "ok", "median_us": 5.0, "images_per_s": 4e5, "peak_mem_mb": None}
    header, lines = report.e2e_table([e2e_row])
    assert "peak MB" not in header and len(lines[0]) == len(header)


# -- item 7: num_batches_tracked under activation checkpointing ------------------------------------

@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_checkpoint_counts_num_batches_tracked_like_batchnorm(use_reentrant, backend):
    """A training forward under torch.utils.checkpoint runs again in backward (non-reentrant:
    until the saved tensors are recomputed, then it stops early). nn.BatchNorm2d counts the batch
    before computing, so it counts both runs; CMPESE must count what nn.BatchNorm2d counts."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from cmpe_se_fused import CMPESE
    torch.manual_seed(0)
    layer = CMPESE(32, mode="folded_3x3", fold_width=8, backend=backend).train()
    bn = torch.nn.BatchNorm2d(8).train()
    u = torch.randn(2, 32, 4, 4, requires_grad=True)
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    checkpoint(layer, u, x, use_reentrant=use_reentrant).sum().backward()
    v = torch.randn(2, 8, 4, 4, requires_grad=True)
    checkpoint(lambda t: bn(t) * 2, v, use_reentrant=use_reentrant).sum().backward()
    assert int(bn.num_batches_tracked) == 2  # the forward and its recompute
    assert int(layer.pair_bn.num_batches_tracked) == int(bn.num_batches_tracked)
