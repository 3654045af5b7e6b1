"""Build script for cmpe_se_fused.

Builds up to two compiled extensions, each optional:

* ``cmpe_se_fused._C``      op schemas + fused CPU kernels (``csrc/ops.cpp``, ``csrc/cpu/*.cpp``)
* ``cmpe_se_fused._C_cuda`` CUDA kernels (``csrc/cuda/*.cu``, ``csrc/cuda/*.cpp``), built when
  nvcc and a CUDA build of torch are present. No GPU is needed at build time.

Environment switches (the ones flash-attention / xformers users know):

* ``TORCH_CUDA_ARCH_LIST``   default ``9.0`` (sm_90); e.g. ``"8.0;9.0"``
* ``MAX_JOBS``, ``NVCC_THREADS``  parallel compile jobs / nvcc threads
* ``CMPE_SE_SKIP_CUDA_BUILD=1``   never build the CUDA extension
* ``CMPE_SE_SKIP_CPP_BUILD=1``    build nothing (pure-Python install: reference + Triton)
* ``FORCE_CUDA=1``                fail the install if the CUDA extension cannot be built
* ``CMPE_SE_BUILD_ONLY=cpu|cuda`` (development) build only one of the two extensions

An extension that fails to compile is skipped with a message; the package still installs and
``python -m cmpe_se_fused.info`` says what is missing and why.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """The real toolkit root. ``nvcc`` on PATH may be a wrapper script, which makes torch guess
    a wrong CUDA_HOME (and fail to link -lcudart); ``nvcc --dryrun`` prints the real root."""
    if os.environ.get("CUDA_HOME") and os.path.isdir(os.path.join(os.environ["CUDA_HOME"], "include")):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for cand in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
            if os.path.exists(os.path.join(cand, "bin", "nvcc")):
                return cand
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-v", "-c", "-x", "cu", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if m:
            return os.path.realpath(m.group(1))
    except Exception:  # noqa: BLE001 - any failure means "guess from the path"
        pass
    return os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(nvcc)), ".."))


_cuda_home = None
if not _flag("CMPE_SE_SKIP_CUDA_BUILD") and not _flag("CMPE_SE_SKIP_CPP_BUILD"):
    _cuda_home = _find_cuda_home()
    if _cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME at import time
        os.environ["CUDA_HOME"] = _cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

ext_modules = []
cmdclass = {}
SKIPPED = []

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:  # building metadata only, or torch missing: pure-Python install
    torch = None
    SKIPPED.append("all compiled extensions: torch is not importable at build time "
                   "(install torch first and use --no-build-isolation)")

CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-DNDEBUG"]  # CPU kernels: see csrc/cpu/
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-Xptxas=-v",
              "--expt-relaxed-constexpr", "-DNDEBUG"]

if torch is not None and not _flag("CMPE_SE_SKIP_CPP_BUILD"):
    cpp_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    only = os.environ.get("CMPE_SE_BUILD_ONLY", "").strip().lower()
    if os.path.exists(os.path.join(ROOT, "csrc/ops.cpp")) and only != "cuda":
        ext_modules.append(CppExtension(
            "cmpe_se_fused._C", cpp_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"]))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    want_cuda = not _flag("CMPE_SE_SKIP_CUDA_BUILD") and cuda_sources and only != "cpu"
    if want_cuda and torch.version.cuda is None:
        SKIPPED.append("CUDA extension: this torch is a CPU-only build")
    elif want_cuda and _cuda_home is None:
        SKIPPED.append("CUDA extension: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    elif want_cuda:
        nvcc_threads = os.environ.get("NVCC_THREADS", "4")
        ext_modules.append(CUDAExtension(
            "cmpe_se_fused._C_cuda", cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-std=c++20", "-DNDEBUG"],
                                "nvcc": NVCC_FLAGS + ["--threads", nvcc_threads]}))
    elif _flag("CMPE_SE_SKIP_CUDA_BUILD"):
        SKIPPED.append("CUDA extension: CMPE_SE_SKIP_CUDA_BUILD is set")

    class TolerantBuildExtension(BuildExtension):
        """Builds each extension on its own; one that fails is skipped, not fatal
        (unless FORCE_CUDA=1 and it is the CUDA one)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                if ext.name.endswith("_C_cuda") and _flag("FORCE_CUDA"):
                    raise
                msg = f"{ext.name}: build failed ({type(exc).__name__}: {exc})"
                SKIPPED.append(msg)
                print(f"[cmpe_se_fused] WARNING: skipping {msg}", file=sys.stderr)

    cmdclass["build_ext"] = TolerantBuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

setup(ext_modules=ext_modules, cmdclass=cmdclass)

for what in SKIPPED:
    print(f"[cmpe_se_fused] skipped {what}", file=sys.stderr)
if torch is not None and not SKIPPED:
    print("[cmpe_se_fused] built: " + ", ".join(e.name for e in ext_modules), file=sys.stderr)
