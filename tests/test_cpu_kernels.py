"""The fused CPU kernels (``cmpe_se_fused._C``) against the op contracts of ``reference.py``.

Calls ``torch.ops.cmpe_se.forward`` / ``backward`` directly and checks every output, the running
statistics and every gradient with the tolerance rule of ``conftest.py``: the kernel's error against a
float64 evaluation of ``forward_op_reference`` / ``backward_op_reference`` must stay within a small
multiple of the error the same reference makes in the kernel's dtype.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_close_rule, make_params

from cmpe_se_fused.reference import PAIR_MODES, acc_dtype, backward_op_reference, forward_op_reference

try:
    import cmpe_se_fused._C  # noqa: F401  (registers torch.ops.cmpe_se.forward / backward on CPU)

    HAS_C, WHY = True, ""
except Exception as exc:  # noqa: BLE001 - ImportError, OSError, undefined symbols ...
    HAS_C, WHY = False, f"cmpe_se_fused._C is not importable ({type(exc).__name__}: {exc})"

pytestmark = pytest.mark.skipif(not HAS_C, reason=WHY)

MODES = ("se", "double_fc", "pair_2x1", "pair_1x1", "folded_3x3")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
MOMENTUM, EPS = 0.1, 1e-5


def make_args(mode, dtype, training, *, shape=(4, 24, 5, 7), channels_last=False, fold_width=8, padding=0, seed=0,
              stat_dtype=torch.float32, reduction=4, momentum=MOMENTUM, eps=EPS):
    """Op arguments in the kernel's dtype: activations in ``dtype``, weights in its acc dtype."""
    _n, c, _h, _w = shape
    acc = acc_dtype(dtype)
    p = make_params(mode, c, reduction=reduction, fold_width=fold_width, padding=padding, dtype=acc, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    if channels_last:
        u, x = u.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    empty = torch.zeros(0, dtype=stat_dtype)
    rm = p["running_mean"].to(stat_dtype) if mode in PAIR_MODES else empty
    rv = p["running_var"].to(stat_dtype) if mode in PAIR_MODES else empty.clone()
    return [u, x, p["fc1_weight"], p.get("fc1_identity_weight"), p["fc2_weight"], p.get("pair_weight"),
            p.get("bn_weight"), p.get("bn_bias"), rm, rv, mode, training, momentum, eps, fold_width, padding]


def to64(args):
    """The same arguments in float64 (fresh running statistics: the op updates them in place)."""
    return [a.to(torch.float64) if isinstance(a, torch.Tensor) else a for a in args]


def fresh(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def backward_args(grad_y, fwd_args, saved):
    """backward's arguments from forward's arguments and its saved outputs."""
    u, _, fc1, fc1_id, fc2, pw, bw, bb = fwd_args[:8]
    mode, training, fold_width, padding = fwd_args[10], fwd_args[11], fwd_args[14], fwd_args[15]
    return [grad_y, u, *saved[1:7], fc1, fc1_id, fc2, pw, bw, bb, mode, training, fold_width, padding]


FWD_NAMES = ("y", "pool_u", "pool_x", "gate", "hidden", "bn_mean", "bn_invstd")
BWD_NAMES = ("grad_u", "grad_x", "grad_fc1_weight", "grad_fc1_identity_weight", "grad_fc2_weight",
             "grad_pair_weight", "grad_bn_weight", "grad_bn_bias")


def check_all(mode, dtype, training, **kw):
    """Forward + backward of the kernel vs the reference in float64 and in ``dtype``."""
    args = make_args(mode, dtype, training, **kw)
    floor = 1e-12 if dtype == torch.float64 else 1e-6
    a64, a_eager, a_mine = to64(args), fresh(args), fresh(args)
    ref = forward_op_reference(*a64)
    eager = forward_op_reference(*a_eager)
    mine = torch.ops.cmpe_se.forward(*a_mine)
    for name, o, r, e in zip(FWD_NAMES, mine, ref, eager):
        assert o.shape == e.shape and o.dtype == e.dtype, f"{name}: {o.shape}/{o.dtype} vs {e.shape}/{e.dtype}"
        assert_close_rule(o, r, e, name=f"forward {name}", atol_floor=floor)
    assert mine[0].stride() == torch.empty_like(args[0]).stride(), "y must follow u's memory format"
    for i, name in ((8, "running_mean"), (9, "running_var")):
        if a_mine[i].numel():
            assert_close_rule(a_mine[i], a64[i], a_eager[i], name=name, atol_floor=floor)

    g = torch.Generator().manual_seed(7)
    gy = torch.randn(args[0].shape, generator=g, dtype=torch.float64).to(dtype)
    gy = gy.contiguous(memory_format=torch.channels_last) if kw.get("channels_last") else gy
    ref_b = backward_op_reference(*backward_args(gy.double(), a64, ref))
    eager_b = backward_op_reference(*backward_args(gy, args, eager))
    mine_b = torch.ops.cmpe_se.backward(*backward_args(gy, args, mine))
    for name, o, r, e in zip(BWD_NAMES, mine_b, ref_b, eager_b):
        assert o.shape == e.shape and o.dtype == e.dtype, f"{name}: {o.shape}/{o.dtype} vs {e.shape}/{e.dtype}"
        if o.numel():
            assert_close_rule(o, r, e, name=f"backward {name}", atol_floor=floor)
    assert mine_b[0].stride() == mine_b[1].stride() == torch.empty_like(args[0]).stride()
    assert_not_degenerate(ref, ref_b)


def assert_not_degenerate(ref, ref_b):
    """A comparison of zeros proves nothing: every sample must have a live hidden unit and every
    gradient under comparison a non-zero entry (a dead ReLU layer zeroes all excitation gradients)."""
    hidden = ref[4]
    assert (hidden > 0).any(dim=1).all(), "degenerate case: a sample has an all-zero hidden layer (pick another seed)"
    for name, r in zip(BWD_NAMES, ref_b):
        if r.numel():
            assert r.abs().max() > 0, f"degenerate case: {name} is all zero (pick another seed)"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(mode, training, dtype, channels_last):
    check_all(mode, dtype, training, channels_last=channels_last)


ODD_SHAPES = {
    "hw1": {"shape": (3, 24, 1, 1)},
    "n1": {"shape": (1, 24, 4, 4)},
    "7x7": {"shape": (2, 24, 7, 7)},
    "c20_tail": {"shape": (3, 20, 3, 5), "fold_width": 4},
    "c40_wide": {"shape": (2, 40, 6, 6), "fold_width": 10},
    # seeds: the first with a live hidden unit in every sample, in every mode (see assert_not_degenerate)
    "pad1": {"shape": (2, 24, 5, 3), "padding": 1, "seed": 2},
    "pad1_thin": {"shape": (2, 8, 3, 3), "fold_width": 8, "padding": 1, "seed": 16},
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", sorted(ODD_SHAPES))
@pytest.mark.parametrize("mode", MODES)
def test_odd_shapes(mode, case, channels_last):
    kw = dict(ODD_SHAPES[case])
    combos = ((True, torch.bfloat16), (False, torch.float32)) if channels_last else \
        ((True, torch.float32), (False, torch.bfloat16))
    for training, dtype in combos:
        check_all(mode, dtype, training, channels_last=channels_last, **kw)


# Shapes that reach every loop of the kernels (csrc/cpu/stream_impl.h, small_impl.h). Vector width L:
# 8 (fp32, bf16, fp16) or 4 (fp64) elements; NCHW rows of P pixels: blocks of 4 vectors, single
# vectors, scalar tail; channels_last rows of C channels: chunks of 8 vectors, single vectors,
# scalar tail, in row blocks of 32 pixels; the pair-view map rows (width Wo) and the fc layers: same
# vector / tail split. Per case: what it reaches in fp32 / fp64.
BRANCH_SHAPES = {
    # C, P below L: scalar tails only; map 2x1
    "c6_p3": {"shape": (3, 6, 1, 3), "fold_width": 3, "reduction": 2, "seed": 7},
    # C = P = L (fp32): one vector, no tail; fp64: two vectors; map 2x2
    "c8_p8": {"shape": (2, 8, 2, 4), "fold_width": 4, "reduction": 2, "seed": 1},
    # C = 12: fp32 one vector + tail 4; P = 21: fp32 2 vectors + tail 5, fp64 one block of 4 + 1 + tail 1
    "c12_p21": {"shape": (3, 12, 3, 7), "fold_width": 4, "reduction": 2},
    # C = 64: exactly one chunk of 8 vectors (fp32), two (fp64); P = 32: one row block, 4L blocks only;
    # map 6x14: vector + tail
    "c64_p32": {"shape": (2, 64, 4, 8), "fold_width": 16},
    # C = 78: a chunk + single vectors + tail (fp32 9 vectors + 6, fp64 19 + 2); P = 35: two row blocks
    # (channels_last), 4L blocks + tail (NCHW); map 10x11: vector + tail
    "c78_p35": {"shape": (2, 78, 5, 7), "fold_width": 13},
}


# fp32 and fp64 (the two vector widths) in every shape; the 16-bit types share fp32's loops and differ
# in their vector and scalar conversions, reached by the shapes with a vector path and a tail on both axes
BRANCH_CASES = [(case, dt) for case in BRANCH_SHAPES for dt in (torch.float32, torch.float64)] + \
    [(case, dt) for case in ("c12_p21", "c78_p35") for dt in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case,dtype", BRANCH_CASES, ids=[f"{c}-{str(d)[6:]}" for c, d in BRANCH_CASES])
@pytest.mark.parametrize("mode", MODES)
def test_vector_paths_and_tails(mode, case, dtype, channels_last):
    for training in (True, False):
        check_all(mode, dtype, training, channels_last=channels_last, **BRANCH_SHAPES[case])


PAD1_SHAPES = {  # folded_3x3 with padding=1: the padded fold (rows and columns) in both directions
    "c24_fold8": {"shape": (3, 24, 5, 3), "fold_width": 8, "seed": 1},
    "c8_fold8_thin": {"shape": (3, 8, 3, 3), "fold_width": 8, "reduction": 2},
    "c78_fold13": {"shape": (2, 78, 5, 7), "fold_width": 13},
    "c12_fold3": {"shape": (2, 12, 2, 2), "fold_width": 3, "reduction": 2},
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(PAD1_SHAPES))
def test_padding1(case, dtype, channels_last):
    for training in (True, False):
        check_all("folded_3x3", dtype, training, channels_last=channels_last, padding=1, **PAD1_SHAPES[case])


@pytest.mark.parametrize("eps,momentum", [(0.3, 0.35), (1e-3, 1.0), (2.0, 0.0)], ids=["eps0.3-m0.35", "m1", "m0"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", PAIR_MODES)
def test_eps_and_momentum(mode, training, eps, momentum):
    """eps and momentum are the arguments, not 1e-5 and 0.1 (both layouts, fp32 and fp64)."""
    for dtype, cl in ((torch.float32, False), (torch.float64, True)):
        check_all(mode, dtype, training, channels_last=cl, eps=eps, momentum=momentum, shape=(3, 24, 3, 5))


def test_n1_training_pair_modes():
    """One sample: BN statistics over the map positions alone (M = map positions)."""
    for mode in PAIR_MODES:
        check_all(mode, torch.float32, True, shape=(1, 24, 3, 3))


@pytest.mark.parametrize("mode", MODES)
def test_strided_inputs_and_mixed_layouts(mode):
    """Non-dense slices go through a dense copy; the outputs follow torch.empty_like(u)."""
    args = make_args(mode, torch.float32, True, shape=(3, 24, 10, 14))
    big_u = torch.randn(3, 48, 10, 14)
    args[0] = big_u[:, ::2]                                        # non-dense: y contiguous
    args[1] = args[1].contiguous(memory_format=torch.channels_last)  # x in the other layout
    a64, a_eager, a_mine = to64(args), fresh(args), fresh(args)
    ref, eager, mine = forward_op_reference(*a64), forward_op_reference(*a_eager), torch.ops.cmpe_se.forward(*a_mine)
    for name, o, r, e in zip(FWD_NAMES, mine, ref, eager):
        assert_close_rule(o, r, e, name=name)
    assert mine[0].stride() == torch.empty_like(args[0]).stride()
    gy = torch.randn(3, 24, 10, 14).contiguous(memory_format=torch.channels_last)
    ref_b = backward_op_reference(*backward_args(gy.double(), a64, ref))
    eager_b = backward_op_reference(*backward_args(gy, args, eager))
    mine_b = torch.ops.cmpe_se.backward(*backward_args(gy, args, mine))
    for name, o, r, e in zip(BWD_NAMES, mine_b, ref_b, eager_b):
        if o.numel():
            assert_close_rule(o, r, e, name=name)


def test_permuted_dense_input_keeps_strides():
    """A dense but permuted u (neither NCHW nor channels_last): y gets empty_like(u)'s strides."""
    args = make_args("folded_3x3", torch.float32, False, shape=(2, 24, 4, 6))
    args[0] = args[0].permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    y = torch.ops.cmpe_se.forward(*fresh(args))[0]
    assert y.stride() == torch.empty_like(args[0]).stride()
    torch.testing.assert_close(y, forward_op_reference(*fresh(args))[0])


@pytest.mark.parametrize("mode", ["se", "folded_3x3", "pair_2x1"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_deterministic(mode, training):
    """Bitwise-equal reruns, and independent of the thread count (fixed-order reductions)."""
    args = make_args(mode, torch.float32, training, shape=(9, 48, 6, 6), fold_width=16)
    gy = torch.randn(9, 48, 6, 6)
    results = []
    threads = torch.get_num_threads()
    try:
        for nthreads in (threads, threads, 1):
            torch.set_num_threads(nthreads)
            a = fresh(args)
            out = torch.ops.cmpe_se.forward(*a)
            grads = torch.ops.cmpe_se.backward(*backward_args(gy, a, out))
            results.append(list(out) + list(grads) + [a[8], a[9]])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for i, (p, q) in enumerate(zip(results[0], other)):
            assert torch.equal(p, q), f"output {i} differs between runs"


@pytest.mark.parametrize("stat_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_running_stats_in_other_dtypes(stat_dtype):
    args = make_args("pair_1x1", torch.float32, True, stat_dtype=stat_dtype)
    a_eager, a_mine = fresh(args), fresh(args)
    forward_op_reference(*a_eager)
    torch.ops.cmpe_se.forward(*a_mine)
    assert a_mine[8].dtype == stat_dtype
    torch.testing.assert_close(a_mine[8], a_eager[8])
    torch.testing.assert_close(a_mine[9], a_eager[9])


def test_eval_does_not_touch_running_stats():
    args = make_args("folded_3x3", torch.float32, False)
    a = fresh(args)
    torch.ops.cmpe_se.forward(*a)
    assert torch.equal(a[8], args[8]) and torch.equal(a[9], args[9])


# ---------------------------------------------------------------------------------------------
# bad inputs: a clear RuntimeError naming the argument, raised before anything is computed
# ---------------------------------------------------------------------------------------------

def _bad_forward_cases():
    def base(mode="folded_3x3", **kw):
        return make_args(mode, torch.float32, True, **kw)

    def edit(args, i, value):
        args = fresh(args)
        args[i] = value
        return args

    a = base()
    yield "mode", edit(a, 10, "pair_3x3"), "mode must be one of"
    yield "u 3-D", edit(a, 0, a[0][0]), "u must be 4-D"
    yield "x shape", edit(a, 1, a[1][:, :, :4]), "x must have the shape of u"
    yield "x dtype", edit(a, 1, a[1].double()), "x must have the dtype of u"
    yield "int input", edit(edit(a, 0, a[0].int()), 1, a[1].int()), "u must be float32, float64"
    yield "fc1 shape", edit(a, 2, a[2][:, 1:]), "fc1_weight must have shape"
    yield "fc1 dtype", edit(a, 2, a[2].double()), "fc1_weight must be Double|fc1_weight must be Float"
    yield "fc2 shape", edit(a, 4, a[4][1:]), "fc2_weight must have shape"
    yield "pair_weight missing", edit(a, 5, None), "pair_weight is required"
    yield "pair_weight shape", edit(a, 5, a[5][:, :, :2]), "pair_weight must have shape"
    yield "bn_bias shape", edit(a, 7, a[7][1:]), "bn_bias must have shape"
    yield "running_mean shape", edit(a, 8, a[8][1:]), "running_mean must have shape"
    yield "running_var int", edit(a, 9, a[9].long()), "running_var must be a floating-point"
    yield "fold divides C", edit(a, 14, 5), "fold_width must be a positive divisor"
    yield "fold zero", edit(a, 14, 0), "fold_width must be a positive divisor"
    yield "padding", edit(a, 15, 2), "padding must be 0 or 1"
    yield "fold too small", base(shape=(2, 8, 3, 3), fold_width=8), "too small for a 3x3 conv"
    yield "fold too narrow", base(shape=(2, 24, 3, 3), fold_width=2), "fc1_weight must have shape|too small"
    yield "one BN value", make_args("pair_2x1", torch.float32, True, shape=(1, 1, 2, 2)), "more than 1 value"
    yield "fc1_identity for se", edit(make_args("se", torch.float32, True), 3, a[2]), "must be None"
    yield "fc1_identity missing", edit(make_args("double_fc", torch.float32, True), 3, None), "is required"
    yield "empty image", edit(edit(a, 0, a[0][:, :, :0]), 1, a[1][:, :, :0]), "at least one channel and one pixel"


@pytest.mark.parametrize("name,args,match", list(_bad_forward_cases()), ids=lambda v: v if isinstance(v, str) else None)
def test_forward_rejects_bad_inputs(name, args, match):
    rm, rv = args[8].clone(), args[9].clone()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.cmpe_se.forward(*args)
    if args[8].shape == rm.shape and args[8].dtype == rm.dtype:
        assert torch.equal(args[8], rm) and torch.equal(args[9], rv), "running stats changed by a failed call"


def test_backward_rejects_bad_inputs():
    args = make_args("folded_3x3", torch.float32, True)
    out = torch.ops.cmpe_se.forward(*fresh(args))
    gy = torch.randn_like(args[0])
    good = backward_args(gy, args, out)
    torch.ops.cmpe_se.backward(*good)
    cases = [(0, gy[:, :3], "grad_y must have the shape of u"), (0, gy.double(), "grad_y must have the dtype"),
             (2, out[1][:, 1:], "pool_u must have shape"), (4, out[3].double(), "gate must be Float"),
             (5, out[4][:, :1], "hidden must have shape"), (6, out[5][:1], "bn_mean must have shape"),
             (13, None, "bn_bias is required"), (14, "se2", "mode must be one of")]
    for i, value, match in cases:
        bad = list(good)
        bad[i] = value
        with pytest.raises(RuntimeError, match=match):
            torch.ops.cmpe_se.backward(*bad)


def test_baseline_isa_build():
    """The x86-64 baseline build of the kernels (chosen on CPUs without AVX2) is correct too."""
    code = (
        "import sys, torch; sys.path.insert(0, TESTS); import test_cpu_kernels as t\n"
        "dts = (torch.float32, torch.bfloat16, torch.float16, torch.float64)\n"
        "for i, mode in enumerate(t.MODES):\n"
        "    t.check_all(mode, dts[i % 4], True, shape=(3, 24, 3, 5))\n"
        "    t.check_all(mode, dts[(i + 1) % 4], False, shape=(2, 20, 3, 3), fold_width=4, channels_last=True)\n"
        "import cmpe_se_fused._C as C; print('ok', C.cpu_isa())\n"
    ).replace("TESTS", repr(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, CMPE_SE_CPU_ISA="default")
    res = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok default" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]

