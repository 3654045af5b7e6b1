"""Launch variants that need their own environment (``cuda@...``: the extension reads its
variables once per process) run in a child process of the suite; their rows are merged."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

from . import metrics
from .console import _log
from .providers import provider_reasons
from .variants import VARIANTS


def run_env_variant(runner, prov: str, phase: str, progress):
    """Time ``prov`` (a ``cuda@...`` variant) in a child process with its environment; merge
    its rows, floors recomputed at this run's copy bandwidth."""
    o = runner.o
    c0 = o.cases[0].shape if o.cases else None
    sample = torch.empty((1, c0.c if c0 else 1, 1, 1), device=o.device)
    why = "; ".join(provider_reasons(prov, sample)) or runner.budget_reason(phase)
    rows = []
    if not why:
        left = None if runner.deadline(phase) is None else max(5.0, runner.deadline(phase) - runner.elapsed())
        with tempfile.TemporaryDirectory() as tmp:
            argv = [*o.argv, "--providers", prov.partition("@")[0], "--as-variant", prov, "--out", tmp, "--no-e2e",
                    "--no-plot", "--compare=", "--copy-gbps", repr(runner.gbps)]
            if left is not None:
                argv += ["--budget-s", f"{left:.0f}"]
            env = dict(os.environ, CMPE_SE_BENCH_NO_PROGRESS="1", **VARIANTS[prov])
            _log(f"[bench] {prov}: child process with {VARIANTS[prov]}")
            try:
                res = subprocess.run([sys.executable, "-m", "cmpe_se_fused.bench", *argv], env=env, check=False,
                                     capture_output=True, text=True, timeout=None if left is None else left + 60)
                with open(os.path.join(tmp, "bench.json")) as f:
                    rows = [r for r in json.load(f)["rows"] if r["provider"] == prov]
                if not rows:
                    why = f"child process wrote no rows (rc {res.returncode}): {res.stderr.strip()[-300:]}"
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                why = f"child process failed: {_exc_text(exc)}"
    for r in rows:
        r["floor_us"] = r["floor_bytes"] / (runner.gbps * 1e3)
        r["two_pass_floor_us"] = r["two_pass_bytes"] / (runner.gbps * 1e3)
    if why:
        rows = [dict(metrics.layer_row(c, ps, prov, runner.gbps), reason=why) for c in o.cases for ps in o.passes]
    runner.rows.extend(rows)
    for _ in o.cases:
        progress.advance(f"{prov} (child process)")


def _exc_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"
