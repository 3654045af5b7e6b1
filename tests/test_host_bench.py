"""The host-cost benchmark preset from the CLI and the Triton launch-plan cache (issue 23; the layer's
call plans are in test_hostpath.py)."""
import json
import subprocess
import sys

import pytest
import torch

from cmpe_se_fused.dispatch import BACKENDS

HAS_CPU = not BACKENDS["cpu"].not_supported_reasons(torch.empty(1))
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="needs the compiled CPU extension (cmpe_se_fused._C)")


@needs_cpu
def test_host_bench_preset_from_the_cli(tmp_path):
    """``python -m cmpe_se_fused.bench --preset host`` (issue 23): the rows beside their anchors, the
    target ratios and the load average, in host.json and host.md (a tiny run: the plumbing only)."""
    cmd = [sys.executable, "-m", "cmpe_se_fused.bench", "--preset", "host", "--providers", "cpu", "--rounds", "2",
           "--blocks", "1", "--block-ms", "0.05", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "host.json").read_text())
    rows = {row["row"] for row in result["rows"]}
    for row in ("bn/eval_nograd", "bn/train_fwdbwd", "conv1x1/eval_inference", "eager3/inference",
                "cpu/se/eval_nograd", "cpu/se/eval_inference", "cpu/se/train_fwd", "cpu/folded_3x3/train_fwdbwd",
                "cpu/folded_3x3/bare_op", "cpu/se/bare_infer", "cpu/folded_3x3/bare_infer"):
        assert row in rows, row
    assert all(row["median_us"] > 0 for row in result["rows"])
    ratios = {(r["row"], r["anchor"]) for r in result["ratios"]}
    assert ratios == {(f"cpu/{m}/{row}", anchor) for m in ("se", "folded_3x3") for row, anchor in
                      (("eval_nograd", "bn/eval_nograd"), ("train_fwdbwd", "bn/train_fwdbwd"),
                       ("bare_op", "eager3/inference"), ("bare_infer", "eager3/inference"))}
    assert len(result["env"]["load_before"]) == 3 and result["env"]["threads"] == 1
    assert "| cpu/se/bare_op / eager3/inference |" in (tmp_path / "host.md").read_text()
    assert "| cpu/se/bare_op / eager3/inference |" in r.stdout
    bad = subprocess.run(cmd[:5] + ["--bogus"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--bogus" in bad.stderr


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_triton_launch_plans_are_never_stale(kind, monkeypatch):
    """The Triton launch path computes its geometry, tiles and strides once per key: every input it
    depends on must be in that key, so a cached plan equals a fresh computation for each variation
    (shape, layout, dtype, fold, padding, weights' shapes, tuning)."""
    pytest.importorskip("triton")
    from cmpe_se_fused.triton import streaming as tk
    cache = {}  # one cache over every variation, so a key missing an input would hit a stale plan

    def args(n=2, c=64, hw=4, dtype=torch.float32, cl=False, v_nchw=False, fold=8, padding=0, r=4, block_c=None):
        u = torch.randn(n, c, hw, hw, dtype=dtype)
        u = u.to(memory_format=torch.channels_last) if cl else u
        v = u.contiguous() if v_nchw else u.clone()
        hm, wm = 2 * c // fold - 2 + 2 * padding, fold - 2 + 2 * padding
        tuning = (kind, None if kind == "fwd" else False, None, block_c, None, None)
        return (u, v, torch.randn(r, hm * wm), torch.randn(c, r), torch.randn(1, 1, 3, 3), "folded_3x3", fold,
                padding, tuning)

    variations = [{}, {"n": 3}, {"hw": 8}, {"cl": True}, {"cl": True, "v_nchw": True},
                  {"dtype": torch.float64}, {"fold": 16}, {"padding": 1},
                  {"r": 8}, {"c": 128, "fold": 16}, {"block_c": 32}, {}]
    for kw in variations:
        a = args(**kw)
        monkeypatch.setattr(tk, "_LAUNCH_PLANS", cache)
        hit = tk._launch_plan(*a)
        assert tk._launch_plan(*a) is hit  # the second call is a cache hit
        monkeypatch.setattr(tk, "_LAUNCH_PLANS", {})
        fresh = tk._launch_plan(*a)
        assert hit[1:] == fresh[1:], kw
        assert vars(hit[0]) == vars(fresh[0]), kw
    assert len(cache) == len(variations) - 1  # the last repeats the first
