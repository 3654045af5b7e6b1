"""``python -m cmpe_se_fused.info``: what it reports."""
from __future__ import annotations

import os
import subprocess
import sys

from cmpe_se_fused import info


def test_collect_reports_backends_and_the_launch_environment(monkeypatch):
    for k in [k for k in os.environ if k.startswith("CMPE_SE_")]:
        monkeypatch.delenv(k)
    d = info.collect()
    assert set(d["backends"]) >= {"reference", "cpu", "triton", "cuda"}
    assert d["backends"]["reference"] == "usable"
    assert d["environment"] == {"CMPE_SE_*": "(none set: defaults)"}
    monkeypatch.setenv("CMPE_SE_CUDA_PATH", "resident")
    assert info.collect()["environment"] == {"CMPE_SE_CUDA_PATH": "resident"}


def test_module_runs():
    res = subprocess.run([sys.executable, "-m", "cmpe_se_fused.info"], capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "backends:" in res.stdout and "environment:" in res.stdout
