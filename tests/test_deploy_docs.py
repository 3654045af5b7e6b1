"""docs/DEPLOY.md's command blocks run as written, in order, in an empty directory.

Each block is marked ``<!-- deploy-test: NAME [heavy] -->``. The ``heavy`` blocks compile an AOTInductor
package and a C++ program (a minute or more each on two cores): ``python -m pytest -m heavy
tests/test_deploy_docs.py`` runs them, after the blocks they need."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cmpe_se_fused.dispatch import BACKENDS

DOC = Path(__file__).resolve().parents[1] / "docs" / "DEPLOY.md"
BLOCK = re.compile(r"<!-- deploy-test: ([\w-]+)((?: \w+)*) -->\n```bash\n(.*?)```", re.DOTALL)
DIFF = re.compile(r"max \|diff\|[^:]*: ([0-9.e+-]+)")
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
needs_cpu = pytest.mark.skipif(bool(BACKENDS["cpu"].not_supported_reasons()),
                               reason="needs the compiled CPU backend (cmpe_se_fused._C)")


def blocks():
    found = [(name, flags.split(), body) for name, flags, body in BLOCK.findall(DOC.read_text())]
    assert [n for n, _, _ in found] == ["onnx", "export", "serve-export", "aoti", "serve-aoti", "cpp", "revert"]
    return found


def run_block(name, body, cwd):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    res = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", body], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=900, check=False)
    assert res.returncode == 0, f"block {name!r} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    # the blocks print how far the deployed model is from eager: fp32 round-off only (assert_close's fp32 atol)
    for value in DIFF.findall(res.stdout):
        assert float(value) <= 1e-5, f"block {name!r}: {res.stdout}"
    return res.stdout


@needs_cpu
def test_deploy_doc_blocks(tmp_path):
    """ONNX (where onnx/onnxruntime are installed), torch.export and its fresh serving process, revert."""
    ran = []
    for name, flags, body in blocks():
        if "heavy" in flags or (name == "onnx" and not HAS_ONNX):
            continue
        out = run_block(name, body, tmp_path)
        assert name == "export" or DIFF.search(out), f"block {name!r} printed no difference: {out}"
        ran.append(name)
    assert "export" in ran and "serve-export" in ran and "revert" in ran


@needs_cpu
@pytest.mark.heavy
def test_deploy_doc_aoti_and_cpp_blocks(tmp_path):
    """The whole AOTInductor path: the package, a fresh Python process, and the C++ program, whose output
    file matches the eager output saved by the export block."""
    for name, flags, body in blocks():
        if name in ("export", "aoti", "serve-aoti", "cpp"):
            out = run_block(name, body, tmp_path)
            assert name in ("export", "aoti") or DIFF.search(out), f"block {name!r} printed no difference: {out}"
    y = torch.load(tmp_path / "io.pt")["y"]
    got = torch.from_numpy(np.fromfile(tmp_path / "result.bin", dtype=np.float32)).reshape(y.shape)
    torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-6)
    sizes = {p.name: p.stat().st_size for p in tmp_path.glob("*.pt2")}
    print("package sizes (bytes):", sizes)
