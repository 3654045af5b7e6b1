"""Deployment (docs/DEPLOY.md): ONNX export run by onnxruntime, torch.export round trips that keep the fused
op, and the compiled libraries loaded by processes that never import cmpe_se_fused.

An AOTInductor package of a WRN-10-1 loads in a fresh process here (``slow``: about 25 s of C++
compilation); docs/DEPLOY.md's blocks, the C++ program among them, run in test_deploy_docs.py."""
from __future__ import annotations

import collections
import copy
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_close_rule
from torch import nn

import cmpe_se_fused
from cmpe_se_fused import CMPESE, deploy
from cmpe_se_fused.dispatch import BACKENDS
from cmpe_se_fused.models import preact_resnet, wide_resnet
from cmpe_se_fused.reference import MODES

HAS_CPU_KERNEL = not BACKENDS["cpu"].not_supported_reasons()
needs_cpu = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="needs the compiled CPU backend (cmpe_se_fused._C)")
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="needs onnx, onnxscript and onnxruntime (pip install "
                                "'cmpe_se_fused[onnx]'; CI installs them)")
#: what the layer may become in ONNX: standard ops only (SPEC's squeeze, pair map, conv, BN, FCs, gate, rescale)
STANDARD_OPS = {"ReduceMean", "MatMul", "Gemm", "Conv", "BatchNormalization", "Sigmoid", "Relu", "Mul", "Add", "Sub",
                "Reshape", "Unsqueeze", "Concat", "Transpose", "Cast", "Identity", "Constant", "Shape", "Gather",
                "Slice", "Squeeze", "Expand", "Div", "Sqrt", "Reciprocal"}

pytestmark = pytest.mark.usefixtures("one_thread")


class Zoo(nn.Module):
    """Every mode in one small network: a conv makes U from the running X, each layer gives the next X."""

    def __init__(self, channels=16, backend="auto"):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in MODES)
        self.layers = nn.ModuleList(CMPESE(channels, mode=m, reduction=4, pair_filters=2, fold_width=4,
                                           padding=i % 2, backend=backend) for i, m in enumerate(MODES))

    def forward(self, x):
        x = self.stem(x)
        for conv, layer in zip(self.convs, self.layers, strict=True):
            x = layer(conv(x), x)
        return x


def randomise_bn(model):
    """Running statistics away from (0, 1), so that eval-mode BatchNorm is not the identity."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def with_backend(model, backend):
    for m in model.modules():
        if isinstance(m, CMPESE):
            m.backend = backend
    return model


def fused_calls(ep) -> int:
    """Fused-op calls in an exported graph: direct, or inside ``auto_functionalized`` (the op mutates)."""
    def is_fused(t):
        return isinstance(t, torch._ops.OpOverload) and t.namespace == "cmpe_se" and "forward" in t.name()
    return sum(is_fused(n.target) or bool(n.args and is_fused(n.args[0]))
               for n in ep.graph.nodes if n.op == "call_function")


def run_fresh(code: str, cwd, timeout=300) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=timeout, check=False, cwd=cwd)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


# -- ONNX -----------------------------------------------------------------------------------------

@needs_onnx
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_onnx_every_mode_standard_ops_dynamic_batch(tmp_path, channels_last):
    """The user's call, no extra arguments: standard opset only, onnxruntime within the fp32 rule of a float64
    reference, at the exported batch size and at two others (dynamic batch)."""
    import onnxruntime

    torch.manual_seed(0)
    model = randomise_bn(Zoo()).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(2, 3, 8, 8).to(memory_format=fmt)
    path = tmp_path / "zoo.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
    import onnx

    proto = onnx.load(str(path))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, "a custom domain in the graph"
    assert not proto.functions, [f.name for f in proto.functions]
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert set(ops) <= STANDARD_OPS, set(ops) - STANDARD_OPS
    assert ops["Sigmoid"] == len(MODES) and ops["ReduceMean"] >= len(MODES), ops
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref64_model = copy.deepcopy(model).double()
    eager_model = with_backend(copy.deepcopy(model), "reference")
    for n in (1, 2, 5):
        xn = torch.randn(n, 3, 8, 8).to(memory_format=fmt)
        (out,) = session.run(None, {session.get_inputs()[0].name: xn.numpy()})
        with torch.no_grad():
            ref64, eager = ref64_model(xn.double()), eager_model(xn)
            assert_close_rule(torch.from_numpy(out), ref64, eager, name=f"onnxruntime batch {n}")
            assert_close_rule(model(xn), ref64, eager, name=f"fused batch {n}")  # the model itself is unchanged


@needs_onnx
@pytest.mark.skipif(torch.__version__ < "2.9", reason="torch.onnx.export defaults to dynamo=True from torch 2.9")
def test_onnx_export_default_arguments_in_a_fresh_process(tmp_path):
    """The issue's first try, as a user types it: import the package (which imports nothing of onnx: it costs
    import time), then torch.onnx.export(model, (x,), f) with no other argument; onnxruntime matches eager."""
    code = """
        import collections, sys
        import torch
        import cmpe_se_fused
        from cmpe_se_fused.models import wide_resnet

        heavy = [m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxscript', 'onnxruntime')
                 or m.startswith('torch.onnx')]
        assert not heavy, heavy
        import onnx, onnxruntime

        torch.manual_seed(0)
        model = wide_resnet(10, 1, se_mode="pair_2x1").eval()
        x = torch.randn(2, 3, 16, 16)
        torch.onnx.export(model, (x,), "model.onnx")
        proto = onnx.load("model.onnx")
        assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"} and not proto.functions
        print(dict(collections.Counter(n.op_type for n in proto.graph.node)))
        session = onnxruntime.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(y), model(x), rtol=1e-5, atol=1e-5)
    """
    ops = eval(run_fresh(code, tmp_path).stdout.strip().splitlines()[-1])  # our own printed dict
    assert set(ops) <= STANDARD_OPS and ops["Sigmoid"] == 3, ops  # wrn10_1: 3 CMPE-SE layers


@needs_onnx
def test_onnx_training_mode_says_call_eval():
    model = Zoo().train()
    with pytest.raises(Exception, match=r"training mode is not supported.*call model\.eval\(\)"):
        torch.onnx.export(model, (torch.randn(2, 3, 8, 8),), dynamo=True)


def test_legacy_onnx_exporter_names_dynamo_true(tmp_path):
    model = Zoo().eval()
    with pytest.raises(RuntimeError, match=r"dynamo=False.*Use torch\.onnx\.export\(model, args, f, dynamo=True\)"):
        torch.onnx.export(model, (torch.randn(2, 3, 8, 8),), str(tmp_path / "legacy.onnx"), dynamo=False)


@needs_cpu
def test_onnx_swap_leaves_eager_compile_and_torch_export_alone():
    """With torch.onnx imported (as after an export), calls outside an export still run the fused op: eager,
    torch.export (the graph holds the op) and plain jit tracing."""
    import torch.onnx

    model = Zoo().eval()
    x = torch.randn(2, 3, 8, 8)
    assert deploy.export_backend("auto", False) == "auto"
    assert fused_calls(torch.export.export(model, (x,))) == len(MODES)
    traced = torch.jit.trace(model, (x,), check_trace=False)
    assert str(traced.inlined_graph).count("cmpe_se::forward") == len(MODES)


# -- torch.export ---------------------------------------------------------------------------------

NETWORKS = {
    "preact_resnet20_pair_2x1": lambda: preact_resnet(20, se_mode="pair_2x1"),
    "wrn10_1_folded_3x3": lambda: wide_resnet(10, 1, se_mode="folded_3x3"),
}


@needs_cpu
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_torch_export_round_trip_keeps_the_fused_op(tmp_path, name, training):
    """export -> save -> load -> run: the same output (and, in training, the same running statistics) as
    eager, and every CMPE-SE layer is a fused-op call in the graph, not its decomposition."""
    torch.manual_seed(0)
    model = randomise_bn(NETWORKS[name]()).train(training)
    n_layers = sum(isinstance(m, CMPESE) for m in model.modules())
    x = torch.randn(4, 3, 16, 16)
    ep = torch.export.export(copy.deepcopy(model), (x,))
    assert fused_calls(ep) == n_layers
    torch.export.save(ep, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2")
    assert fused_calls(loaded) == n_layers
    module = loaded.module()  # runs in the mode it was exported in (train() on it is not supported)
    x2 = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(module(x2), model(x2), rtol=1e-5, atol=1e-6)
    if training:
        buffers = dict(module.named_buffers())
        stats = [k for k in buffers if k.endswith(("running_mean", "running_var")) and ".se." in k]
        assert stats
        for key in stats:
            torch.testing.assert_close(buffers[key], model.get_buffer(key), rtol=1e-5, atol=1e-7, msg=key)


# -- the libraries without the Python package ------------------------------------------------------

def _elf(path):
    out = subprocess.run(["readelf", "-d", "--dyn-syms", "-W", path], capture_output=True, text=True, check=True)
    needed = [line.split("[")[1].rstrip("]") for line in out.stdout.splitlines() if "(NEEDED)" in line]
    undefined = [line.split()[-1] for line in out.stdout.splitlines() if " UND " in line and line.split()[-1]]
    return needed, undefined


@needs_cpu
@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_libraries_need_no_python():
    """No CPython symbol and no libpython / libtorch_python dependency: a C++ program can load them."""
    paths = deploy.library_paths()
    assert paths and paths[0] == deploy.library_path("_C")
    for path in paths:
        needed, undefined = _elf(path)
        assert not [n for n in needed if "python" in n], (path, needed)
        assert not [s for s in undefined if s.startswith(("Py", "_Py"))], (path, undefined)


@needs_cpu
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_c_program_without_libpython_loads_the_library(tmp_path):
    """A C program (no Python, no torch headers: compiles in well under a second) dlopens each library with
    RTLD_NOW and calls _C's cmpe_se_cpu_isa."""
    src = tmp_path / "load.c"
    src.write_text(textwrap.dedent(r"""
        #include <dlfcn.h>
        #include <stdio.h>
        int main(int argc, char** argv) {
          for (int i = 1; i < argc; ++i) {
            void* h = dlopen(argv[i], RTLD_NOW | RTLD_GLOBAL);
            if (!h) { fprintf(stderr, "%s\n", dlerror()); return 1; }
            const char* (*isa)(void) = (const char* (*)(void))dlsym(h, "cmpe_se_cpu_isa");
            if (isa) printf("isa %s\n", isa());
          }
          return 0;
        }
    """))
    subprocess.run(["cc", str(src), "-o", str(tmp_path / "load"), "-ldl"], check=True, timeout=120)
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    env = dict(os.environ, LD_LIBRARY_PATH=torch_lib)
    res = subprocess.run([str(tmp_path / "load"), *deploy.library_paths()], capture_output=True, text=True,
                         env=env, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"isa {cmpe_se_fused._C.cpu_isa()}"
    needed = subprocess.run(["readelf", "-d", str(tmp_path / "load")], capture_output=True, text=True,
                            check=True).stdout
    assert "python" not in needed


@needs_cpu
@pytest.mark.slow
def test_exported_and_aoti_models_run_in_a_process_that_never_imports_the_package(tmp_path):
    """The issue's fresh process: without the libraries neither model loads; after torch.ops.load_library on
    library_paths(), the ExportedProgram (torch.export.load) and the AOTInductor package (aoti_load_package)
    match the eager output saved here, and cmpe_se_fused was never imported. ``slow``: the package costs about
    25 s of C++ compilation. The C++ program that loads such a package is docs/DEPLOY.md's (test_deploy_docs.py,
    ``-m heavy``)."""
    torch.manual_seed(0)
    model = randomise_bn(wide_resnet(10, 1, se_mode="folded_3x3")).eval()
    x = torch.randn(2, 3, 16, 16)
    ep = torch.export.export(model, (x,))
    assert fused_calls(ep) == 3
    torch.export.save(ep, tmp_path / "model.pt2")
    torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "aoti.pt2"))
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    (tmp_path / "libs.txt").write_text("\n".join(deploy.library_paths()) + "\n")
    code = """
        import sys, torch
        io = torch.load("io.pt")
        # both call the fused op: without the libraries they cannot load (torch.export.load says why in a warning)
        for load, says in ((lambda: torch.export.load("model.pt2").module(), "deserializing"),
                           (lambda: torch._inductor.aoti_load_package("aoti.pt2"), "cmpe_se::forward")):
            try:
                load()(io["x"])
                raise AssertionError("a model ran without the cmpe_se libraries")
            except RuntimeError as exc:
                assert says in str(exc), exc
        for path in open("libs.txt").read().split():
            torch.ops.load_library(path)
        for name, model in (("torch.export", torch.export.load("model.pt2").module()),
                            ("aoti", torch._inductor.aoti_load_package("aoti.pt2"))):
            y = model(io["x"])
            torch.testing.assert_close(y, io["y"], rtol=1e-5, atol=1e-6)
            print(name, "max |diff| to eager:", (y - io["y"]).abs().max().item())
        assert not [m for m in sys.modules if m.startswith("cmpe_se_fused")]
    """
    out = run_fresh(code, tmp_path).stdout
    assert "torch.export max |diff|" in out and "aoti max |diff|" in out, out


def test_library_path_not_built_names_the_reason(monkeypatch):
    with pytest.raises(ValueError, match="name must be one of"):
        deploy.library_path("_D")
    monkeypatch.setattr(cmpe_se_fused._loader, "find", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"cmpe_se_fused\._C_cuda: "):
        deploy.library_path("_C_cuda")
    assert deploy.library_paths() == []
    assert deploy.main([]) == 1


@needs_cpu
def test_deploy_cli_prints_the_libraries(capsys):
    """In process: docs/DEPLOY.md's export block runs ``python -m cmpe_se_fused.deploy`` itself."""
    assert deploy.main([]) == 0
    assert capsys.readouterr().out.split() == deploy.library_paths()


