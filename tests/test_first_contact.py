"""First contact (issue 13): what a new user meets in the first hour, in the form they meet it.

Default arguments (``backend="auto"``), first calls, fresh processes where the state of a process
matters (the auto choice is logged once per process: a compile test in a process that already ran
the layer eagerly would not see what a new user sees).
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_params

from cmpe_se_fused import CMPESE, CMPESEReference, cmpe_se
from cmpe_se_fused.dispatch import BACKENDS
from cmpe_se_fused.reference import MODES, cmpe_se_reference

ROOT = Path(__file__).resolve().parents[1]
HAS_CPU = not BACKENDS["cpu"].not_supported_reasons(torch.empty(1))
CPU_BACKENDS = ["reference"] + (["cpu"] if HAS_CPU else [])


def _fresh_python(code: str, timeout=600, env_extra=None):
    """Run ``code`` in a fresh interpreter (no CMPE_SE_BACKEND unless given); returns the result."""
    env = {k: v for k, v in os.environ.items() if k != "CMPE_SE_BACKEND"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT), check=False)


# ---------------------------------------------------------------------------------------------
# 1, 2: torch.compile of a fresh module whose first call is the compiled one
# ---------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = """
import logging, torch
from cmpe_se_fused import CMPESE, CMPESEReference
logging.basicConfig(level=logging.INFO, format="LOG %(message)s")
torch.manual_seed(0)
momentum, kwargs, autocast, shapes, backward = {momentum!r}, {kwargs!r}, {autocast!r}, {shapes!r}, {backward!r}
m = CMPESE(16, mode="folded_3x3", fold_width=4, reduction=4, bn_momentum=momentum)   # backend="auto"
ref = CMPESEReference(16, mode="folded_3x3", fold_width=4, reduction=4, bn_momentum=momentum)
ref.load_state_dict(m.state_dict())
cm = torch.compile(m, **kwargs)
if autocast:  # an eager warm-up in fp32 first, then the compiled call under CPU autocast (a new dtype)
    u, x = torch.randn(shapes[0]), torch.randn(shapes[0])
    torch.testing.assert_close(m(u, x), ref(u, x), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cm(u, x)
    assert y.dtype == torch.bfloat16, y.dtype
    torch.testing.assert_close(y.float(), ref(u.bfloat16(), x.bfloat16()).float(), rtol=2e-2, atol=2e-2)
else:
    for shape in shapes:
        u = torch.randn(shape, requires_grad=backward)
        x = torch.randn(shape, requires_grad=backward)
        y = cm(u, x)
        y_ref = ref(u, x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        if backward:
            g = torch.autograd.grad(y.square().sum(), (u, x))
            g_ref = torch.autograd.grad(y_ref.square().sum(), (u, x))
            for a, b in zip(g, g_ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for key, value in ref.state_dict().items():  # running statistics (cumulative with momentum=None)
        torch.testing.assert_close(m.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)
print("FIRST CONTACT OK")
"""

ONE, TWO = [(3, 16, 3, 3)], [(3, 16, 3, 3), (5, 16, 2, 4)]
# forward and backward once with the plain fullgraph compile; the other cases reach the failing
# trace with the first forward (backward under compile: tests/test_ops.py); ~20-60 s each on CPU
COMPILE_CASES = {
    "fullgraph": dict(kwargs=dict(fullgraph=True), shapes=ONE, backward=True),
    "dynamic": dict(kwargs=dict(fullgraph=True, dynamic=True), shapes=TWO),
    "max_autotune": dict(kwargs=dict(fullgraph=True, mode="max-autotune-no-cudagraphs"), shapes=ONE),
    "autocast_after_warmup": dict(kwargs=dict(fullgraph=True), autocast=True, shapes=ONE),
    "momentum_none_dynamic": dict(kwargs=dict(fullgraph=True, dynamic=True), momentum=None, shapes=TWO + ONE),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_compile_first_call_fresh_process(case):
    """A fresh process, a fresh ``CMPESE`` with the default backend, ``torch.compile`` with the
    default (inductor) backend: the first call is the compiled one. Values (gradients once) and
    the running statistics match the eager reference module; the auto choice is still logged."""
    spec = COMPILE_CASES[case]
    code = _COMPILE_SCRIPT.format(momentum=spec.get("momentum", 0.1), kwargs=spec["kwargs"],
                                  autocast=spec.get("autocast", False), shapes=spec["shapes"],
                                  backward=spec.get("backward", False))
    res = _fresh_python(code)
    assert res.returncode == 0 and "FIRST CONTACT OK" in res.stdout, res.stdout[-3000:] + res.stderr[-6000:]
    assert "backend=auto chose" in res.stderr, res.stderr[-3000:]


def test_import_does_not_load_dynamo():
    """``import cmpe_se_fused`` and an eager first call stay as cheap as ``import torch``: they do not
    import ``torch._dynamo`` (1.8 s of CPU here; ``torch.compiler.assume_constant_result`` imports it,
    so dispatch sets the attribute that function sets). The marking must stay what the public
    function does, or the fullgraph compile tests above lose their log line or break."""
    import cmpe_se_fused.dispatch as dispatch

    def probe():
        return True

    assert torch.compiler.assume_constant_result(probe) is probe
    marks = {k: v for k, v in vars(probe).items()}
    assert marks == {"_dynamo_marked_constant": True}, marks
    assert all(getattr(dispatch._report_choice, k, None) == v for k, v in marks.items())
    res = _fresh_python("""
        import sys, torch
        from cmpe_se_fused import CMPESE
        m = CMPESE(16, mode="folded_3x3", fold_width=4, reduction=4)
        u = torch.randn(2, 16, 4, 4, requires_grad=True)
        m(u, torch.randn(2, 16, 4, 4)).sum().backward()
        print("DYNAMO", "torch._dynamo" in sys.modules)
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "DYNAMO False" in res.stdout, res.stdout


# ---------------------------------------------------------------------------------------------
# 3: the eager module (revert_model's output) runs what CMPESE runs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("module_dtype,input_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                      (torch.float32, torch.float64)])
def test_reverted_module_runs_every_dtype_cmpese_runs(mode, module_dtype, input_dtype):
    from cmpe_se_fused.convert import revert_model
    torch.manual_seed(1)
    fused = CMPESE(16, mode=mode, fold_width=4, reduction=4).to(module_dtype)
    eager = revert_model(fused)
    assert type(eager) is CMPESEReference
    u, x = torch.randn(4, 16, 3, 3, dtype=input_dtype), torch.randn(4, 16, 3, 3, dtype=input_dtype)
    for training in (True, False):
        fused.train(training), eager.train(training)
        y_fused, y_eager = fused(u, x), eager(u, x)
        assert y_eager.dtype == y_fused.dtype == input_dtype
        torch.testing.assert_close(y_eager, y_fused)
        for (k, a), (_, b) in zip(eager.state_dict().items(), fused.state_dict().items()):
            assert a.dtype == module_dtype or k.endswith("num_batches_tracked"), k
            torch.testing.assert_close(a, b, msg=k)
    # and it stays differentiable with respect to every parameter, in the parameters' dtype
    eager.train()
    eager(u.requires_grad_(), x).float().square().sum().backward()
    for name, p in eager.named_parameters():
        assert p.grad is not None and p.grad.dtype == module_dtype, name


# ---------------------------------------------------------------------------------------------
# 5: a call that raises does not count as a batch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_failed_call_leaves_num_batches_tracked(backend):
    m = CMPESE(32, mode="pair_2x1", bn_momentum=None, backend=backend)
    u = torch.randn(2, 32, 4, 4)
    bad = [(u, u.double()), (u, u[:, :, :3]), (u.long(), u.long()), (u, None)]  # dtype, shape, integer, missing
    for a, b in bad:
        with pytest.raises((TypeError, ValueError)):
            m(a, b)
    assert int(m.pair_bn.num_batches_tracked) == 0
    for key in ("running_mean", "running_var"):
        assert torch.equal(getattr(m.pair_bn, key), getattr(torch.nn.BatchNorm2d(m.pair_filters), key))
    m(u, u)
    assert int(m.pair_bn.num_batches_tracked) == 1


# ---------------------------------------------------------------------------------------------
# 6: running statistics that alias themselves or each other
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_functional_overlapping_running_stats_raise(backend):
    u, x = torch.randn(4, 32, 2, 2), torch.randn(4, 32, 2, 2)
    prm = make_params("pair_2x1", 32, pair_filters=3, dtype=torch.float32)
    base = torch.zeros(1)
    for key in ("running_mean", "running_var"):
        expanded = (base + (0 if key == "running_mean" else 1)).expand(3)
        with pytest.raises(ValueError, match=key):
            cmpe_se(u, x, **{**prm, key: expanded}, mode="pair_2x1", training=True, backend=backend)
    shared = torch.ones(3)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        cmpe_se(u, x, **{**prm, "running_mean": shared, "running_var": shared}, mode="pair_2x1", training=True,
                backend=backend)
    assert torch.equal(shared, torch.ones(3)) and torch.equal(base, torch.zeros(1))
    # evaluation only reads them: an expanded or shared buffer is fine there
    y = cmpe_se(u, x, **{**prm, "running_mean": base.expand(3), "running_var": shared}, mode="pair_2x1",
                training=False, backend=backend)
    y_ref = cmpe_se_reference(u, x, **{**prm, "running_mean": torch.zeros(3), "running_var": torch.ones(3)},
                              mode="pair_2x1", training=False)
    torch.testing.assert_close(y, y_ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_functional_strided_running_stats_updated_in_place(backend):
    """A non-contiguous (but not overlapping) buffer is fine: updated in place, as the reference does."""
    u, x = torch.randn(4, 32, 2, 2, dtype=torch.float64), torch.randn(4, 32, 2, 2, dtype=torch.float64)
    prm = make_params("pair_2x1", 32, pair_filters=3, dtype=torch.float64)
    store = torch.zeros(6, dtype=torch.float64)
    rv = prm["running_var"].clone()
    cmpe_se(u, x, **{**prm, "running_mean": store[::2], "running_var": rv}, mode="pair_2x1", training=True,
            backend=backend)
    want_m, want_v = torch.zeros(3, dtype=torch.float64), prm["running_var"].clone()
    cmpe_se_reference(u, x, **{**prm, "running_mean": want_m, "running_var": want_v}, mode="pair_2x1", training=True)
    assert not torch.equal(want_m, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(store[::2], want_m)
    torch.testing.assert_close(rv, want_v)
    assert torch.equal(store[1::2], torch.zeros(3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# 7: an empty batch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_like_reference(mode, training, backend):
    torch.manual_seed(2)
    ref = CMPESEReference(16, mode=mode, fold_width=4, reduction=4).train(training)
    fused = CMPESE(16, mode=mode, fold_width=4, reduction=4, backend=backend).train(training)
    fused.load_state_dict(ref.state_dict())
    u = torch.randn(0, 16, 3, 3, requires_grad=True)
    x = torch.randn(0, 16, 3, 3, requires_grad=True)
    y, y_ref = fused(u, x), ref(u, x)
    assert y.shape == y_ref.shape == u.shape and y.dtype == y_ref.dtype
    y.sum().backward()
    assert u.grad.shape == u.shape and x.grad.shape == x.shape
    for k, v in ref.state_dict().items():  # nn.BatchNorm2d counts the batch but leaves the statistics
        assert torch.equal(fused.state_dict()[k], v), k
    u_cl = torch.randn(0, 16, 3, 3).to(memory_format=torch.channels_last)
    assert fused(u_cl, u_cl).is_contiguous(memory_format=torch.channels_last)


def test_empty_batch_convert_model_keeps_behaviour():
    from cmpe_se_fused.convert import convert_model
    net = torch.nn.ModuleList([CMPESEReference(16, mode="folded_3x3", fold_width=4, reduction=4)]).eval()
    fast = convert_model(net)
    u = torch.randn(0, 16, 4, 4)
    assert fast[0](u, u).shape == net[0](u, u).shape == u.shape


def test_functional_empty_batch_leaves_running_stats():
    prm = make_params("folded_3x3", 16, fold_width=4, dtype=torch.float32)
    u = torch.randn(0, 16, 2, 2)
    for backend in CPU_BACKENDS:
        rm, rv = prm["running_mean"].clone(), prm["running_var"].clone()
        y = cmpe_se(u, u, **{**prm, "running_mean": rm, "running_var": rv}, mode="folded_3x3", training=True,
                    fold_width=4, backend=backend)
        assert y.shape == u.shape
        assert torch.equal(rm, prm["running_mean"]) and torch.equal(rv, prm["running_var"])
    y = cmpe_se_reference(u, u, **prm, mode="folded_3x3", training=True, fold_width=4)
    assert y.shape == u.shape


# ---------------------------------------------------------------------------------------------
# 8: README's functional signature is the code's
# ---------------------------------------------------------------------------------------------

def test_readme_functional_signature_is_the_code():
    text = (ROOT / "README.md").read_text()
    api = text.split("## API", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"\ncmpe_se\((.*?)\) -> Tensor", api, re.S)
    assert found, "README's API section must show cmpe_se's signature as `cmpe_se(...) -> Tensor`"
    namespace: dict = {}
    exec(f"def cmpe_se({found.group(1)}): pass", namespace)  # noqa: S102 - our own README
    documented = inspect.signature(namespace["cmpe_se"])
    actual = inspect.signature(cmpe_se)
    assert [(p.name, p.kind, p.default) for p in documented.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in actual.parameters.values()]


# ---------------------------------------------------------------------------------------------
# 9: hooks on a fused layer's children
# ---------------------------------------------------------------------------------------------

def test_child_hooks_do_not_fire_and_warn():
    from cmpe_se_fused.convert import convert_model
    ref = CMPESEReference(16, mode="pair_2x1", reduction=4)
    calls = []
    ref.pair_bn.register_forward_hook(lambda *a: calls.append("pair_bn"))
    u = torch.randn(2, 16, 3, 3)
    ref(u, u)
    assert calls == ["pair_bn"]
    fused = convert_model(ref)
    fused.register_forward_hook(lambda *a: calls.append("layer"))
    with pytest.warns(UserWarning, match="pair_bn"):
        fused(u, u)
    assert calls == ["pair_bn", "layer"]  # the layer's own hook fires; its children are never called
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused(u, u)  # once per layer
        CMPESE(16, mode="pair_2x1", reduction=4)(u, u)  # no hooks, no warning


def test_training_doc_tells_the_truth_about_hooks():
    doc = (ROOT / "docs" / "TRAINING.md").read_text()
    assert "Lead's hooks" not in doc
    assert "hooks on its children are" not in doc
    assert "children do not fire" in doc


# ---------------------------------------------------------------------------------------------
# 10: autocast leaves float64 alone, as PyTorch's autocast does
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_leaves_float64_alone(backend):
    torch.manual_seed(3)
    m = CMPESE(16, mode="folded_3x3", fold_width=4, reduction=4, backend=backend).double().eval()
    u, x = torch.randn(2, 16, 3, 3, dtype=torch.float64), torch.randn(2, 16, 3, 3, dtype=torch.float64)
    y = m(u, x)
    lin = torch.nn.Linear(3, 3).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac = m(u, x)
        assert lin(u).dtype == torch.float64  # PyTorch's own rule
    assert y_ac.dtype == torch.float64
    assert torch.equal(y_ac, y)
    # a float16 input still runs in the autocast dtype, as PyTorch's autocast casts every other float
    m.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(u.half(), x.half()).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# 11: errors and output that name their cause
# ---------------------------------------------------------------------------------------------

def test_functional_momentum_none_names_momentum():
    u = torch.randn(2, 16, 2, 2)
    prm = make_params("pair_2x1", 16, dtype=torch.float32)
    for bad in (None, "0.1", torch.tensor(0.1)):
        with pytest.raises(TypeError, match="momentum"):
            cmpe_se(u, u, **prm, mode="pair_2x1", training=True, momentum=bad)
    with pytest.raises(TypeError, match="eps"):
        cmpe_se(u, u, **prm, mode="pair_2x1", training=True, eps=None)


def test_integer_like_config_values():
    np = pytest.importorskip("numpy")
    a = CMPESE(np.int64(32), mode="folded_3x3", reduction=np.int64(8), pair_filters=np.int32(3),
               fold_width=np.int64(8), padding=np.int64(1))
    b = CMPESE(32, mode="folded_3x3", reduction=8, pair_filters=3, fold_width=8, padding=1)
    assert repr(a) == repr(b)
    sizes = ("channels", "reduction", "pair_filters", "fold_width", "padding")
    assert [type(getattr(a, k)) for k in sizes] == [int] * 5
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    u = torch.randn(2, 32, 2, 2)
    prm = make_params("folded_3x3", 32, fold_width=8, padding=1, dtype=torch.float32)
    cmpe_se(u, u, **prm, mode="folded_3x3", training=False, fold_width=np.int64(8), padding=np.int64(1))
    for bad in (32.0, "32"):
        with pytest.raises(ValueError, match="channels"):
            CMPESE(bad)


def test_backend_env_var_named_in_errors(monkeypatch):
    u = torch.randn(2, 16, 2, 2)
    m = CMPESE(16, mode="se", reduction=4)
    monkeypatch.setenv("CMPE_SE_BACKEND", "cuda")  # a real backend that cannot run CPU tensors
    with pytest.raises(RuntimeError, match="CMPE_SE_BACKEND=cuda"):
        m(u, u)
    monkeypatch.setenv("CMPE_SE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="CMPE_SE_BACKEND='bogus'"):
        m(u, u)


def test_info_flags_invalid_backend_env(monkeypatch, capsys):
    from cmpe_se_fused import info
    monkeypatch.setenv("CMPE_SE_BACKEND", "bogus")
    info.main([])
    line = next(s for s in capsys.readouterr().out.splitlines() if "CMPE_SE_BACKEND" in s)
    assert "invalid" in line and "auto" in line and "reference" in line, line
    monkeypatch.setenv("CMPE_SE_BACKEND", "reference")
    info.main([])
    line = next(s for s in capsys.readouterr().out.splitlines() if "CMPE_SE_BACKEND" in s)
    assert "invalid" not in line, line


@pytest.mark.skipif(not HAS_CPU, reason="needs the compiled CPU backend")
def test_torch_func_transforms_say_what_works():
    torch.manual_seed(4)
    m = CMPESE(16, mode="se", reduction=4).eval()  # backend auto: the compiled cpu backend here
    u, x = torch.randn(2, 16, 3, 3), torch.randn(2, 16, 3, 3)

    def loss(uu):
        return m(uu, x).square().sum()

    for transform in (torch.func.grad(loss), lambda uu: torch.func.vmap(lambda v: m(v[None], x[:1]))(uu)):
        with pytest.raises(RuntimeError, match="backend='reference'"):
            transform(u)
    # what the message recommends works: the reference backend under torch.func, autograd otherwise
    ref = CMPESE(16, mode="se", reduction=4, backend="reference").eval()
    ref.load_state_dict(m.state_dict())
    g_func = torch.func.grad(lambda uu: ref(uu, x).square().sum())(u)
    uu = u.clone().requires_grad_()
    g_autograd, = torch.autograd.grad(loss(uu), uu)
    torch.testing.assert_close(g_func, g_autograd)
