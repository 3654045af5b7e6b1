"""Build script for cmpe_se_fused.

Builds three compiled extensions against the torch that is installed (build with
``--no-build-isolation``):

* ``cmpe_se_fused._C``      op schemas + fused CPU kernels (``csrc/ops.cpp``, ``csrc/cpu/*.cpp``); a plain
  shared library without CPython API (docs/DEPLOY.md)
* ``cmpe_se_fused._fastpath`` the C++ entry of the layers' call plans (``csrc/fastpath.cpp``, a Python
  extension module; built and skipped with ``_C``)
* ``cmpe_se_fused._C_cuda`` CUDA kernels (``csrc/cuda/*.cu``, ``csrc/cuda/*.cpp``), built when
  nvcc and a CUDA build of torch are present and the build wants CUDA: a GPU is visible at build
  time, or ``FORCE_CUDA=1``, or ``TORCH_CUDA_ARCH_LIST`` is given (the detectron2 / mmcv /
  pytorch3d convention; wheel builders and CI set the switch). Otherwise it is skipped with one
  line saying so: compiling it is most of a plain install's time (minutes) for a GPU that is not here.

Failures are loud. A missing toolchain (no C++ compiler; no nvcc or a CPU-only torch for
``_C_cuda``) skips that extension with a one-line reason; a compile error fails the build. What
was built, skipped and why, and the CUDA architectures are written to
``cmpe_se_fused/_build_info.py`` (generated, not in git), which ``python -m cmpe_se_fused.info``
and the ``cuda`` backend's architecture check read.

Environment switches (the ones flash-attention / xformers users know):

* ``TORCH_CUDA_ARCH_LIST``   builds ``_C_cuda`` for these architectures; default: the GPUs visible at
  build time; with none visible (and ``FORCE_CUDA=1``) ``8.0;9.0+PTX`` (SASS for sm_80 and sm_90, PTX
  for compute_90 that newer GPUs JIT-compile)
* ``MAX_JOBS``, ``NVCC_THREADS``  parallel compile jobs / nvcc threads per job (default 4)
* ``CMPE_SE_SKIP_CUDA_BUILD=1``   never build the CUDA extension
* ``CMPE_SE_SKIP_CPP_BUILD=1``    build nothing (pure-Python install: reference + Triton)
* ``CMPE_SE_ALLOW_BUILD_FAILURE=1``  install even if an extension fails to compile (it is skipped
  and recorded) instead of failing the build
* ``FORCE_CUDA=1``                build the CUDA extension without a visible GPU, and fail the build if it
  is not built, whatever the reason
* ``CMPE_SE_DEBUG_INFO=1``        keep host debug info (``-g``, from Python's CFLAGS); by default the
  C++ units are compiled with ``-g0``, which halves the compile time of the units that include torch
  headers and shrinks the wheel (torch's own wheels carry no debug info either)
* ``CMPE_SE_BUILD_ONLY=cpu|cuda`` (development) build only one of the two extensions
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "cmpe_se_fused"
BUILD_INFO_FILE = "_build_info.py"
#: without TORCH_CUDA_ARCH_LIST and without a visible GPU: A100-class SASS (runs on sm_86/sm_89
#: too), H100 SASS, and compute_90 PTX that Blackwell and later GPUs JIT-compile
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-DNDEBUG"]  # CPU kernels: see csrc/cpu/
CXX_FLAGS_CUDA_HOST = ["-O3", "-std=c++20", "-DNDEBUG"]  # csrc/cuda/bindings.cpp
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-Xptxas=-v",
              "--expt-relaxed-constexpr", "-DNDEBUG"]
NO_TORCH = ("torch is not importable at build time, so no kernel can be compiled: install torch first and "
            "build with --no-build-isolation (pip install --no-build-isolation .), or set "
            "CMPE_SE_SKIP_CPP_BUILD=1 for a pure-Python install (reference + Triton backends only)")

#: the default skip of _C_cuda (the one line a plain install on a machine without a GPU prints)
NO_GPU = ("no GPU visible at build time, so the CUDA kernels (minutes of nvcc) are not compiled; to build them "
          f"for a GPU elsewhere set FORCE_CUDA=1 (architectures {DEFAULT_ARCH_LIST}) or TORCH_CUDA_ARCH_LIST, "
          "e.g. TORCH_CUDA_ARCH_LIST=9.0")


def _flag(name, env=None):
    env = os.environ if env is None else env
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def debug_flags(env=None):
    """Host-compiler flags appended after Python's CFLAGS (which carry ``-g``): ``-g0`` unless
    ``CMPE_SE_DEBUG_INFO=1``. forward.cpp: 46 s with -g, 19 s with -g0 (user CPU, 2026-11-30)."""
    return [] if _flag("CMPE_SE_DEBUG_INFO", env) else ["-g0"]


def _say(msg):
    print(f"[cmpe_se_fused] {msg}", file=sys.stderr, flush=True)


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


def extension_plan(torch_mod, cuda_home, env=None, root=ROOT):
    """What to build: ``([(name, sources)], {name: reason skipped})``, sources relative to ``root``.
    Only toolchain reasons skip here; compile errors are handled (loudly) by the build."""
    env = os.environ if env is None else env
    skipped = {}
    if _flag("CMPE_SE_SKIP_CPP_BUILD", env):
        return [], {n: "CMPE_SE_SKIP_CPP_BUILD is set" for n in ("_C", "_fastpath", "_C_cuda")}
    if torch_mod is None:
        return [], {n: NO_TORCH for n in ("_C", "_fastpath", "_C_cuda")}
    rel = lambda pattern: sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, pattern)))  # noqa: E731
    cpp_sources = rel("csrc/ops.cpp") + rel("csrc/autograd.cpp") + rel("csrc/cpu/*.cpp")
    cuda_sources = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    only = env.get("CMPE_SE_BUILD_ONLY", "").strip().lower()
    cxx = env.get("CXX", "c++")
    plan = []
    if shutil.which(cxx) is None:
        skipped["_C"] = skipped["_fastpath"] = skipped["_C_cuda"] = (f"no C++ compiler: {cxx!r} is not on PATH (set "
                                                                      "CXX or install g++)")
        return plan, skipped
    if only == "cuda":
        skipped["_C"] = skipped["_fastpath"] = "CMPE_SE_BUILD_ONLY=cuda"
    else:
        plan.append(("_C", cpp_sources))
        # the Python entry of the layers' call plans (a Python extension module; _C stays Python-free)
        plan.append(("_fastpath", rel("csrc/fastpath.cpp")))
    if only == "cpu":
        skipped["_C_cuda"] = "CMPE_SE_BUILD_ONLY=cpu"
    elif _flag("CMPE_SE_SKIP_CUDA_BUILD", env):
        skipped["_C_cuda"] = "CMPE_SE_SKIP_CUDA_BUILD is set"
    elif torch_mod.version.cuda is None:
        skipped["_C_cuda"] = f"torch {torch_mod.__version__} is a CPU-only build (no CUDA)"
    elif cuda_home is None:
        skipped["_C_cuda"] = "nvcc not found (put nvcc on PATH or set CUDA_HOME)"
    else:
        plan.append(("_C_cuda", cuda_sources))
    return plan, skipped


def cuda_skip_reason(torch_mod, env=None):
    """Why ``_C_cuda`` is not wanted by this build (None: build it): it is wanted when a GPU is
    visible at build time, ``FORCE_CUDA=1`` or ``TORCH_CUDA_ARCH_LIST`` is given. The toolchain
    checks are :func:`extension_plan`'s."""
    env = os.environ if env is None else env
    if _flag("FORCE_CUDA", env) or env.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return None
    try:
        if torch_mod.cuda.is_available():
            return None
    except Exception:  # noqa: BLE001 - a broken driver is "no GPU visible"
        pass
    return NO_GPU


def resolve_arch_list(torch_mod, env=None):
    """``(TORCH_CUDA_ARCH_LIST to use or None for torch's own choice, where it came from)``."""
    env = os.environ if env is None else env
    given = env.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if given:
        return given, "TORCH_CUDA_ARCH_LIST"
    if torch_mod.cuda.is_available():
        names = sorted({torch_mod.cuda.get_device_name(i) for i in range(torch_mod.cuda.device_count())})
        return None, "the GPU(s) visible at build time: " + ", ".join(names)
    return DEFAULT_ARCH_LIST, "default (no TORCH_CUDA_ARCH_LIST, no GPU visible at build time)"


def arch_codes(gencode_flags):
    """``(sass, ptx)`` code names (``sm_80``, ``compute_90``) from nvcc ``-gencode`` flags."""
    sass, ptx = set(), set()
    for flag in gencode_flags:
        m = re.search(r"code=(sm|compute)_(\w+)", flag)
        if m:
            (sass if m.group(1) == "sm" else ptx).add(f"{m.group(1)}_{m.group(2)}")
    key = lambda c: (int(re.search(r"_(\d+)", c).group(1)), c)  # noqa: E731
    return sorted(sass, key=key), sorted(ptx, key=key)


class _State:
    """What this build did, for ``_build_info.py``."""
    planned: list = []
    skipped: dict = {}
    cuda_arch: dict = {}
    torch_version = None
    torch_cuda = None


def build_info_source(state=_State):
    info = {
        "planned": list(state.planned),
        "skipped": dict(state.skipped),
        # skipped by a user switch (CMPE_SE_SKIP_*, CMPE_SE_BUILD_ONLY) or by the no-GPU default, not for a
        # missing toolchain
        "opted_out": sorted(n for n, why in state.skipped.items() if why.startswith("CMPE_SE_") or why == NO_GPU),
        "cuda_arch": dict(state.cuda_arch),
        "torch": state.torch_version,
        "torch_cuda": state.torch_cuda,
    }
    return ('"""Generated by setup.py at build time (not in git): what was built, skipped and why, and\n'
            'the CUDA architectures the extension carries. Read by cmpe_se_fused.ops."""\n'
            f"BUILD_INFO = {info!r}\n")


def _write_build_info(package_dir):
    os.makedirs(package_dir, exist_ok=True)
    with open(os.path.join(package_dir, BUILD_INFO_FILE), "w") as f:
        f.write(build_info_source())


class build_py(_build_py):
    """Also writes ``_build_info.py``; refuses to build a wheel that silently lacks every kernel."""

    def run(self):
        if _State.skipped.get("_C") == NO_TORCH:
            raise SystemExit(f"[cmpe_se_fused] error: {NO_TORCH}")
        super().run()
        editable = getattr(self, "editable_mode", False)
        _write_build_info(os.path.join(ROOT, PACKAGE) if editable else os.path.join(self.build_lib, PACKAGE))


def _make_build_ext(base):
    class build_ext(base):
        """Builds each extension; a compile error fails the build unless
        CMPE_SE_ALLOW_BUILD_FAILURE=1, which skips the extension and records why."""

        def build_extension(self, ext):
            short = ext.name.rsplit(".", 1)[-1]
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - compile and link errors come in several types
                if not _flag("CMPE_SE_ALLOW_BUILD_FAILURE") or (short == "_C_cuda" and _flag("FORCE_CUDA")):
                    _say(f"error: building {ext.name} failed ({type(exc).__name__}); the compiler output is "
                         "above. Set CMPE_SE_ALLOW_BUILD_FAILURE=1 to install without it.")
                    raise
                _State.skipped[short] = f"build failed ({type(exc).__name__}: {str(exc)[:300]})"
                _say(f"skipped {ext.name}: {_State.skipped[short]} (CMPE_SE_ALLOW_BUILD_FAILURE=1)")

        def run(self):
            super().run()
            inplace = self.inplace or getattr(self, "editable_mode", False)
            _write_build_info(os.path.join(ROOT, PACKAGE) if inplace else os.path.join(self.build_lib, PACKAGE))
            built = [n for n in _State.planned if n not in _State.skipped]
            _say("built: " + (", ".join(built) or "nothing") +
                 "".join(f"; skipped {n}: {why}" for n, why in _State.skipped.items()))
    return build_ext


def main():
    skip_all = _flag("CMPE_SE_SKIP_CPP_BUILD")
    cuda_home = None
    if not skip_all and not _flag("CMPE_SE_SKIP_CUDA_BUILD") and \
            os.environ.get("CMPE_SE_BUILD_ONLY", "").strip().lower() != "cpu":
        cuda_home = _find_cuda_home()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home  # torch.utils.cpp_extension reads it at import time
    torch = None
    if not skip_all:
        try:
            import torch
        except ImportError:
            pass
    plan, skipped = extension_plan(torch, cuda_home)
    no_cuda = cuda_skip_reason(torch) if "_C_cuda" in dict(plan) else None
    if no_cuda:
        plan, skipped = [(n, src) for n, src in plan if n != "_C_cuda"], dict(skipped, _C_cuda=no_cuda)
    _State.planned, _State.skipped = [n for n, _ in plan], skipped
    if torch is not None:
        _State.torch_version, _State.torch_cuda = torch.__version__, torch.version.cuda
    ext_modules, cmdclass = [], {"build_py": build_py}
    if plan:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
        include = [os.path.join(ROOT, "csrc")]
        for name, sources in plan:
            if name == "_C":
                ext_modules.append(CppExtension(f"{PACKAGE}._C", sources, include_dirs=include,
                                                extra_compile_args={"cxx": CXX_FLAGS + debug_flags()},
                                                extra_link_args=["-fopenmp"]))
                continue
            if name == "_fastpath":
                ext_modules.append(CppExtension(f"{PACKAGE}._fastpath", sources, include_dirs=include,
                                                extra_compile_args={"cxx": CXX_FLAGS_CUDA_HOST + debug_flags()}))
                continue
            arch_list, source = resolve_arch_list(torch)
            if arch_list is not None:
                os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
            from torch.utils.cpp_extension import _get_cuda_arch_flags
            flags = _get_cuda_arch_flags()  # exactly what the build passes to nvcc
            sass, ptx = arch_codes(flags)
            _State.cuda_arch = {"list": os.environ.get("TORCH_CUDA_ARCH_LIST") or "(visible GPUs)",
                                "source": source, "sass": sass, "ptx": ptx}
            _say(f"CUDA architectures: SASS {', '.join(sass)}; PTX {', '.join(ptx) or 'none'} ({source})")
            nvcc_threads = os.environ.get("NVCC_THREADS", "4")
            ext_modules.append(CUDAExtension(
                f"{PACKAGE}._C_cuda", sources, include_dirs=include,
                extra_compile_args={"cxx": CXX_FLAGS_CUDA_HOST + debug_flags(),
                                    "nvcc": NVCC_FLAGS + ["--threads", nvcc_threads]}))
        cmdclass["build_ext"] = _make_build_ext(BuildExtension).with_options(use_ninja=shutil.which("ninja") is not None)
    for name, why in skipped.items():
        _say(f"skipping {name}: {why}")
    if "_C_cuda" in skipped and _flag("FORCE_CUDA"):
        raise SystemExit(f"[cmpe_se_fused] error: FORCE_CUDA=1 but _C_cuda is not built: {skipped['_C_cuda']}")
    setup(ext_modules=ext_modules, cmdclass=cmdclass)


if __name__ == "__main__":
    main()
