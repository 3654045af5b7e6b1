"""Issue 25, the first hour of a new user: the README's commands, silent no-ops of the model
converters, the fold-width message, and output that says nothing about the user's run. The
user-facing checks run in fresh processes with stderr captured, as a user meets them."""
from __future__ import annotations

import os
import re
import subprocess
import sys
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
