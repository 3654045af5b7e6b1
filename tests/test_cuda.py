"""The CUDA backend (``cmpe_se_fused._C_cuda``): registration and ptxas resources (no GPU
needed), then the kernels against the op contract on a GPU (``-m cuda``).

GPU tests compare ``torch.ops.cmpe_se.forward/backward`` on CUDA with
``reference.forward_op_reference/backward_op_reference`` run in float64 (the truth) and in the
test dtype (the eager error that sets the tolerance, conftest.assert_close_rule).
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cmpe_se_fused.reference import PAIR_MODES, backward_op_reference, forward_op_reference

from .conftest import assert_close_rule, make_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("se", "double_fc", "pair_2x1", "pair_1x1", "folded_3x3")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _import_cuda_ext():
    try:
        import cmpe_se_fused._C
        import cmpe_se_fused._C_cuda  # noqa: F401
        return None
    except Exception as exc:  # noqa: BLE001 - not built, or built without CUDA
        return f"{type(exc).__name__}: {exc}"


# ---- no GPU needed ------------------------------------------------------------------------

def test_cuda_kernels_registered():
    why = _import_cuda_ext()
    if why is not None:
        pytest.skip(f"cmpe_se_fused._C_cuda is not built ({why})")
    for op in ("cmpe_se::forward", "cmpe_se::backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"


PTXAS_FN = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(text: str) -> dict[str, dict[str, int]]:
    """``{kernel: {regs, stack, spill_st, spill_ld}}`` from an ``-Xptxas -v`` report."""
    out, cur = {}, None
    for line in text.splitlines():
        m = PTXAS_FN.search(line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        m = PTXAS_FRAME.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = PTXAS_REGS.search(line)
        if m:
            cur["regs"] = int(m.group(1))
    return out


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for cand in sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True):
            return cand
    return nvcc


def _ptxas_report(src: str, out_dir: str) -> str:
    cmd = [_nvcc(), "-c", "-arch=sm_90", "-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr",
           "-Xptxas", "-v", "-I", os.path.join(ROOT, "csrc"), src,
           "-o", os.path.join(out_dir, os.path.basename(src) + ".o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, f"nvcc failed on {src}:\n{res.stderr[-4000:]}"
    return res.stdout + res.stderr


def test_ptxas_no_spills_no_stack(tmp_path):
    """Every kernel in csrc/cuda/*.cu: no local memory (spills or stack frame) for sm_90.
    The files compile in parallel (one per dtype and pass, about 1 min each on one core); the
    report is cached under build/ by a hash of the sources. CMPE_SE_PTXAS_LOG=<file> reuses a
    build's report instead."""
    log = os.environ.get("CMPE_SE_PTXAS_LOG")
    srcs = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    assert srcs, "no csrc/cuda/*.cu"
    deps = srcs + sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh"))) + \
        sorted(glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cuh"))) + [os.path.join(ROOT, "csrc", "cmpe_se.h")]
    h = hashlib.sha256()
    for f in deps:
        with open(f, "rb") as fh:
            h.update(fh.read())
    digest = h.hexdigest()[:16]
    cache = os.path.join(ROOT, "build", f"ptxas-sm90-{digest}.txt")  # same sources: same report
    if log and os.path.exists(log) or os.path.exists(cache):
        with open(log if log and os.path.exists(log) else cache) as fh:
            text = fh.read()
    else:
        if _nvcc() is None:
            pytest.skip("nvcc not found")
        with ThreadPoolExecutor(max_workers=max(1, min(len(srcs), os.cpu_count() or 1))) as pool:
            text = "\n".join(pool.map(lambda s: _ptxas_report(s, str(tmp_path)), srcs))
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(cache, "w") as f:
            f.write(text)
    kernels = {k: v for k, v in parse_ptxas(text).items() if "cmpe_se" in k}
    assert kernels, "no cmpe_se kernels in the ptxas report"
    bad = {k: v for k, v in kernels.items() if v.get("stack", 0) or v.get("spill_st", 0) or v.get("spill_ld", 0)}
    assert not bad, "kernels with local memory (spills / stack):\n" + "\n".join(f"  {k}: {v}" for k, v in bad.items())
    sys.stdout.write("".join(f"{k}: {v}\n" for k, v in sorted(kernels.items())))


# ---- GPU ------------------------------------------------------------------------------------

def _need_ext():
    why = _import_cuda_ext()
    if why is not None:
        pytest.skip(f"cmpe_se_fused._C_cuda is not built ({why})")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _case(mode, dtype, shape=(4, 32, 6, 5), *, layout="nchw", training=True, fold_width=8, padding=0,
          pair_filters=3, reduction=4, seed=0):
    """Op arguments on CUDA in ``dtype`` (weights in the acc dtype), plus a float64 copy."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    u64 = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) + 0.5
    x64 = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    p64 = make_params(mode, c, reduction=reduction, pair_filters=pair_filters, fold_width=fold_width,
                      padding=padding, dtype=torch.float64, seed=seed + 1)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def build(dt, wdt):
        d = {"u": u64.to(dt).cuda().contiguous(memory_format=fmt), "x": x64.to(dt).cuda().contiguous(memory_format=fmt)}
        for k in ("fc1_weight", "fc1_identity_weight", "fc2_weight", "pair_weight", "bn_weight", "bn_bias"):
            d[k] = p64[k].to(wdt).cuda() if k in p64 else None
        empty = torch.zeros(0, device="cuda")
        d["running_mean"] = p64["running_mean"].float().cuda() if "running_mean" in p64 else empty
        d["running_var"] = p64["running_var"].float().cuda() if "running_var" in p64 else empty.clone()
        return d

    kw = {"mode": mode, "training": training, "momentum": 0.1, "eps": 1e-5, "fold_width": fold_width,
          "padding": padding}
    return build(dtype, _acc(dtype)), build(torch.float64, torch.float64), kw


FWD_ORDER = ("u", "x", "fc1_weight", "fc1_identity_weight", "fc2_weight", "pair_weight", "bn_weight", "bn_bias",
             "running_mean", "running_var")
KW_ORDER = ("mode", "training", "momentum", "eps", "fold_width", "padding")


def _fwd_args(d, kw):
    return [d[k] for k in FWD_ORDER] + [kw[k] for k in KW_ORDER]


def _bwd_args(dy, d, saved, kw):
    _, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd = saved
    return [dy, d["u"], pool_u, pool_x, gate, hidden, bn_mean, bn_invstd, d["fc1_weight"], d["fc1_identity_weight"],
            d["fc2_weight"], d["pair_weight"], d["bn_weight"], d["bn_bias"], kw["mode"], kw["training"],
            kw["fold_width"], kw["padding"]]


def _clone_stats(d):
    d = dict(d)
    d["running_mean"] = d["running_mean"].clone()
    d["running_var"] = d["running_var"].clone()
    return d


def _check_case(mode, dtype, shape, layout, training, **case_kw):
    d, d64, kw = _case(mode, dtype, shape, layout=layout, training=training, **case_kw)
    dc, de = _clone_stats(d), _clone_stats(d)
    out = torch.ops.cmpe_se.forward(*_fwd_args(dc, kw))
    ref = forward_op_reference(*_fwd_args(d64, kw))
    eag = forward_op_reference(*_fwd_args(de, kw))
    names = ("y", "pool_u", "pool_x", "gate", "hidden", "bn_mean", "bn_invstd")
    for name, o, r, e in zip(names, out, ref, eag):
        assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        assert o.dtype == e.dtype, f"{name}: dtype {o.dtype} != {e.dtype}"
        if o.numel():
            assert_close_rule(o, r, e, name=f"{mode}/{dtype}/{layout}/{training} {name}")
    fmt = torch.channels_last if layout == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1 \
        else torch.contiguous_format
    assert out[0].is_contiguous(memory_format=fmt), "y must follow u's memory format"
    if mode in PAIR_MODES and training:
        for k in ("running_mean", "running_var"):
            assert_close_rule(dc[k], d64[k], de[k], name=f"{mode}/{dtype} {k}")
    g = torch.Generator().manual_seed(7)
    dy64 = torch.randn(shape, generator=g, dtype=torch.float64).cuda()
    fmt_u = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    dy = dy64.to(dtype).contiguous(memory_format=fmt_u)
    grads = torch.ops.cmpe_se.backward(*_bwd_args(dy, d, out, kw))
    gref = backward_op_reference(*_bwd_args(dy64, d64, ref, kw))
    geag = backward_op_reference(*_bwd_args(dy, d, eag, kw))
    gnames = ("grad_u", "grad_x", "grad_fc1", "grad_fc1_id", "grad_fc2", "grad_pair", "grad_bn_w", "grad_bn_b")
    for name, o, r, e in zip(gnames, grads, gref, geag):
        assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        if o.numel():
            assert_close_rule(o, r, e, name=f"{mode}/{dtype}/{layout}/{training} {name}")
    assert grads[0].is_contiguous(memory_format=fmt) and grads[1].is_contiguous(memory_format=fmt)


@pytest.mark.cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(mode, dtype, layout, training):
    _need_ext()
    _check_case(mode, dtype, (4, 32, 8, 8), layout, training)


ODD_SHAPES = [
    ((2, 33, 7, 7), {}),                 # odd C (no 16-byte vectors in channels_last), 7x7
    ((3, 48, 5, 3), {"padding": 1}),     # odd P, folded padding 1
    ((2, 24, 1, 1), {}),                 # H*W = 1
    ((5, 16, 3, 3), {"fold_width": 4}),  # tiny
    ((2, 64, 28, 28), {"fold_width": 16}),
]


@pytest.mark.cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,extra", ODD_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("mode", MODES)
def test_odd_shapes(mode, shape, extra, layout, training):
    _need_ext()
    if mode == "folded_3x3" and shape[1] % extra.get("fold_width", 8):
        extra = dict(extra, fold_width=3)
    if mode != "folded_3x3":
        extra = {k: v for k, v in extra.items() if k not in ("padding",)}
    _check_case(mode, torch.float32, shape, layout, training, **extra)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
def test_batch_of_one_eval(mode):
    _need_ext()
    for dtype in (torch.float32, torch.float16):
        _check_case(mode, dtype, (1, 32, 7, 7), "nchw", False)


@pytest.mark.cuda
def test_strided_inputs():
    """Non-contiguous, non-channels_last inputs go through a contiguous copy."""
    _need_ext()
    d, d64, kw = _case("folded_3x3", torch.float32, (3, 32, 9, 9), training=True)
    big = torch.randn(3, 64, 9, 11, device="cuda")
    u = big[:, ::2, :, 1:10]
    u.copy_(d["u"])
    d["u"] = u
    out = torch.ops.cmpe_se.forward(*_fwd_args(_clone_stats(d), kw))
    ref = forward_op_reference(*_fwd_args(_clone_stats(d64), kw))
    eag = forward_op_reference(*_fwd_args(_clone_stats(d), kw))
    assert_close_rule(out[0], ref[0], eag[0], name="y (strided u)")


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", MODES)
def test_bitwise_deterministic(mode, layout):
    _need_ext()
    d, _, kw = _case(mode, torch.float16, (8, 64, 14, 14), layout=layout, training=True)
    dy = torch.randn_like(d["u"])
    runs = []
    for _ in range(3):
        dd = _clone_stats(d)
        out = torch.ops.cmpe_se.forward(*_fwd_args(dd, kw))
        grads = torch.ops.cmpe_se.backward(*_bwd_args(dy, d, out, kw))
        runs.append([t.clone() for t in (*out, *grads, dd["running_mean"], dd["running_var"])])
    for other in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], other)):
            assert torch.equal(a, b), f"output {i} differs between runs"


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["se", "folded_3x3"])
def test_cuda_graph_capture(mode):
    _need_ext()
    d, _, kw = _case(mode, torch.float32, (4, 32, 8, 8), training=True)
    dy = torch.randn_like(d["u"])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up outside capture
            out = torch.ops.cmpe_se.forward(*_fwd_args(_clone_stats(d), kw))
            torch.ops.cmpe_se.backward(*_bwd_args(dy, d, out, kw))
    torch.cuda.current_stream().wait_stream(s)
    dg = _clone_stats(d)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gout = torch.ops.cmpe_se.forward(*_fwd_args(dg, kw))
        ggrads = torch.ops.cmpe_se.backward(*_bwd_args(dy, d, gout, kw))
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    eager_out = torch.ops.cmpe_se.forward(*_fwd_args(_clone_stats(d), kw))
    eager_grads = torch.ops.cmpe_se.backward(*_bwd_args(dy, d, eager_out, kw))
    for a, b in zip((*gout, *ggrads), (*eager_out, *eager_grads)):
        assert torch.equal(a, b), "graph replay differs from an eager call"
    # new inputs copied into the captured buffers are picked up
    d["u"].mul_(0.5)
    graph.replay()
    again = torch.ops.cmpe_se.forward(*_fwd_args(_clone_stats(d), kw))
    assert torch.equal(gout[0], again[0])


@pytest.mark.cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_fp64(mode, training):
    _need_ext()
    from cmpe_se_fused.functional import cmpe_se

    c = 16
    p = make_params(mode, c, reduction=4, pair_filters=2, fold_width=4, dtype=torch.float64, device="cuda")
    u = (torch.randn(3, c, 3, 2, dtype=torch.float64, device="cuda") + 0.5).requires_grad_(True)
    x = torch.randn(3, c, 3, 2, dtype=torch.float64, device="cuda").requires_grad_(True)
    names = [k for k in ("fc1_weight", "fc2_weight", "fc1_identity_weight", "pair_weight", "bn_weight", "bn_bias")
             if k in p]
    weights = [p[k].requires_grad_(True) for k in names]
    stats = {k: p[k] for k in ("running_mean", "running_var") if k in p}

    def fn(u, x, *ws):
        return cmpe_se(u, x, **dict(zip(names, ws)), **stats, mode=mode, training=training, fold_width=4,
                       backend="cuda")

    assert torch.autograd.gradcheck(fn, (u, x, *weights), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
def test_sgd_loop_matches_reference(mode):
    """20 SGD steps of a small two-block net: cuda backend vs reference backend."""
    _need_ext()
    from cmpe_se_fused.modules import CMPESE

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self, backend):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 32, 3, padding=1)
            self.conv1 = torch.nn.Conv2d(32, 32, 3, padding=1)
            self.se1 = CMPESE(32, mode=mode, reduction=4, fold_width=8, backend=backend)
            self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1)
            self.se2 = CMPESE(32, mode=mode, reduction=4, fold_width=8, backend=backend)
            self.head = torch.nn.Linear(32, 10)

        def forward(self, inp):
            x = self.stem(inp)
            x = self.se1(self.conv1(torch.relu(x)), x)
            x = self.se2(self.conv2(torch.relu(x)), x)
            return self.head(x.mean((2, 3)))

    ref = Net("reference").cuda().double()
    net = Net("cuda").cuda().double()
    net.load_state_dict(ref.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, net)]
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        inp = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64).cuda()
        target = torch.randint(0, 10, (8,), generator=g).cuda()
        for m, opt in zip((ref, net), opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(inp), target).backward()
            opt.step()
    for (k, a), (_, b) in zip(ref.state_dict().items(), net.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9, msg=f"{mode}: {k} diverged")
