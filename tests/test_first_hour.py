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
