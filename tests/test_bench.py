"""The benchmark suite (cmpe_se_fused.bench): floor bookkeeping, row schema, --compare, and tiny
runs of every provider usable on CPU. Small and fast: no GPU, shapes of a few KB."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch

from cmpe_se_fused.bench import __main__ as cli
from cmpe_se_fused.bench import config, e2e, metrics, report
from cmpe_se_fused.bench import providers as bench_providers
from cmpe_se_fused.bench.config import Case, Shape
from cmpe_se_fused.bench.runner import Options, Runner
from cmpe_se_fused.dispatch import BACKENDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = Shape("tiny", "s1", 4, 32, 4, 4, 8, 2)       # folded_3x3: 8 rows x 8 columns, e = 2
CPU = torch.device("cpu")
HAS_CPU_BACKEND = not BACKENDS["cpu"].not_supported_reasons()


def tiny_options(tmp_path, providers, modes=("se", "folded_3x3"), phases=("train", "eval"), passes=config.PASSES,
                 **kw) -> Options:
    preset = config.Preset("test", "tiny test preset", [TINY], modes=modes)
    cases = config.make_cases([TINY], modes, ("fp32",), ("nchw",), phases)
    return Options(preset=preset, device=CPU, cases=cases, passes=passes, providers=providers, out=str(tmp_path),
                   quick_timing=True, plot=False, copy_bytes=8 << 20, cpu_min_time=0.02, **kw)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tests check bookkeeping, not speed, and a busy 2-core machine
    makes OpenMP barriers slow."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- floors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,itemsize", [("fp32", 4), ("bf16", 2), ("fp16", 2)])
def test_floor_bytes(dtype, itemsize):
    t = metrics.activation_bytes(128, 160, 32, 32, dtype)
    assert t == 128 * 160 * 32 * 32 * itemsize
    assert [metrics.floor_bytes(p, t) for p in ("fwd", "bwd", "fwdbwd")] == [3 * t, 4 * t, 7 * t]
    assert [metrics.two_pass_bytes(p, t) for p in ("fwd", "bwd", "fwdbwd")] == [5 * t, 5 * t, 10 * t]


def test_layer_row_floor_time_at_copy_bandwidth():
    case = Case(TINY, "se", "bf16", "cl", "train")
    row = metrics.layer_row(case, "bwd", "cuda", copy_gbps=2000.0)
    t = 4 * 32 * 4 * 4 * 2
    assert row["T_bytes"] == t and row["floor_bytes"] == 4 * t and row["two_pass_bytes"] == 5 * t
    assert row["floor_us"] == pytest.approx(4 * t / 2000e9 * 1e6)
    assert row["two_pass_floor_us"] == pytest.approx(5 * t / 2000e9 * 1e6)


def test_derive_speedups_floor_fraction_and_best_compile():
    case = Case(TINY, "se", "fp32", "nchw", "train")
    rows = []
    for prov, us, mem in (("eager", 100.0, 40.0), ("compile", 50.0, 20.0), ("compile-max", 40.0, 20.0),
                          ("cuda", 10.0, 10.0)):
        r = metrics.layer_row(case, "fwdbwd", prov, copy_gbps=1.0)
        r.update(status="ok", median_us=us, peak_mem_mb=mem)
        rows.append(r)
    metrics.derive(rows)
    eager, _, _, cuda = rows
    assert eager["speedup_vs_eager"] == pytest.approx(1.0)
    assert cuda["speedup_vs_eager"] == pytest.approx(10.0)
    assert cuda["speedup_vs_compile"] == pytest.approx(4.0) and cuda["compile_baseline"] == "compile-max"
    assert cuda["frac_floor"] == pytest.approx(cuda["floor_us"] / 10.0)
    assert cuda["GBps"] == pytest.approx(cuda["floor_bytes"] / 10e3)
    assert cuda["mem_vs_eager"] == pytest.approx(0.25)
    for r in rows:
        assert metrics.check_row(r) == []


# -- --compare ---------------------------------------------------------------------------------

def test_compare_flags_rows_more_than_threshold_slower():
    case = Case(TINY, "se", "fp32", "nchw", "eval")
    old, new = [], []
    for prov, t_old, t_new in (("eager", 100.0, 105.0), ("cpu", 10.0, 12.0), ("compile", 50.0, 30.0)):
        for rows, t in ((old, t_old), (new, t_new)):
            r = metrics.layer_row(case, "fwd", prov, 1.0)
            r.update(status="ok", median_us=t)
            rows.append(r)
    skipped = metrics.layer_row(case, "bwd", "cpu", 1.0)  # not ok: never compared
    res = metrics.compare(new + [skipped], old + [skipped], threshold=0.10)
    assert res["matched"] == 3
    assert [i["key"].split("|")[-1] for i in res["regressions"]] == ["cpu"]
    assert res["regressions"][0]["ratio"] == pytest.approx(1.2)
    assert [i["key"].split("|")[-1] for i in res["improvements"]] == ["compile"]


# -- tiny runs -----------------------------------------------------------------------------------

def _check_result(tmp_path, result):
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["schema"] == report.SCHEMA_VERSION
    meta = data["meta"]
    for key in ("device", "versions", "git", "kernel_hash", "copy_bandwidth", "preset", "complete"):
        assert key in meta, key
    assert meta["complete"] and meta["copy_bandwidth"]["GBps"] > 0
    assert set(meta["versions"]) >= {"torch", "triton", "cuda", "python"}
    for row in data["rows"]:
        assert metrics.check_row(row) == [], row
    assert (tmp_path / "bench.md").read_text().startswith("# cmpe_se_fused benchmark")
    return data["rows"]


def test_tiny_run_eager_and_cpu_backend(tmp_path):
    providers = ("eager", "cpu", "triton")
    result = Runner(tiny_options(tmp_path, providers)).run()
    rows = _check_result(tmp_path, result)
    n_cases = 2 * 2  # modes x phases
    assert len(rows) == n_cases * len(config.PASSES) * len(providers)
    eager = [r for r in rows if r["provider"] == "eager"]
    assert all(r["status"] == "ok" and r["median_us"] > 0 and r["speedup_vs_eager"] == pytest.approx(1.0)
               for r in eager)
    # triton on CPU is the interpreter: recorded as skipped with the reason, never timed
    assert all(r["status"] == "skipped" and "interpreter" in r["reason"] for r in rows if r["provider"] == "triton")
    cpu = [r for r in rows if r["provider"] == "cpu"]
    if HAS_CPU_BACKEND:
        assert all(r["status"] == "ok" and r["check"] == "ok" for r in cpu), [r["reason"] for r in cpu]
        assert all(r["frac_floor"] > 0 and r["speedup_vs_eager"] > 0 for r in cpu)
    else:
        assert all(r["status"] == "skipped" and "_C" in r["reason"] for r in cpu)


@pytest.mark.slow
def test_tiny_run_compile(tmp_path):
    """One torch.compile (train, fwd+bwd graph): slow-ish on CPU, so one case and two passes."""
    opts = tiny_options(tmp_path, ("eager", "compile"), modes=("se",), phases=("train",), passes=("fwd", "bwd"))
    rows = _check_result(tmp_path, Runner(opts).run())
    comp = [r for r in rows if r["provider"] == "compile"]
    assert len(comp) == 2 and all(r["status"] == "ok" for r in comp), [r["reason"] for r in comp]
    assert all(r["err_vs_eager"] is not None and r["check"] == "ok" for r in comp)
    eager = [r for r in rows if r["provider"] == "eager"]
    assert all(r["speedup_vs_compile"] is not None and r["compile_baseline"] == "compile" for r in eager)


def test_preset_limits_and_budget_are_recorded_as_skips(tmp_path):
    opts = tiny_options(tmp_path, ("eager", "compile"), modes=("se",), passes=("fwd",))
    opts.preset.limits = {"compile": {"phase": ("train",)}}
    opts.budget_s = 0.0  # every phase is over budget from the start
    rows = _check_result(tmp_path, Runner(opts).run())
    assert {r["status"] for r in rows} == {"skipped"}
    assert any("time budget" in r["reason"] for r in rows)
    assert any("only on phase=train" in r["reason"] for r in rows if r["provider"] == "compile")


def test_sigterm_writes_what_was_measured(tmp_path):
    """``timeout`` sends SIGTERM: the run stops and still writes bench.json / bench.md."""
    import signal
    import threading
    opts = tiny_options(tmp_path, ("eager",))
    opts.cpu_min_time = 0.3  # 12 timings of >= 0.3 s: the signal lands mid-run
    runner = Runner(opts)
    done = threading.Event()

    def kill_after_first_row():
        while not done.is_set():
            if any(r["status"] == "ok" for r in runner.rows):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_first_row, daemon=True)
    watcher.start()
    try:
        runner.run()
    finally:
        done.set()
        watcher.join()
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["interrupted"] and any("interrupted" in n for n in data["notes"])
    assert 0 < sum(r["status"] == "ok" for r in data["rows"]) < 12
    assert (tmp_path / "bench.md").exists()


def test_compare_through_runner(tmp_path):
    opts = tiny_options(tmp_path / "a", ("eager",), modes=("se",), phases=("eval",), passes=("fwd",))
    first = Runner(opts).run()
    old = json.loads(json.dumps(first))
    for r in old["rows"]:
        r["median_us"] = r["median_us"] / 100  # the old run was 100x faster: every row regressed
    opts2 = tiny_options(tmp_path / "b", ("eager",), modes=("se",), phases=("eval",), passes=("fwd",),
                         compare=old, compare_path="old.json")
    res = Runner(opts2).run()["compare"]
    assert res["matched"] == 1 and len(res["regressions"]) == 1 and res["regressions"][0]["ratio"] > 2
    assert "REGRESSION" in (tmp_path / "b" / "bench.md").read_text()


def test_e2e_rows_on_a_tiny_network(monkeypatch):
    from cmpe_se_fused.models import preact_resnet
    monkeypatch.setitem(e2e.NETS, "tiny", lambda **kw: preact_resnet(8, num_classes=100, **kw))
    rows = []
    providers = ("eager", "cpu") if HAS_CPU_BACKEND else ("eager",)
    e2e.run_e2e(["tiny"], ("se",), ("fp32",), ("nchw",), providers, CPU, 2, on_row=rows.append)
    metrics.derive(rows)
    e2e.derive_e2e(rows)
    assert [r["provider"] for r in rows] == ["plain", *providers]
    assert all(r["status"] == "ok" and metrics.check_row(r) == [] for r in rows), rows
    assert rows[1]["overhead_vs_plain"] is not None and rows[1]["speedup_vs_eager"] == pytest.approx(1.0)


def test_runner_e2e_nets_and_batches_from_the_preset(tmp_path, monkeypatch):
    """The runner runs the preset's e2e nets, each at the preset's batches for it (else
    ``e2e_batch``); ``e2e_batches`` in the options (--e2e-batch) override both."""
    from cmpe_se_fused.models import preact_resnet
    monkeypatch.setitem(e2e.NETS, "tiny", lambda **kw: preact_resnet(8, num_classes=100, **kw))
    monkeypatch.setitem(e2e.NETS, "tiny2", lambda **kw: preact_resnet(8, num_classes=100, **kw))
    monkeypatch.setattr(e2e, "_time_steps", lambda step, device, warmup, reps: (step(), (1000.0, 1))[1])

    def run(out, **kw):
        opts = tiny_options(out, ("eager",), modes=("se",), phases=("eval",), passes=("fwd",), e2e=True,
                            e2e_modes=("se",), e2e_dtypes=("fp32",), e2e_batch=2, **kw)
        opts.preset.e2e_nets, opts.preset.e2e_batches = ("tiny", "tiny2"), {"tiny": (3, 4)}
        return sorted({(r["net"], r["N"]) for r in Runner(opts).run()["rows"] if r["kind"] == "e2e"})

    assert run(tmp_path / "a") == [("tiny", 3), ("tiny", 4), ("tiny2", 2)]
    assert run(tmp_path / "b", e2e_batches=(5,)) == [("tiny", 5), ("tiny2", 5)]


# -- CLI, presets, gpu_check.sh ----------------------------------------------------------------

def test_cli_list_and_errors(capsys):
    assert cli.main(["--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "resnet164/s1" in out and "providers eager,compile,cpu" in out
    assert cli.main(["--list", "--modes", "bogus"]) == 2
    assert cli.main(["--list", "--providers", "nonsense"]) == 2


def test_presets_follow_the_paper_configs():
    wrn = {s.stage: s for s in config.PRESETS["wrn28-10"].shapes}
    assert (wrn["s1"].c, wrn["s1"].h, wrn["s1"].fold_width, wrn["s1"].pair_filters) == (160, 32, 16, 10)
    assert (wrn["s3"].c, wrn["s3"].h, wrn["s3"].fold_width, wrn["s3"].pair_filters) == (640, 8, 64, 40)
    r164 = [(s.c, s.h, s.fold_width, s.pair_filters) for s in config.PRESETS["resnet164"].shapes]
    assert r164 == [(64, 32, 16, 1), (128, 16, 16, 2), (256, 8, 16, 4)]
    r50 = config.PRESETS["resnet50"].shapes
    assert {s.n for s in r50} == {64, 256} and {(s.c, s.h) for s in r50} == {(256, 56), (512, 28), (1024, 14),
                                                                           (2048, 7)}
    gpu = config.PRESETS["gpu"]
    cases = config.make_cases(gpu.shapes, gpu.modes, gpu.dtypes["cuda"], gpu.layouts, gpu.phases)
    assert len(cases) == 6 * 2 * 2 * 2 * 2 and all(s.n == 128 for s in gpu.shapes)


def test_targets_preset_is_the_issue_targets_in_priority_order():
    """The preset gpu_check.sh runs first: the shapes, modes and dtypes the GPU issues name, eval
    before train, and its CUDA providers are known names (the resident variant included)."""
    t = config.PRESETS["targets"]
    assert [(s.net, s.stage, s.n, s.c, s.h) for s in t.shapes] == [("wrn28-10", "s1", 128, 160, 32),
                                                                   ("resnet164", "s3", 128, 256, 8)]
    cases = config.make_cases(t.shapes, t.modes, t.dtypes["cuda"], t.layouts, t.phases)
    assert len(cases) == 2 * 2 * 2 * 2 and [c.phase for c in cases[:8]] == ["eval"] * 8
    assert {c.dtype for c in cases} == {"fp32", "bf16"} and {c.mode for c in cases} == {"se", "folded_3x3"}
    for name in t.providers:
        bench_providers.check_provider_name(name)
    assert "cuda@resident" in t.providers
    wrn, r164 = cases[0], cases[1]
    assert config.limit_reason(t, "compile", wrn) is None and config.limit_reason(t, "compile", r164)


def test_gpu_check_script_syntax_and_usage():
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script], check=False).returncode == 0
    res = subprocess.run(["bash", script], capture_output=True, text=True, check=False)
    assert res.returncode == 2 and "usage" in res.stderr


# -- launch variants ---------------------------------------------------------------------------

def test_variant_parsing_and_triton_launch_keywords(monkeypatch):
    from cmpe_se_fused.triton import streaming as triton_kernels
    from cmpe_se_fused.bench import variants
    assert variants.parse_variant("triton@x:block_p=64,single_launch=false") == (
        "triton@x", {"block_p": 64, "single_launch": False})
    assert variants.parse_variant("cuda@s4:CMPE_SE_CUDA_SPLITS=4") == ("cuda@s4", {"CMPE_SE_CUDA_SPLITS": "4"})
    with pytest.raises(ValueError):
        variants.parse_variant("eager@x:a=1")
    seen = []

    def fake_forward(*args, num_warps=4, chunks=None):
        seen.append(("f", num_warps, chunks))

    def fake_backward(*args, num_warps=4):
        seen.append(("b", num_warps))

    monkeypatch.setattr(triton_kernels, "forward", fake_forward)
    monkeypatch.setattr(triton_kernels, "backward", fake_backward)
    with variants.triton_launch({"num_warps": 8, "chunks": 2}):
        triton_kernels.forward(1, 2)
        triton_kernels.backward(3)
    triton_kernels.forward(1, 2)
    assert seen == [("f", 8, 2), ("b", 8), ("f", 4, None)]
    with pytest.raises(ValueError), variants.triton_launch({"bogus": 1}):
        pass


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CPU_BACKEND, reason="needs the compiled CPU backend (cmpe_se_fused._C)")
def test_environment_variant_runs_in_a_child_process(tmp_path):
    """``cpu@base`` (CMPE_SE_CPU_ISA=default) is timed in a child process; its rows are merged."""
    argv = ["--modes", "se", "--eval", "--passes", "fwd", "--batch", "2", "--threads", "1", "--no-plot", "--no-e2e",
            "--providers", "eager,cpu@base", "--variant", "cpu@base:CMPE_SE_CPU_ISA=default", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    var = [r for r in rows if r["provider"] == "cpu@base"]
    assert len(var) == 2 and all(r["status"] == "ok" and r["check"] == "ok" for r in var), var
    assert all(r["speedup_vs_eager"] is not None for r in var)


def test_cuda_event_timer_logic_with_fake_events(monkeypatch):
    """time_cuda's control flow (estimate, warm-up, per-call events, median), on CPU with fake events."""
    from cmpe_se_fused.bench import timing

    class FakeEvent:
        def __init__(self, enable_timing=True):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    calls = []

    def fn(i):
        calls.append(i)
        time.sleep(0.002)

    t = timing.time_cuda(fn, 3, warmup_ms=5, rep_ms=20, min_reps=10)
    assert t.reps >= 10 and 1500 < t.median_us < 20000
    assert set(calls) == {0, 1, 2}


def test_console_and_plot_fall_back_without_rich_and_matplotlib(tmp_path, monkeypatch, capsys):
    import sys
    case = Case(TINY, "se", "fp32", "nchw", "train")
    rows = []
    for prov, us in (("eager", 100.0), ("cpu", 20.0)):
        r = metrics.layer_row(case, "fwd", prov, 1.0)
        r.update(status="ok", median_us=us)
        rows.append(r)
    metrics.derive(rows)
    result = {"meta": {"device": {"name": "test", "type": "cpu"}, "versions": {"torch": "t", "triton": None,
                       "cuda": None, "python": "3"}, "git": {"short": "abc1234"}, "kernel_hash": None,
                       "preset": "test", "copy_bandwidth": {"GBps": 1.0, "method": "m", "bytes": 1 << 20}},
              "rows": rows, "notes": []}
    for mod in ("rich", "rich.console", "rich.table", "matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError
    report.print_console(result)
    out = capsys.readouterr().out
    assert "resnet" not in out and "tiny/s1" in out and "5.00x" in out
    assert "matplotlib" in report.write_plot(result, str(tmp_path / "x.png"))
