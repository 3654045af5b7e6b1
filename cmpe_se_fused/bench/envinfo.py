"""Where a result came from: device, versions, git commit, and the kernel-source hash (a result
counts for the kernel sources whose hash it records; GPU.md)."""
from __future__ import annotations

import glob
import hashlib
import os
import platform
import subprocess

import torch

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(PACKAGE_DIR)
KERNEL_GLOBS = ("csrc/**/*", "cmpe_se_fused/triton/*.py")


def kernel_files(root: str = REPO_ROOT) -> list[str]:
    """Kernel sources, relative to ``root``, sorted: everything under ``csrc/`` and the Triton files."""
    found = set()
    for pattern in KERNEL_GLOBS:
        for path in glob.glob(os.path.join(root, pattern), recursive=True):
            if os.path.isfile(path) and "__pycache__" not in path:
                found.add(os.path.relpath(path, root))
    return sorted(found)


def kernel_hash(root: str = REPO_ROOT) -> str | None:
    """sha256 over (path, contents) of every kernel source; None when the sources are not here
    (an installed wheel)."""
    files = kernel_files(root)
    if not files:
        return None
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()


def git_info(root: str = REPO_ROOT) -> dict:
    def git(*args):
        try:
            out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=20, check=False)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    source = "git"
    if not commit and os.environ.get("CMPE_SE_COMMIT"):  # a tree copied without .git (the GPU machine)
        commit, source = os.environ["CMPE_SE_COMMIT"].strip(), "CMPE_SE_COMMIT"
    return {"commit": commit, "short": commit[:7] if commit else None,
            "dirty": bool(status) if status is not None else None, "source": source if commit else None}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        out["triton"] = None
    try:
        from .. import __version__
        out["cmpe_se_fused"] = __version__
    except Exception:  # noqa: BLE001
        out["cmpe_se_fused"] = None
    return out


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": p.name, "capability": f"{p.major}.{p.minor}",
                "memory_gb": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count,
                "l2_mb": round(getattr(p, "L2_cache_size", 0) / 2**20, 1)}
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"type": "cpu", "name": name, "cores": os.cpu_count(), "threads": torch.get_num_threads()}


def collect(device: torch.device) -> dict:
    from .. import ops
    return {"device": device_info(device), "versions": versions(), "git": git_info(),
            "kernel_hash": kernel_hash(), "kernel_files": len(kernel_files()),
            "extensions": {k: (v or "loaded") for k, v in ops.EXTENSION_STATUS.items()}}
