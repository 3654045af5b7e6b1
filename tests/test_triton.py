"""Triton backend (``cmpe_se_fused.triton.streaming``) against the op-contract reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (small shapes; fp32, fp16
and fp64; the interpreter has no bf16). Triton decides at decoration time whether a kernel is
interpreted, and its own language functions at its first import: conftest imports triton first,
with ``TRITON_INTERPRET=1``; this module sets the variable before importing the kernels and only
while its own tests run; if something imported triton before conftest, the tests re-run in a
subprocess (``test_interpreter_subprocess``). GPU tests (real shapes, bf16) carry the ``cuda``
marker.

Tolerance rule (conftest): error against the float64 reference at most ``TOL_MULTIPLE`` times the
eager reference's own error in the same dtype, plus a tiny floor.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import conftest
import pytest
import torch

_CPU_ONLY = not torch.cuda.is_available()
_ENV_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton's own language functions are interpreted only if TRITON_INTERPRET=1 was set before triton
# was first imported (conftest does that first). If something imported it before conftest, run this
# file in a subprocess.
_IN_PROCESS = not _CPU_ONLY or _ENV_INTERPRET or "triton" not in sys.modules or conftest.TRITON_INTERPRETER_FIRST
if _CPU_ONLY and _IN_PROCESS and not _ENV_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    import cmpe_se_fused.triton.streaming as tk
    if _CPU_ONLY and _IN_PROCESS and not tk.INTERPRETED:  # imported earlier with compiled kernels
        importlib.reload(sys.modules["cmpe_se_fused.triton.small"])
        tk = importlib.reload(tk)
finally:
    if _CPU_ONLY and not _ENV_INTERPRET:
        os.environ.pop("TRITON_INTERPRET", None)

from conftest import assert_close_rule, make_params

from cmpe_se_fused.reference import MODES, backward_op_reference, forward_op_reference

ok, why = tk.is_available()
if not _IN_PROCESS:
    ok, why = False, "triton was imported without TRITON_INTERPRET=1 (see test_interpreter_subprocess)"


@pytest.fixture(autouse=True)
def _needs_backend(request):
    if not ok and request.node.originalname not in ("test_interpreter_subprocess", "test_compiles_for_sm90",
                                                    "test_interpreter_cases_run_in_this_process"):
        pytest.skip(f"triton backend unavailable: {why}")


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env():
    """The interpreter reads TRITON_INTERPRET at run time too; set it only while this module runs."""
    if not (_CPU_ONLY and _IN_PROCESS) or _ENV_INTERPRET:
        yield
        return
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    os.environ.pop("TRITON_INTERPRET", None)


@pytest.mark.skipif(not _CPU_ONLY or _ENV_INTERPRET, reason="needs a CPU-only run without TRITON_INTERPRET set")
def test_interpreter_cases_run_in_this_process():
    """Which module imports triton first must not decide how the cases run: conftest imports it
    first, for the interpreter. (With torchvision installed, a test module's torchvision import
    used to come first: every case below was reported as skipped and ran in one subprocess.)"""
    pytest.importorskip("triton")
    if conftest.TRITON_IMPORTED_BEFORE_CONFTEST:
        pytest.skip("triton was imported before conftest (a plugin?): the cases run in a subprocess")
    assert conftest.TRITON_INTERPRETER_FIRST
    assert _IN_PROCESS and ok and tk.INTERPRETED, why


@pytest.mark.skipif(_IN_PROCESS, reason="the interpreter tests run in this process")
def test_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
                          __file__],
                         env=env, capture_output=True, text=True, check=False, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


DEV = "cpu" if _CPU_ONLY else "cuda"
WEIGHTS = ("fc1_weight", "fc1_identity_weight", "fc2_weight", "pair_weight", "bn_weight", "bn_bias")
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class Case:
    """Inputs of one op call: activations in ``dtype``, weights in its acc dtype, fp64 copies."""

    def __init__(self, mode, shape, dtype, *, training, fold_width=8, padding=0, channels_last=False,
                 pair_filters=3, reduction=4, seed=0, device=DEV, sliced=False, momentum=0.1, eps=1e-5):
        n, c, h, w = shape
        self.momentum, self.eps = momentum, eps
        g = torch.Generator().manual_seed(seed + 1)
        rnd = lambda: torch.randn(n, c, h, w + (1 if sliced else 0), generator=g, dtype=torch.float64)
        u, x, dy = (t.to(device=device, dtype=dtype) for t in (rnd() + 0.5, rnd(), rnd()))
        if channels_last:
            u, x = u.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        if sliced:  # non-dense strides: every spatial row skips one element
            u, x, dy = u[..., 1:], x[..., 1:], dy[..., :-1]
        self.u, self.x, self.dy = u, x, dy
        self.mode, self.training, self.dtype = mode, training, dtype
        self.fold_width, self.padding = fold_width, padding
        p = make_params(mode, c, reduction=reduction, pair_filters=pair_filters, fold_width=fold_width,
                        padding=padding, dtype=torch.float64, device=device, seed=seed)
        self.p64 = {k: p.get(k) for k in WEIGHTS}
        self.p = {k: (None if v is None else v.to(_acc(dtype))) for k, v in self.p64.items()}
        e0 = torch.zeros(0, device=device)
        self.rm, self.rv = p.get("running_mean", e0).float(), p.get("running_var", e0).float()

    def weights(self, p):
        return [p[k] for k in WEIGHTS]

    def forward_args(self, u, x, p, rm, rv):
        return (u, x, *self.weights(p), rm, rv, self.mode, self.training, self.momentum, self.eps, self.fold_width,
                self.padding)

    def backward_args(self, dy, u, saved, p):
        return (dy, u, *saved, *self.weights(p), self.mode, self.training, self.fold_width, self.padding)


def _check(case, fwd_kw=None, bwd_kw=None):
    """Forward outputs, running stats and backward outputs of the Triton op vs the references."""
    fwd_kw, bwd_kw = fwd_kw or {}, bwd_kw or {}
    c, dt = case, case.dtype
    rm_t, rv_t, rm_e, rv_e = c.rm.clone(), c.rv.clone(), c.rm.clone(), c.rv.clone()
    rm_64, rv_64 = c.rm.double(), c.rv.double()
    out = tk.forward(*c.forward_args(c.u, c.x, c.p, rm_t, rv_t), **fwd_kw)
    eager = forward_op_reference(*c.forward_args(c.u, c.x, c.p, rm_e, rv_e))
    ref = forward_op_reference(*c.forward_args(c.u.double(), c.x.double(), c.p64, rm_64, rv_64))
    names = ("y", "pool_u", "pool_x", "gate", "hidden", "bn_mean", "bn_invstd")
    assert out[0].dtype == dt and out[0].stride() == torch.empty_like(c.u).stride()
    for name, o, e, r in zip(names, out, eager, ref):
        assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        assert o.dtype == (dt if name == "y" else _acc(dt)), f"{name}: dtype {o.dtype}"
        if r.numel():
            assert_close_rule(o, r, e, name=name, atol_floor=FLOOR[dt])
    for name, o, e, r in (("running_mean", rm_t, rm_e, rm_64), ("running_var", rv_t, rv_e, rv_64)):
        if r.numel():
            assert_close_rule(o, r, e, name=name, atol_floor=FLOOR[torch.float32])
    # backward from the same saved tensors (the eager ones), so only the backward is compared
    saved = eager[1:]
    grads = tk.backward(*c.backward_args(c.dy, c.u, saved, c.p), **bwd_kw)
    geager = backward_op_reference(*c.backward_args(c.dy, c.u, saved, c.p))
    gref = backward_op_reference(*c.backward_args(c.dy.double(), c.u.double(), [t.double() for t in saved], c.p64))
    gnames = ("grad_u", "grad_x", "grad_fc1", "grad_fc1_identity", "grad_fc2", "grad_pair", "grad_bn_w", "grad_bn_b")
    for name, o, e, r in zip(gnames, grads, geager, gref):
        assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        if name in ("grad_u", "grad_x"):
            assert o.dtype == dt and o.stride() == torch.empty_like(c.u).stride(), name
        if r.numel():
            assert_close_rule(o, r, e, name=name, atol_floor=FLOOR[dt])
    # a comparison of zeros proves nothing: live hidden units in every sample, non-zero gradients
    assert (ref[4] > 0).any(dim=1).all(), "degenerate case: a sample has an all-zero hidden layer (pick another seed)"
    for name, r in zip(gnames, gref):
        if r.numel():
            assert r.abs().max() > 0, f"degenerate case: {name} is all zero (pick another seed)"
    return out, grads


# ------------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: small shapes
# ------------------------------------------------------------------------------------------------

# Every mode in training and evaluation in fp32, fp16 and fp64 (their own loads, stores and
# accumulator type): all 30 of mode x training x dtype, in the interpreter as on a GPU.
MATCH_CASES = [(m, t, dt) for dt in (torch.float32, torch.float16, torch.float64) for m in MODES for t in (True, False)]
_DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.float64: "fp64"}


@pytest.mark.parametrize("mode,training,dtype", MATCH_CASES,
                         ids=[f"{m}-{'train' if t else 'eval'}-{_DT_ID[d]}" for m, t, d in MATCH_CASES])
def test_matches_reference(mode, training, dtype):
    _check(Case(mode, (3, 32, 3, 3), dtype, training=training))


VARIANTS = {  # name: (Case keywords, tuning keywords)
    "channels_last": ({"shape": (3, 32, 3, 3), "channels_last": True}, {}),
    "split_launch": ({"shape": (3, 32, 3, 3)}, {"single_launch": False, "chunks": 2, "block_c": 8}),
    "odd_c24_pad1_1x1": ({"shape": (2, 24, 1, 1), "padding": 1}, {}),
    "batch1_7x7": ({"shape": (1, 16, 7, 7)}, {"block_p": 16}),
    "sliced_strides": ({"shape": (2, 16, 3, 4), "sliced": True}, {}),
    "tiny_c1": ({"shape": (1, 1, 1, 1)}, {}),
    "channels_last_split": ({"shape": (2, 16, 2, 3), "channels_last": True},
                            {"single_launch": False, "chunks": 3, "block_c": 4, "block_p": 2}),
    # masked tails of the streaming tiles: C = 20 over tiles of 8 channels, P = 9 over tiles of 4
    # pixels; the fold 10 x 4 padded by 1
    "tails_pad1": ({"shape": (2, 20, 3, 3), "fold_width": 4, "padding": 1}, {"block_c": 8, "block_p": 4}),
    "tails_cl_split": ({"shape": (2, 20, 3, 3), "fold_width": 4, "channels_last": True},
                       {"single_launch": False, "chunks": 2, "block_c": 8, "block_p": 4}),
}
VARIANT_CASES = [  # (mode, training, variant): every variant in both modes of BN, the fold in all
    ("folded_3x3", True, "channels_last"), ("double_fc", False, "channels_last"),
    ("folded_3x3", True, "split_launch"), ("pair_2x1", False, "split_launch"), ("se", True, "split_launch"),
    ("folded_3x3", True, "odd_c24_pad1_1x1"), ("folded_3x3", False, "odd_c24_pad1_1x1"),
    ("pair_1x1", True, "odd_c24_pad1_1x1"),
    ("folded_3x3", False, "batch1_7x7"), ("pair_2x1", True, "batch1_7x7"), ("double_fc", True, "batch1_7x7"),
    ("folded_3x3", True, "sliced_strides"), ("se", False, "sliced_strides"),
    ("pair_2x1", False, "tiny_c1"), ("double_fc", True, "tiny_c1"),
    ("pair_2x1", True, "channels_last_split"), ("folded_3x3", False, "channels_last_split"),
    ("folded_3x3", True, "tails_pad1"), ("folded_3x3", False, "tails_pad1"), ("se", True, "tails_cl_split"),
    ("pair_1x1", True, "tails_cl_split"),
]


# seed 0 leaves a sample with every hidden unit dead (all excitation gradients 0) in these
VARIANT_SEEDS = {("double_fc", "batch1_7x7"): 1, ("se", "sliced_strides"): 1, ("pair_2x1", "tiny_c1"): 2}


@pytest.mark.parametrize("mode,training,variant", VARIANT_CASES,
                         ids=[f"{m}-{'train' if t else 'eval'}-{v}" for m, t, v in VARIANT_CASES])
def test_variants(mode, training, variant):
    kw, tune = VARIANTS[variant]
    kw = dict(kw)
    shape = kw.pop("shape")
    case = Case(mode, shape, torch.float32, training=training, seed=VARIANT_SEEDS.get((mode, variant), 0), **kw)
    bwd_tune = {k: v for k, v in tune.items() if k != "single_launch"}
    _check(case, tune, bwd_tune)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_sweep_configs_run(channels_last):
    """Every variant the GPU benchmark sweeps gives the reference's answer."""
    case = Case("pair_2x1", (2, 16, 2, 3), torch.float32, training=True, channels_last=channels_last)
    for _name, fwd, bwd in tk.sweep_configs(case.u):
        if tk.INTERPRETED and "num_warps" in fwd:  # a launch option only: the interpreter ignores it
            continue
        _check(case, fwd, bwd)


def test_pair_1x1_batch1_eval_and_mixed_layouts():
    case = Case("pair_1x1", (1, 16, 2, 2), torch.float32, training=False)
    case.x = case.x.to(memory_format=torch.channels_last)  # X's layout differs from U's
    case.dy = case.dy.transpose(2, 3).contiguous().transpose(2, 3)  # grad_y in yet another layout
    _check(case)


def test_deterministic():
    if tk.INTERPRETED:  # (on the GPU: this test and test_cuda_deterministic_and_gradcheck)
        pytest.skip("the interpreter runs the programs of a launch one after another: deterministic by construction")
    case = Case("folded_3x3", (3, 32, 3, 3), torch.float32, training=True)
    runs = []
    for _ in range(2):
        rm, rv = case.rm.clone(), case.rv.clone()
        out = tk.forward(*case.forward_args(case.u, case.x, case.p, rm, rv))
        grads = tk.backward(*case.backward_args(case.dy, case.u, out[1:], case.p))
        runs.append((*out, rm, rv, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_training_needs_two_values():
    case = Case("pair_2x1", (1, 1, 2, 2), torch.float32, training=True, reduction=1, pair_filters=1)
    with pytest.raises(ValueError, match="more than 1 value"):
        tk.forward(*case.forward_args(case.u, case.x, case.p, case.rm.clone(), case.rv.clone()))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", ["pair_2x1", "folded_3x3"])
def test_eps_and_momentum(mode, training):
    """eps and momentum are the arguments (not 1e-5 and 0.1): BN statistics, running statistics."""
    _check(Case(mode, (3, 16, 2, 3), torch.float32, training=training, momentum=0.35, eps=0.3, seed=2))


class _TritonLayer(torch.autograd.Function):
    """The two Triton host functions as one differentiable layer (for gradcheck)."""

    @staticmethod
    def forward(ctx, u, x, w1, w1i, w2, pw, gamma, beta, rm, rv, mode, training, fold_width, padding):
        out = tk.forward(u, x, w1, w1i, w2, pw, gamma, beta, rm, rv, mode, training, 0.1, 1e-5, fold_width, padding)
        ctx.saved = (u, *out[1:], w1, w1i, w2, pw, gamma, beta)
        ctx.args = (mode, training, fold_width, padding)
        return out[0]

    @staticmethod
    def backward(ctx, grad_y):
        grads = tk.backward(grad_y, *ctx.saved, *ctx.args)
        gu, gx, g1, g1i, g2, gpw, gg, gb = (None if t.numel() == 0 else t for t in grads)
        return gu, gx, g1, g1i, g2, gpw, gg, gb, None, None, None, None, None, None


# Every kind of backward: no BN, the identity fc, training BN through the pair views and the fold,
# evaluation BN through the 1x1 view and the fold (the same six in the interpreter and on a GPU).
GRADCHECK_CASES = [("se", True), ("double_fc", False), ("pair_2x1", True), ("pair_1x1", False), ("folded_3x3", True),
                   ("folded_3x3", False)]


@pytest.mark.parametrize("mode,training", GRADCHECK_CASES,
                         ids=[f"{m}-{'train' if t else 'eval'}" for m, t in GRADCHECK_CASES])
def test_gradcheck_fp64(mode, training):
    case = Case(mode, (2, 8, 1, 2), torch.float64, training=training, fold_width=4, reduction=2, pair_filters=2)
    _gradcheck(case, 4)


def _gradcheck(case, fold_width):
    """fp64 gradcheck (fast mode) of the whole layer. All differentiable inputs are packed into one
    vector, so one random direction probes every input at once (the interpreter is slow)."""
    inputs = [t for t in (case.u, case.x, *case.weights(case.p))]
    present = [t for t in inputs if t is not None]
    flat = torch.cat([t.detach().reshape(-1) for t in present]).requires_grad_(True)

    def fn(vec):
        parts, off = [], 0
        for t in inputs:
            if t is None:
                parts.append(None)
                continue
            parts.append(vec[off:off + t.numel()].view(t.shape))
            off += t.numel()
        return _TritonLayer.apply(*parts, case.rm.clone(), case.rv.clone(), case.mode, case.training,
                                  fold_width, case.padding)

    assert torch.autograd.gradcheck(fn, (flat,), fast_mode=True, atol=1e-7, rtol=1e-5)


# The fake kernels depend on which weights are present (fc1_identity: double_fc; pair and BN: the pair
# modes); the real kernels mutate the running statistics in training pair modes only. Every mode x
# training/evaluation, in the interpreter as on a GPU.
OPCHECK_CASES = [(m, t) for m in MODES for t in (True, False)]


@pytest.mark.parametrize("mode,training", OPCHECK_CASES,
                         ids=[f"{m}-{'train' if t else 'eval'}" for m, t in OPCHECK_CASES])
def test_opcheck(mode, training):
    """The registered ``cmpe_se::triton_forward/backward`` (schema, aliasing, fake kernels)."""
    ops = pytest.importorskip("cmpe_se_fused.ops")
    if "triton" not in getattr(ops, "OPS", {}):
        pytest.skip("cmpe_se_fused.ops has no triton ops registered")
    case = Case(mode, (2, 16, 2, 2), torch.float32, training=training)
    args = case.forward_args(case.u, case.x, case.p, case.rm.clone(), case.rv.clone())
    torch.library.opcheck(torch.ops.cmpe_se.triton_forward.default, args)
    out = torch.ops.cmpe_se.triton_forward(*case.forward_args(case.u, case.x, case.p, case.rm.clone(),
                                                             case.rv.clone()))
    torch.library.opcheck(torch.ops.cmpe_se.triton_backward.default,
                          case.backward_args(case.dy, case.u, out[1:], case.p))


def test_functional_backend():
    functional = pytest.importorskip("cmpe_se_fused.functional")
    case = Case("folded_3x3", (2, 16, 2, 2), torch.float32, training=True)
    outs = []
    for backend in ("triton", "reference"):
        u = case.u.detach().clone().requires_grad_(True)
        p = {k: (None if v is None else v.detach().clone().requires_grad_(True)) for k, v in case.p.items()}
        rm, rv = case.rm.clone(), case.rv.clone()
        y = functional.cmpe_se(u, case.x, running_mean=rm, running_var=rv, mode="folded_3x3", training=True,
                               fold_width=8, backend=backend, **p)
        y.backward(case.dy)
        grads = [u.grad] + [p[k].grad for k in WEIGHTS if p[k] is not None]
        outs.append((y.detach(), *grads, rm, rv))
    for a, b in zip(*outs):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# CPU: compile every kernel for sm_90 (no GPU needed; catches what the interpreter accepts but the
# compiler does not, e.g. type mismatches between branches)
# ------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import sys
import torch
try:
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class _Sm90:  # a driver that only answers what compilation asks
        def get_current_device(self): return 0
        def get_current_stream(self, device=None): return 0
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_active_torch_device(self): return torch.device("cpu")
        def is_active(self): return True

    driver.set_active(_Sm90())
    JITFunction.__getitem__ = lambda self, grid: (lambda *a, **k: self.run(*a, grid=grid, warmup=True, **k))
except Exception as exc:
    print("SETUP", repr(exc))
    sys.exit(3)
sys.path.insert(0, sys.argv[1])
from conftest import make_params
from cmpe_se_fused.triton import streaming as tk
from cmpe_se_fused.reference import MODES
NAMES = ("fc1_weight", "fc1_identity_weight", "fc2_weight", "pair_weight", "bn_weight", "bn_bias")
configs = [(m, t, torch.float32, (8, 64, 4, 4), False, True) for m in MODES for t in (True, False)]
configs += [("folded_3x3", True, torch.bfloat16, (8, 64, 4, 4), True, False), ("se", False, torch.float16, (8, 64, 7, 7),
            True, False), ("double_fc", True, torch.float64, (2, 32, 1, 3), False, False),
            ("pair_2x1", False, torch.float32, (1, 1, 1, 1), False, True)]
for mode, training, dtype, shape, cl, single in configs:
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u = torch.randn(shape).to(dtype)
    if cl:
        u = u.to(memory_format=torch.channels_last)
    p = make_params(mode, shape[1], reduction=4, pair_filters=3, fold_width=16, dtype=acc)
    w = [p.get(k) for k in NAMES]
    rm, rv = p.get("running_mean", torch.zeros(0)).float(), p.get("running_var", torch.zeros(0)).float()
    out = tk._forward(u, u, *w, rm, rv, mode, training, 0.1, 1e-5, 16, 0, single, None if single else 2,
                      None, None, None, 4)
    tk._backward(u, u, *out[1:], *w, mode, training, 16, 0, None if single else 2, None, None, None, 4)
print("OK")
"""


@pytest.mark.slow
@pytest.mark.skipif(not _CPU_ONLY, reason="on a GPU the other tests compile every kernel")
def test_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, check=False, cwd=os.path.dirname(os.path.dirname(__file__)))
    if res.returncode == 3:
        pytest.skip(f"cannot fake an sm_90 target with this triton: {res.stdout.strip()}")
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-3000:] + res.stderr[-6000:]


# ------------------------------------------------------------------------------------------------
# GPU: real shapes, bf16, tuning sweep
# ------------------------------------------------------------------------------------------------

GPU_SHAPES = {  # (shape, fold_width, pair_filters, reduction): paper configurations
    "resnet164_s3": ((64, 256, 8, 8), 16, 4, 16),
    "wrn_s3": ((16, 640, 8, 8), 64, 40, 16),
    "cifar_s1": ((32, 64, 32, 32), 16, 1, 16),
}
# (shape, dtype, channels_last) per mode and training flag; each combination compiles its kernels
GPU_CASES = [("resnet164_s3", torch.float32, False), ("wrn_s3", torch.bfloat16, True)]
GPU_EXTRA = [("folded_3x3", True, "cifar_s1", torch.float16, False), ("se", False, "cifar_s1", torch.float16, True),
             ("pair_1x1", True, "cifar_s1", torch.bfloat16, False)]
GPU_ALL = [(m, t, *c) for m in MODES for t in (True, False) for c in GPU_CASES] + GPU_EXTRA


@pytest.mark.cuda
@pytest.mark.parametrize("mode,training,shape,dtype,channels_last", GPU_ALL,
                         ids=[f"{m}-{'train' if t else 'eval'}-{s}-{str(d)[6:]}-{'cl' if c else 'nchw'}"
                              for m, t, s, d, c in GPU_ALL])
def test_cuda_real_shapes(mode, training, shape, dtype, channels_last):
    sh, fold, e, t = GPU_SHAPES[shape]
    _check(Case(mode, sh, dtype, training=training, fold_width=fold, pair_filters=e, reduction=t,
                channels_last=channels_last, device="cuda"))


TUNES = {"single": {"single_launch": True}, "chunks4": {"single_launch": False, "chunks": 4},
         "chunks16_w8": {"single_launch": False, "chunks": 16, "block_c": 8, "block_p": 64, "num_warps": 8}}
# the one-launch forward (and fused backward, chunks == 1) in every mode; the sweep knobs in two
TUNE_CASES = ([(m, t, "single") for m in MODES for t in (True, False)]
              + [(m, False, k) for m in ("se", "folded_3x3") for k in ("chunks4", "chunks16_w8")])


@pytest.mark.cuda
@pytest.mark.parametrize("mode,training,tune", TUNE_CASES,
                         ids=[f"{m}-{'train' if t else 'eval'}-{k}" for m, t, k in TUNE_CASES])
def test_cuda_tuning_variants(mode, training, tune):
    tune = TUNES[tune]
    case = Case(mode, (8, 256, 14, 14), torch.float32, training=training, fold_width=16, pair_filters=4,
                reduction=16, device="cuda")
    bwd = {k: v for k, v in tune.items() if k != "single_launch"}
    if tune.get("single_launch"):
        bwd["chunks"] = 1  # the fused backward (grad-gate kernel runs the MLP backward too)
    _check(case, tune, bwd)


@pytest.mark.cuda
def test_cuda_deterministic_and_gradcheck():
    case = Case("folded_3x3", (64, 256, 8, 8), torch.bfloat16, training=True, fold_width=16, pair_filters=4,
                reduction=16, channels_last=True, device="cuda")
    runs = []
    for _ in range(2):
        rm, rv = case.rm.clone(), case.rv.clone()
        out = tk.forward(*case.forward_args(case.u, case.x, case.p, rm, rv), single_launch=False)
        grads = tk.backward(*case.backward_args(case.dy, case.u, out[1:], case.p))
        runs.append((*out, rm, rv, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    _gradcheck(Case("folded_3x3", (2, 16, 1, 2), torch.float64, training=True, device="cuda"), 8)
