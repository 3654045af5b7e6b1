"""Distribution: the sdist carries every file the build needs, the build plan compiles every
source for the right CUDA architectures, failures are loud, and the ``cuda`` backend refuses a GPU
its binary has no code for.

Cheap by design (CI runs it): the sdist is built (seconds), the wheel's compiled contents are
checked through setup.py's extension plan (no compiler runs, except on a one-line broken file).
The full sdist -> wheel -> fresh venv smoke test builds every extension again, so it runs only on
request: ``CMPE_SE_TEST_WHEEL=1 python -m pytest tests/test_distribution.py -k wheel``.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import types
import zipfile

import pytest
import torch

from cmpe_se_fused import dispatch, info, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: tracked files the sdist leaves out on purpose (MANIFEST.in says why)
SDIST_EXCLUDED_PREFIXES = ("benchmarks/results/", ".ci/", ".gitignore")
#: files setuptools adds to every sdist
SDIST_GENERATED = ("PKG-INFO", "setup.cfg")


def _load_setup():
    """setup.py as a module (its ``main()`` runs only as ``__main__``)."""
    spec = importlib.util.spec_from_file_location("cmpe_se_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _git_files() -> set[str]:
    """Tracked files plus untracked ones git does not ignore (a new source file not yet added)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    res = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"not a git checkout: {res.stderr.strip()}")
    return {f for f in res.stdout.splitlines() if os.path.exists(os.path.join(ROOT, f))}


def _build_sdist(out_dir) -> str:
    res = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(out_dir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, f"setup.py sdist failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    (path,) = glob.glob(os.path.join(str(out_dir), "cmpe_se_fused-*.tar.gz"))
    return path


# ---- the sdist ------------------------------------------------------------------------------

def test_sdist_holds_every_tracked_file(tmp_path):
    """The sdist (what an index serves and ``pip wheel`` builds from) is git's file list, headers
    included, minus the documented exclusions, and holds nothing git ignores (built .so files,
    the generated _build_info.py)."""
    expected = {f for f in _git_files() if not f.startswith(SDIST_EXCLUDED_PREFIXES)}
    with tarfile.open(_build_sdist(tmp_path)) as tar:
        names = [m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()]
    got = {n for n in names if n not in SDIST_GENERATED and not n.startswith("cmpe_se_fused.egg-info/")}
    missing, extra = sorted(expected - got), sorted(got - expected)
    assert not missing, f"files the sdist leaves out (add them to MANIFEST.in): {missing}"
    assert not extra, f"files in the sdist that git does not track (or that MANIFEST.in should exclude): {extra}"
    headers = {f for f in expected if f.startswith("csrc/") and f.endswith((".h", ".cuh"))}
    assert headers and headers <= got


# ---- what the wheel holds: its Python files (build_py) and what it compiles (setup.py's plan) ---

def test_wheel_python_files_are_the_tracked_package(tmp_path):
    """``setup.py build_py`` (the wheel's pure-Python part) copies every tracked module of every
    subpackage, plus the generated build record."""
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    built = {os.path.relpath(p, tmp_path) for p in glob.glob(str(tmp_path / "cmpe_se_fused" / "**" / "*.py"),
                                                              recursive=True)}
    tracked = {f for f in _git_files() if f.startswith("cmpe_se_fused/") and f.endswith(".py")}
    assert built == tracked | {"cmpe_se_fused/_build_info.py"}
    ns = {}
    exec((tmp_path / "cmpe_se_fused" / "_build_info.py").read_text(), ns)  # noqa: S102
    assert ns["BUILD_INFO"]["torch"] == torch.__version__

# ---- what the wheel compiles (setup.py's plan; nothing is compiled) ---------------------------

def _torch_like(cuda: str | None):
    return types.SimpleNamespace(__version__="2.x", version=types.SimpleNamespace(cuda=cuda))


def test_build_plan_compiles_every_source():
    """Every .cpp / .cu under csrc/ goes into exactly one extension: _C (ops + CPU kernels), _fastpath
    (the call plans' entry) or _C_cuda (launchers + bindings); all are planned where a compiler, nvcc
    and a CUDA torch exist."""
    setup = _load_setup()
    plan, skipped = setup.extension_plan(_torch_like("13.0"), "/opt/cuda", env={})
    assert skipped == {}
    sources = dict(plan)
    assert set(sources) == {"_C", "_fastpath", "_C_cuda"}
    on_disk = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.c*"),
                                                                   recursive=True) if p.endswith((".cpp", ".cu")))
    planned = sorted(sources["_C"] + sources["_fastpath"] + sources["_C_cuda"])
    assert planned == on_disk
    assert all(s.startswith(("csrc/ops.cpp", "csrc/autograd.cpp", "csrc/cpu/")) for s in sources["_C"])
    assert all(s.startswith("csrc/cuda/") for s in sources["_C_cuda"])
    assert sources["_fastpath"] == ["csrc/fastpath.cpp"]


def test_host_debug_info_is_off_unless_asked():
    """The C++ units are compiled with -g0 (Python's CFLAGS carry -g, which doubles the compile time
    of the torch-including units and bloats the wheel); CMPE_SE_DEBUG_INFO=1 keeps -g."""
    setup = _load_setup()
    assert setup.debug_flags({}) == ["-g0"]
    assert setup.debug_flags({"CMPE_SE_DEBUG_INFO": "1"}) == []


def _elf_sections(path):
    """Section names of an ELF shared object (64-bit little-endian), read with the standard library."""
    import struct

    with open(path, "rb") as fh:
        data = fh.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not a 64-bit LE ELF file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    str_off = headers[shstrndx][4]
    return {data[str_off + h[0]:data.index(b"\0", str_off + h[0])].decode() for h in headers}


@pytest.mark.parametrize("name", ["_C", "_fastpath", "_C_cuda"])
def test_built_extension_has_no_host_debug_info(name):
    """What the default build installs: no DWARF in the extension (the -g0 above reached the
    compiler, after Python's -g). Skipped when that extension is not built here."""
    found = glob.glob(os.path.join(ROOT, "cmpe_se_fused", f"{name}.*.so"))
    if not found:
        pytest.skip(f"cmpe_se_fused.{name} is not built in this checkout")
    if os.environ.get("CMPE_SE_DEBUG_INFO"):
        pytest.skip("built with CMPE_SE_DEBUG_INFO set")
    sections = _elf_sections(found[0])
    assert ".text" in sections, sorted(sections)  # the reader works
    assert ".debug_info" not in sections, f"{found[0]} carries host debug info: {sorted(sections)}"


@pytest.mark.parametrize("case,env,torch_cuda,cuda_home,want", [
    ("no nvcc", {}, "13.0", None, {"_C_cuda": "nvcc not found"}),
    ("CPU-only torch", {}, None, "/opt/cuda", {"_C_cuda": "CPU-only"}),
    ("no C++ compiler", {"CXX": "/nonexistent/g++"}, "13.0", "/opt/cuda",
     {"_C": "no C++ compiler", "_fastpath": "no C++ compiler", "_C_cuda": "no C++ compiler"}),
    ("skip switch", {"CMPE_SE_SKIP_CUDA_BUILD": "1"}, "13.0", "/opt/cuda", {"_C_cuda": "CMPE_SE_SKIP_CUDA_BUILD"}),
    ("pure Python", {"CMPE_SE_SKIP_CPP_BUILD": "1"}, "13.0", "/opt/cuda",
     {"_C": "CMPE_SE_SKIP_CPP_BUILD", "_fastpath": "CMPE_SE_SKIP_CPP_BUILD", "_C_cuda": "CMPE_SE_SKIP_CPP_BUILD"}),
])
def test_missing_toolchain_skips_with_a_reason(case, env, torch_cuda, cuda_home, want):
    setup = _load_setup()
    plan, skipped = setup.extension_plan(_torch_like(torch_cuda), cuda_home, env=env)
    assert set(skipped) == set(want), case
    for name, words in want.items():
        assert words in skipped[name], (case, skipped)
        assert name not in dict(plan)


def test_no_torch_at_build_time_fails_the_wheel_build():
    """An isolated build (no torch) must not produce a wheel without kernels: build_py refuses,
    naming --no-build-isolation and the pure-Python switch."""
    setup = _load_setup()
    _plan, skipped = setup.extension_plan(None, None, env={})
    assert skipped["_C"] == setup.NO_TORCH
    assert "--no-build-isolation" in setup.NO_TORCH and "CMPE_SE_SKIP_CPP_BUILD" in setup.NO_TORCH
    setup._State.skipped = skipped
    from setuptools import Distribution
    cmd = setup.build_py(Distribution({"name": "cmpe_se_fused", "packages": []}))
    with pytest.raises(SystemExit, match="no-build-isolation"):
        cmd.run()


# ---- CUDA architectures -----------------------------------------------------------------------

def test_default_arch_list_is_sm80_sm90_and_ptx(monkeypatch):
    """No TORCH_CUDA_ARCH_LIST and no GPU at build time: SASS sm_80 + sm_90, PTX compute_90, as
    torch turns the list into nvcc flags; a visible GPU: torch's choice (that GPU); a given list wins."""
    setup = _load_setup()
    no_gpu = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False))
    arch_list, source = setup.resolve_arch_list(no_gpu, env={})
    assert arch_list == setup.DEFAULT_ARCH_LIST and "default" in source
    from torch.utils.cpp_extension import _get_cuda_arch_flags
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    assert setup.arch_codes(_get_cuda_arch_flags()) == (["sm_80", "sm_90"], ["compute_90"])

    gpu = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1,
                                                           get_device_name=lambda i: "NVIDIA L4"))
    arch_list, source = setup.resolve_arch_list(gpu, env={})
    assert arch_list is None and "NVIDIA L4" in source
    assert setup.resolve_arch_list(gpu, env={"TORCH_CUDA_ARCH_LIST": "8.9"}) == ("8.9", "TORCH_CUDA_ARCH_LIST")


@pytest.mark.parametrize("cap,sass,ptx,runs", [
    ((8, 0), ["sm_80", "sm_90"], ["compute_90"], True),
    ((8, 6), ["sm_80", "sm_90"], ["compute_90"], True),    # A10 / RTX 30: the sm_80 SASS
    ((8, 9), ["sm_80", "sm_90"], ["compute_90"], True),    # L4 / RTX 4090
    ((9, 0), ["sm_80", "sm_90"], ["compute_90"], True),
    ((10, 0), ["sm_80", "sm_90"], ["compute_90"], True),   # B200: JIT from the PTX
    ((12, 0), ["sm_80", "sm_90"], ["compute_90"], True),   # RTX 50
    ((7, 5), ["sm_80", "sm_90"], ["compute_90"], False),   # T4: older than every target
    ((8, 0), ["sm_90"], [], False),                        # the old default on an A100
    ((8, 9), ["sm_90"], [], False),
    ((10, 0), ["sm_90"], [], False),                       # SASS does not cross major versions
    ((9, 0), ["sm_90a"], [], True),
    ((10, 0), [], ["compute_90a"], False),                 # arch-specific PTX: 9.0 only
    ((8, 6), ["sm_86"], [], True),
    ((8, 0), ["sm_86"], [], False),
])
def test_runs_on(cap, sass, ptx, runs):
    assert ops.runs_on(cap, sass, ptx) is runs


def _fake_gpu(monkeypatch, cap, sass, ptx, arch_list):
    monkeypatch.setattr(ops, "HAS_C_CUDA", True)
    monkeypatch.setattr(ops, "BUILD_INFO", {"skipped": {}, "cuda_arch": {"list": arch_list, "source": "test",
                                                                         "sass": sass, "ptx": ptx}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(major=cap[0], minor=cap[1], name="Fake GPU"))
    monkeypatch.setattr(dispatch, "_HAS_TRITON", True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("CMPE_SE_BACKEND", raising=False)
    # what choose() reads of a tensor; a real CUDA tensor cannot exist on a machine without a GPU
    return types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)


def test_cuda_backend_refuses_a_gpu_it_has_no_code_for(monkeypatch):
    """An A100 (8.0) with an extension built for sm_90 only: ``cuda`` is unusable with a reason
    naming the capability, the built list and the rebuild command; ``auto`` moves on to triton."""
    u = _fake_gpu(monkeypatch, (8, 0), ["sm_90"], [], "9.0")
    (reason,) = dispatch.BACKENDS["cuda"].static_reasons()
    assert "compute capability 8.0" in reason and "sm_90" in reason
    assert "TORCH_CUDA_ARCH_LIST=8.0 pip install --no-build-isolation" in reason
    assert dispatch.choose("auto", u).name == "triton"
    with pytest.raises(RuntimeError, match="compute capability 8.0"):
        dispatch.choose("cuda", u)
    assert "compute capability 8.0" in " ".join(info.collect()["backends"]["cuda"])


def test_cuda_backend_runs_newer_gpus_through_the_default_list(monkeypatch):
    for cap in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)):
        u = _fake_gpu(monkeypatch, cap, ["sm_80", "sm_90"], ["compute_90"], "8.0;9.0+PTX")
        assert dispatch.BACKENDS["cuda"].static_reasons() == [], cap
        assert dispatch.choose("auto", u).name == "cuda", cap


# ---- loud failures ------------------------------------------------------------------------------

def _build_broken_extension(tmp_path, monkeypatch, allow: bool):
    """The real build_ext command on a one-line C++ file that does not compile (fast: no torch headers)."""
    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension, CppExtension
    setup = _load_setup()
    setup._State.planned, setup._State.skipped = ["_C"], {}
    src = tmp_path / "broken.cpp"
    src.write_text("int broken = ;\n")
    if allow:
        monkeypatch.setenv("CMPE_SE_ALLOW_BUILD_FAILURE", "1")
    else:
        monkeypatch.delenv("CMPE_SE_ALLOW_BUILD_FAILURE", raising=False)
    dist = Distribution({"name": "cmpe_se_fused", "ext_modules": [CppExtension("cmpe_se_fused._C", [str(src)])]})
    cmd = setup._make_build_ext(BuildExtension).with_options(use_ninja=False)(dist)
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "tmp")
    cmd.ensure_finalized()
    cmd.run()
    return setup, tmp_path / "lib" / "cmpe_se_fused" / "_build_info.py"


def test_compile_error_fails_the_build(tmp_path, monkeypatch):
    with pytest.raises(Exception) as exc_info:  # noqa: PT011 - distutils CompileError or RuntimeError (ninja)
        _build_broken_extension(tmp_path, monkeypatch, allow=False)
    assert "rror" in type(exc_info.value).__name__ or "rror" in str(exc_info.value)


def test_compile_error_with_opt_out_is_recorded(tmp_path, monkeypatch):
    setup, record = _build_broken_extension(tmp_path, monkeypatch, allow=True)
    assert "build failed" in setup._State.skipped["_C"]
    ns = {}
    exec(record.read_text(), ns)  # noqa: S102 - the generated file, read back as ops does
    assert "build failed" in ns["BUILD_INFO"]["skipped"]["_C"]


def test_missing_extension_reason_comes_from_the_build_record(monkeypatch):
    monkeypatch.setattr(ops, "BUILD_INFO", {"skipped": {"_C_nothere": "nvcc not found (put nvcc on PATH)"}})
    assert not ops._try_import("_C_nothere")
    assert ops.EXTENSION_STATUS.pop("_C_nothere") == "not built: nvcc not found (put nvcc on PATH)"


_FALLBACK_SCRIPT = textwrap.dedent("""
    import sys, warnings
    sys.modules["cmpe_se_fused._C"] = None          # as if _C had not been built
    import torch
    from cmpe_se_fused import CMPESE, dispatch, ops
    assert not ops.HAS_C
    # choose()'s one-time logger.info is another matter (a graph break of its own); only the warning is tested
    dispatch._logged.add(("cpu", torch.float32, "reference"))
    torch.manual_seed(0)
    layer = CMPESE(16, mode="se", reduction=4)
    u, x = torch.randn(2, 16, 5, 5), torch.randn(2, 16, 5, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(layer, backend="eager", fullgraph=True)
        yc = compiled(u, x)                          # traced: no warning, no graph break
        in_compile = [str(w.message) for w in caught if "cmpe_se" in str(w.message)]
        y1, y2 = layer(u, x), layer(u, x)
    msgs = [str(w.message) for w in caught if "cmpe_se" in str(w.message)]
    print("IN_COMPILE", len(in_compile))
    print("COUNT", len(msgs))
    print("MSG", msgs[0] if msgs else "")
    print("SAME", bool(torch.equal(y1, y2) and torch.allclose(yc, y1)))
""")


def test_auto_warns_once_when_an_extension_is_missing(tmp_path):
    """A fresh process whose _C is missing: the first ``auto`` call on CPU tensors runs the eager
    reference and warns once, naming _C and ``cmpe_se_fused.info``; torch.compile(fullgraph=True)
    still traces the call."""
    res = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], capture_output=True, text=True, timeout=600,
                         check=False, cwd=str(tmp_path),
                         env={**os.environ, "PYTHONPATH": ROOT, "CMPE_SE_BACKEND": "auto"})
    assert res.returncode == 0, res.stderr[-4000:]
    out = dict(line.split(" ", 1) for line in res.stdout.splitlines() if " " in line)
    assert out["IN_COMPILE"] == "0"
    assert out["COUNT"] == "1", res.stdout
    assert "cmpe_se_fused._C is missing" in out["MSG"] and "cmpe_se_fused.info" in out["MSG"]
    assert out["SAME"] == "True"


# ---- info --require (CI: README's test command runs `--require built`) --------------------------

def test_require_reports_each_missing_piece(monkeypatch):
    monkeypatch.setattr(ops, "EXTENSION_STATUS", {"_C": "not built: no C++ compiler", "_C_cuda": "not built: x"})
    monkeypatch.setattr(ops, "HAS_C", False)
    monkeypatch.setattr(ops, "BUILD_INFO", {"skipped": {}, "opted_out": []})
    monkeypatch.setattr(info, "_nvcc_present", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    fails = info.requirement_failures(["built"])
    assert len(fails) == 2 and "no C++ compiler" in fails[0] and "_C_cuda" in fails[1]
    assert "_C is not available" in info.requirement_failures(["cpu"])[0]
    assert info.requirement_failures(["reference"]) == []
    monkeypatch.setattr(info, "_nvcc_present", lambda: False)            # no nvcc: _C_cuda not required
    assert len(info.requirement_failures(["built"])) == 1
    monkeypatch.setattr(info, "_nvcc_present", lambda: True)
    monkeypatch.setattr(ops, "BUILD_INFO", {"skipped": {}, "opted_out": ["_C_cuda"]})  # CMPE_SE_SKIP_CUDA_BUILD
    assert len(info.requirement_failures(["built"])) == 1
    with pytest.raises(ValueError, match="unknown name 'gpu'"):
        info.requirement_failures(["gpu"])


def test_require_exit_codes(capsys, monkeypatch):
    """``main`` is what ``python -m cmpe_se_fused.info`` runs (README's test command runs it as a
    process): 0 when met, 1 with the reasons on stderr, 2 for an unknown name."""
    assert info.main(["--require", "reference"]) == 0
    assert "build:" in capsys.readouterr().out
    monkeypatch.setattr(ops, "EXTENSION_STATUS", {**ops.EXTENSION_STATUS, "_C_cuda": "not built: nvcc not found"})
    assert info.main(["--require", "reference,cuda-build"]) == 1
    assert "REQUIRED BUT MISSING: cmpe_se_fused._C_cuda is not loaded: not built: nvcc not found" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        info.main(["--require", "nonsense"])
    assert exc.value.code == 2 and "unknown name 'nonsense'" in capsys.readouterr().err


# ---- the full path, by request ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CMPE_SE_TEST_WHEEL") != "1",
                    reason="builds every extension again (minutes); set CMPE_SE_TEST_WHEEL=1 to run")
def test_wheel_from_sdist_in_a_fresh_venv(tmp_path):
    """sdist -> ``pip wheel --no-build-isolation`` -> a fresh venv (this torch, nothing else of
    this environment) -> _C (and _C_cuda where nvcc exists) load and the CPU kernel matches the
    reference."""
    sdist = _build_sdist(tmp_path / "sdist")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
                          str(tmp_path / "wheel"), sdist], capture_output=True, text=True, check=False,
                         env={**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2")})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "wheel" / "cmpe_se_fused-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert any(n.startswith("cmpe_se_fused/_C.") and n.endswith(".so") for n in names), names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    with open(os.path.join(site, "torch_from_outside.pth"), "w") as f:  # torch without reinstalling it
        f.write(torch_site + "\n")
    subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", wheel], check=True)
    smoke = textwrap.dedent(f"""
        import torch, cmpe_se_fused
        assert cmpe_se_fused.__file__.startswith({str(venv)!r}), cmpe_se_fused.__file__
        from cmpe_se_fused import CMPESE
        layer = CMPESE(16, mode="folded_3x3", reduction=4, fold_width=4).double().eval()
        u, x = torch.randn(2, 16, 5, 5, dtype=torch.float64), torch.randn(2, 16, 5, 5, dtype=torch.float64)
        y = layer(u, x)  # auto: the cpu kernel
        layer.backend = "reference"
        assert torch.allclose(y, layer(u, x), rtol=1e-9, atol=1e-12), "cpu kernel != reference (float64)"
    """)
    res = subprocess.run([py, "-c", smoke], capture_output=True, text=True, cwd=str(tmp_path), check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([py, "-m", "cmpe_se_fused.info", "--require", "cpu,built"], capture_output=True,
                         text=True, cwd=str(tmp_path), check=False)
    assert res.returncode == 0, res.stdout + res.stderr


# ---- when _C_cuda is built (issue 25: a plain install on a machine without a GPU) ---------------

def _torch_with_gpu(visible: bool):
    return types.SimpleNamespace(__version__="2.x", version=types.SimpleNamespace(cuda="13.0"),
                                 cuda=types.SimpleNamespace(is_available=lambda: visible))


@pytest.mark.parametrize("visible,env,wanted", [
    (True, {}, True),                                       # a GPU at build time: build for it
    (False, {}, False),                                     # none, no switch: skip with the reason
    (False, {"FORCE_CUDA": "1"}, True),                     # a wheel builder / CI: the default arch list
    (False, {"TORCH_CUDA_ARCH_LIST": "9.0"}, True),         # an explicit list asks for CUDA too
    (False, {"FORCE_CUDA": "0", "TORCH_CUDA_ARCH_LIST": " "}, False),
])
def test_cuda_extension_is_built_for_a_visible_gpu_or_on_request(visible, env, wanted):
    setup = _load_setup()
    why = setup.cuda_skip_reason(_torch_with_gpu(visible), env=env)
    assert (why is None) == wanted, why
    if not wanted:
        # the one line says what is skipped, why, and how to get it
        assert "no GPU visible" in why and "FORCE_CUDA=1" in why and "TORCH_CUDA_ARCH_LIST" in why
        assert setup.DEFAULT_ARCH_LIST in why


def test_the_no_gpu_skip_is_an_opt_out_for_require_built():
    """``info --require built`` passes after a default install without a GPU (the skip is the
    build's choice, not a missing toolchain), and the record carries the reason."""
    setup = _load_setup()

    class State(setup._State):
        skipped = {"_C_cuda": setup.NO_GPU}
    ns = {}
    exec(setup.build_info_source(State), ns)  # noqa: S102 - the generated file, read back as ops does
    assert ns["BUILD_INFO"]["opted_out"] == ["_C_cuda"] and ns["BUILD_INFO"]["skipped"]["_C_cuda"] == setup.NO_GPU


def _setup_py_lines(extra_env):
    """stderr of ``python setup.py --version`` (runs the build plan, compiles nothing)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "CMPE_SE_BUILD_ONLY",
                                                            "CMPE_SE_SKIP_CUDA_BUILD", "CMPE_SE_SKIP_CPP_BUILD")}
    res = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=dict(env, **extra_env),
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return [line for line in res.stderr.splitlines() if line.startswith("[cmpe_se_fused]")]


@pytest.mark.skipif(torch.version.cuda is None or torch.cuda.is_available() or shutil.which("nvcc") is None,
                    reason="needs a CUDA torch and nvcc without a visible GPU (the no-GPU default)")
def test_plain_build_without_a_gpu_says_it_skips_cuda_in_one_line():
    """A fresh setup.py process, as pip runs it: no GPU and no switch prints one line naming _C_cuda,
    the reason and the switches; FORCE_CUDA=1 plans it for the default architectures."""
    lines = _setup_py_lines({})
    cuda_lines = [line for line in lines if "_C_cuda" in line]
    assert len(cuda_lines) == 1 and "skipping _C_cuda: no GPU visible" in cuda_lines[0], lines
    assert "FORCE_CUDA=1" in cuda_lines[0]
    assert not any("CUDA architectures" in line for line in lines)
    forced = _setup_py_lines({"FORCE_CUDA": "1"})
    assert any("CUDA architectures: SASS sm_80, sm_90; PTX compute_90" in line for line in forced), forced
    assert not any("skipping _C_cuda" in line for line in forced), forced
