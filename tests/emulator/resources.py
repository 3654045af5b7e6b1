"""Kernel resources (registers, stack, local memory, static shared memory) per kernel and architecture,
read from the built CUDA extension with ``cuobjdump --dump-resource-usage`` (no recompilation).

The extension belongs to the current sources when ``cmpe_se_fused/_C_cuda.sources`` (written by the
build, see docs/CUDA.md) holds ``source_hash()``; builds without that file are accepted when the
``.so`` is newer than every CUDA source file.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STAMP = os.path.join(ROOT, "cmpe_se_fused", "_C_cuda.sources")


def cuda_sources(root: str = ROOT) -> list[str]:
    """The files the CUDA extension is compiled from (csrc/, sorted)."""
    out = []
    for dirpath, _, files in os.walk(os.path.join(root, "csrc")):
        out += [os.path.join(dirpath, f) for f in files]
    return sorted(out)


def source_hash(root: str = ROOT) -> str:
    """sha256 over (relative path, content) of every file under csrc/, first 16 hex digits."""
    h = hashlib.sha256()
    for f in cuda_sources(root):
        h.update(os.path.relpath(f, root).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]


def extension_path() -> str | None:
    found = sorted(glob.glob(os.path.join(ROOT, "cmpe_se_fused", "_C_cuda*.so")))
    return found[0] if found else None


def staleness(so: str) -> str | None:
    """None when the .so was built from the current csrc/, else why not (or why we cannot tell)."""
    if os.path.exists(STAMP):
        with open(STAMP) as fh:
            words = fh.read().split()
        recorded = words[0] if words else ""
        now = source_hash()
        return None if recorded == now else f"{so} was built from csrc/ {recorded}, the tree is {now}: rebuild"
    newest = max(os.path.getmtime(f) for f in cuda_sources())
    if os.path.getmtime(so) + 1 < newest:
        return f"{so} is older than csrc/ (no {os.path.basename(STAMP)} stamp): rebuild"
    return None


def cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA toolkit, or Triton's package (GPU.md)."""
    tool = shutil.which("cuobjdump")
    if tool:
        return tool
    for cand in sorted(glob.glob("/usr/local/cuda*/bin/cuobjdump"), reverse=True):
        return cand
    try:
        import triton

        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    except Exception:  # noqa: BLE001 - no triton: no cuobjdump
        pass
    return None


ARCH = re.compile(r"^arch = (sm_\d+a?)")
FUNC = re.compile(r"^\s*Function (\S+):")
RES = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def parse_resource_usage(text: str) -> dict[str, dict[str, dict[str, int]]]:
    """``{arch: {mangled kernel: {REG, STACK, SHARED, LOCAL}}}`` from ``--dump-resource-usage``."""
    out: dict = {}
    arch, fn = None, None
    for line in text.splitlines():
        m = ARCH.search(line)
        if m:
            arch = m.group(1)
            continue
        m = FUNC.search(line)
        if m:
            fn = m.group(1)
            continue
        if fn and arch and "REG:" in line:
            out.setdefault(arch, {})[fn] = {k: int(v) for k, v in RES.findall(line)}
            fn = None
    return out


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False)
    out = res.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """``cmpe_se_forward_kernel<float, 4>`` from ``void cmpe_se::cmpe_se_forward_kernel<float, 4>(...)``."""
    s = demangled.split("(")[0]
    s = s.replace("void ", "").replace("cmpe_se::", "")
    return s


def read_resources(so: str | None = None) -> tuple[dict, str | None]:
    """(resources of the cmpe_se kernels per arch with demangled short names, None) or ({}, why not)."""
    so = so or extension_path()
    if so is None:
        return {}, "cmpe_se_fused._C_cuda is not built"
    tool = cuobjdump()
    if tool is None:
        return {}, "cuobjdump not found (CUDA toolkit or triton's backends/nvidia/bin)"
    why = staleness(so)
    if why:
        return {}, why
    res = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True, timeout=300,
                         check=False)
    if res.returncode != 0:
        return {}, f"cuobjdump failed: {res.stderr[-500:]}"
    raw = parse_resource_usage(res.stdout)
    names = sorted({k for per in raw.values() for k in per if "cmpe_se" in k})
    dem = demangle(names)
    out = {arch: {short_name(dem[k]): v for k, v in per.items() if "cmpe_se" in k} for arch, per in raw.items()}
    return {a: v for a, v in out.items() if v}, None
