"""GPU-free evidence for the GPU kernels (benchmarks/gpu_evidence.py, issue 17): the budgets of
bytes moved, coalescing and occupancy, checked on the CPU through the kernel emulator
(tests/emulator) and the built extension's resources; and gpu_check.sh's packed output."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_evidence as GE  # noqa: E402


def _emu():
    import emulator

    if not emulator.have_compiler():
        pytest.skip("no host C++ compiler")
    emulator.build()
    return emulator


# ---- bytes moved -------------------------------------------------------------------------------

@pytest.mark.slow
def test_bytes_moved_meet_spec_budgets():
    """Every path the planner picks (persistent, per-sample, resident), training and eval, forward
    and backward: the full-size traffic traced in the emulator is the documented one, SPEC section 3:
    two-pass kernels 5T (forward: U, X twice, Y once; backward: dY twice, U once, dU, dX), the
    resident forward 3T and the resident backward 4T."""
    _emu()
    rows = GE.bytes_rows(modes=("se", "double_fc", "folded_3x3"))
    assert rows
    for r in rows:
        tag = f"{r['path']}/{r['mode']}/{r['phase']}/{r['pass']} ({r['kernel']})"
        assert r["ok"], f"{tag}: {r['total_T']:.3f}T over the {r['budget_T']}T budget"
        # the traffic is exactly the kernel's design (no hidden re-read, nothing skipped)
        assert r["total_T"] == pytest.approx(r["budget_T"]), f"{tag}: {r['total_T']:.3f}T, {r['per_tensor']}"
    resident = {(r["mode"], r["phase"], r["pass"]): r["kernel"] for r in rows if r["path"] == "resident"}
    assert resident[("se", "train", "fwd")].startswith("resident") and resident[("se", "train", "bwd")].startswith(
        "resident")
    assert resident[("folded_3x3", "eval", "fwd")].startswith("resident")
    assert resident[("folded_3x3", "train", "fwd")] == "persistent"  # batch statistics: the grid


@pytest.mark.slow
def test_gpu_evidence_exits_nonzero_when_a_budget_breaks(monkeypatch, capsys):
    _emu()
    tight = {k: v - 0.5 for k, v in GE.BUDGET.items()}
    monkeypatch.setattr(GE, "BUDGET", tight)
    assert GE.main(["--modes", "se", "--skip", "sectors,occupancy,model"]) == 1
    assert "BUDGETS BROKEN" in capsys.readouterr().out


# ---- coalescing --------------------------------------------------------------------------------

def test_sector_analysis_sees_strided_access():
    """The analysis itself: one warp reading 4-byte values 32 bytes apart touches 8x the sectors it
    needs (12.5%); reading them contiguously is 100%."""
    E = _emu()
    base = 1 << 20

    def events(stride):
        rows = [[0, lane, base + lane * stride, 4, 0, 0, 0, 1234] for lane in range(32)]
        return torch.tensor(rows, dtype=torch.int64)

    th = torch.tensor([32])
    strided = E.analyse(events(32), th, ("U",), 4096)
    dense = E.analyse(events(4), th, ("U",), 4096)
    (ps,), (pd,) = strided.phases.values(), dense.phases.values()
    assert ps["sectors"] == 32 and ps["min_sectors"] == 4
    assert pd["sectors"] == 4 and pd["min_sectors"] == 4


@pytest.mark.slow
def test_streaming_phases_are_coalesced():
    """WRN-28-10 stage 1 and ResNet-164 stage 3 (N=1), NCHW and channels_last, persistent and
    resident kernels: every streaming phase touches at most 5% more 32-byte sectors than its bytes
    need."""
    _emu()
    rows = GE.coalescing_rows(stages=[GE.STAGES[0], GE.STAGES[5]])
    phases = {(r["layout"], r["kernel"].split("(")[0], r["pass"], r["phase"]) for r in rows}
    for layout in ("nchw", "channels_last"):
        assert (layout, "persistent", "fwd", "squeeze") in phases and (layout, "resident", "fwd", "load") in phases
    for layout in ("nchw", "channels_last"):  # WRN-28-10 stage 1 runs on a cluster (CL=16 at fp32)
        assert any(r["kernel"] == "resident(CL=16)" and r["shape"].startswith("wrn28-10/s1") and r["layout"] == layout
                   for r in rows), layout
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "\n".join(f"{r['shape']} {r['layout']} {r['kernel']} {r['pass']} {r['phase']}: "
                              f"{100 * r['efficiency']:.1f}%" for r in bad)


# ---- occupancy ---------------------------------------------------------------------------------

def test_device_limits_are_data():
    d = GE.device_limits()
    assert {"H100", "H200", "A100"} <= set(d)
    assert d["H200"]["sms"] == 132 and d["H200"]["copy_gbps"] == pytest.approx(4247.0)
    assert d["A100"]["cc"] == 8 and d["A100"]["smem_optin"] == 166912
    # the occupancy model: 128 registers x 256 threads -> 2 blocks on a 64K-register SM
    assert GE.blocks_per_sm(d["H100"], 128, 256, 8192) == 2
    assert GE.blocks_per_sm(d["H100"], 64, 256, 8192) == 4
    assert GE.blocks_per_sm(d["H100"], 32, 256, 120000) == 1  # shared memory bound


RESOURCE_USAGE = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN7cmpe_se22cmpe_se_forward_kernelIfLi4EEEv13ForwardParams6Launch:
  REG:126 STACK:0 SHARED:16 LOCAL:0 CONSTANT[0]:1000 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN7cmpe_se23cmpe_se_backward_kernelIfLi4EEEv14BackwardParams6Launch:
  REG:117 STACK:8 SHARED:16 LOCAL:4 CONSTANT[0]:1000 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_resource_usage_parsing():
    """The cuobjdump --dump-resource-usage format (checked on a real sm_80/sm_90 fatbin)."""
    from emulator.resources import parse_resource_usage

    r = parse_resource_usage(RESOURCE_USAGE)
    assert list(r) == ["sm_90"] and len(r["sm_90"]) == 2
    fwd = r["sm_90"]["_ZN7cmpe_se22cmpe_se_forward_kernelIfLi4EEEv13ForwardParams6Launch"]
    bwd = r["sm_90"]["_ZN7cmpe_se23cmpe_se_backward_kernelIfLi4EEEv14BackwardParams6Launch"]
    assert fwd == {"REG": 126, "STACK": 0, "SHARED": 16, "LOCAL": 0}
    assert bwd["STACK"] == 8 and bwd["LOCAL"] == 4


def _fake_resources(regs):
    names = ("cmpe_se_forward_kernel", "cmpe_se_backward_kernel", "cmpe_se_forward_resident_kernel",
             "cmpe_se_backward_resident_kernel")
    return {"sm_90": {f"{n}<float, 4>": {"REG": regs, "STACK": 0, "SHARED": 16, "LOCAL": 0} for n in names}}


def test_bytes_in_flight_check_can_fail():
    """At 128 registers every streaming loop meets Little's law on H100/H200; at 255 registers (one
    256-thread block per SM) the backward apply (one tensor in flight) falls short: the budget bites."""
    ok = GE.occupancy_rows(_fake_resources(128))
    assert ok and all(r["ok"] for r in ok), [(r["kernel"], r["phase"], r["inflight"]) for r in ok if not r["ok"]]
    short = [r for r in GE.occupancy_rows(_fake_resources(255)) if not r["ok"]]
    assert short and all(r["phase"] == "apply (dY)" for r in short), short


def test_streaming_loops_keep_enough_bytes_in_flight():
    """From the built extension's registers (cuobjdump): each main kernel's streaming loops keep at
    least copy bandwidth x latency / SMs bytes in flight per SM on H100 and H200 (Little's law)."""
    from emulator.resources import read_resources

    res, why = read_resources()
    if why:
        pytest.skip(why)
    rows = GE.occupancy_rows(res)
    assert rows and all(r["regs"] is not None for r in rows), rows
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "\n".join(f"{r['device']} {r['kernel']} {r['phase']}: {r['blocks_per_sm']} blocks/SM, "
                              f"{r['inflight']} B in flight < {r['need']:.0f} B" for r in bad)


# ---- model -------------------------------------------------------------------------------------

def test_model_is_calibrated_on_the_committed_run():
    for pas in ("fwd", "bwd"):
        cal = GE.calibrate(pass_=pas)
        if cal is None:
            pytest.skip("no committed H200 run")
        a, b, bw, n = cal
        assert n >= 4 and 0 < a < 300 and b >= 0 and bw == pytest.approx(4247.1, abs=1)
    rows, cal = GE.model_rows()
    text = GE.model_table(rows, cal)
    assert "MODEL (not a measurement)" in text
    by = {(r["shape"], r["dtype"], r["pass"], r["provider"]): r["model_us"] for r in rows}
    # fewer bytes and no grid barrier: the model says the resident path is faster at every target
    for (shape, dt, pas, prov), t in by.items():
        if prov == "cuda":
            assert by[(shape, dt, pas, "cuda@resident")] < t
    # the forward fit (CUDA-graph times) reproduces the run it was fitted on within 25% at the
    # targets; the backward has only host-bound medians in that run (about 210-260 us at every
    # size), so its fit is weak and not checked here (docs/CUDA.md says so)
    rows_m, _ = GE.model_rows(measured_dir=GE.H200_RUN)
    for r in rows_m:
        if r["provider"] == "cuda" and r["measured_us"] and r["pass"] == "fwd":
            assert r["model_us"] == pytest.approx(r["measured_us"], rel=0.25), r


# ---- gpu_check.sh ------------------------------------------------------------------------------

@pytest.mark.slow
def test_gpu_check_packs_results_into_an_archive(tmp_path):
    """gpu_check.sh --pack OUT with every GPU step skipped: OUT holds exactly the archive and
    summary.txt (the GPU machine returns at most 8 files), the archive the whole results folder."""
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_SKIP_BUILD": "1", "GPU_CHECK_SKIP_PYTEST": "1", "GPU_CHECK_SKIP_SANITIZER": "1",
           "GPU_CHECK_SKIP_TARGETS": "1", "GPU_CHECK_SKIP_BENCH": "1", "GPU_CHECK_SKIP_EVIDENCE": "1",
           "GPU_CHECK_PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    res = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--pack", str(out)],
                         capture_output=True, text=True, timeout=600, check=False, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["gpu_check.tar.gz", "summary.txt"]
    with tarfile.open(out / "gpu_check.tar.gz") as tf:
        names = set(tf.getnames())
    assert {"gpu_check/env.json", "gpu_check/summary.txt", "gpu_check/ptxas.txt"} <= names, names
    summary = (out / "summary.txt").read_text()
    assert "packed:" in summary and "env " in summary
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith("gpu_check")]
    assert leftovers == [], leftovers  # scratch folders removed
