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
from conftest import assert_close_rule, make_params

from cmpe_se_fused.reference import PAIR_MODES, backward_op_reference, forward_op_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("se", "double_fc", "pair_2x1", "pair_1x1", "folded_3x3")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The GPU tests' device and backend; a CPU dry run of the test logic sets "cpu" / "cpu".
DEVICE, BACKEND = "cuda", "cuda"


def _import_cuda_ext():
    try:
        import cmpe_se_fused._C
        import cmpe_se_fused._C_cuda  # noqa: F401
        return None
    except Exception as exc:  # noqa: BLE001 - not built, or built without CUDA
        return f"{type(exc).__name__}: {exc}"


# ---- no GPU needed ------------------------------------------------------------------------

def test_cuda_kernels_registered():
    """In a subprocess: a C++ signature mismatch between the CPU and CUDA kernels aborts the
    process at import time (static registration), which must fail this test, not kill pytest."""
    if not glob.glob(os.path.join(ROOT, "cmpe_se_fused", "_C_cuda*.so")) and _import_cuda_ext() is not None:
        pytest.skip("cmpe_se_fused._C_cuda is not built")
    code = ("import torch, cmpe_se_fused._C, cmpe_se_fused._C_cuda\n"
            "for op in ('cmpe_se::forward', 'cmpe_se::backward'):\n"
            "    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, 'CUDA'), op\n"
            "    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, 'CPU'), op\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                         cwd=ROOT)
    assert res.returncode == 0, f"importing _C_cuda failed (rc {res.returncode}):\n{res.stderr[-3000:]}"


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


def test_kernels_compile_for_sm80(tmp_path):
    """sm_80 (A100) must compile too: the cluster code of the resident kernels is sm_90-only and
    guarded (docs/CUDA.md). Compiles the float32 forward and backward units for sm_80."""
    if _nvcc() is None:
        pytest.skip("nvcc not found")
    srcs = [os.path.join(ROOT, "csrc", "cuda", f) for f in ("forward_f32.cu", "backward_f32.cu")]

    def compile_one(src):
        cmd = [_nvcc(), "-c", "-arch=sm_80", "-O1", "-std=c++17", "--expt-relaxed-constexpr", "-I",
               os.path.join(ROOT, "csrc"), src, "-o", os.path.join(str(tmp_path), os.path.basename(src) + ".o")]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for src, res in zip(srcs, pool.map(compile_one, srcs)):
            assert res.returncode == 0, f"nvcc -arch=sm_80 failed on {src}:\n{res.stderr[-4000:]}"


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
        d = {"u": u64.to(dt).to(DEVICE).contiguous(memory_format=fmt),
             "x": x64.to(dt).to(DEVICE).contiguous(memory_format=fmt)}
        for k in ("fc1_weight", "fc1_identity_weight", "fc2_weight", "pair_weight", "bn_weight", "bn_bias"):
            d[k] = p64[k].to(wdt).to(DEVICE) if k in p64 else None
        empty = torch.zeros(0, device=DEVICE)
        d["running_mean"] = p64["running_mean"].float().to(DEVICE) if "running_mean" in p64 else empty
        d["running_var"] = p64["running_var"].float().to(DEVICE) if "running_var" in p64 else empty.clone()
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
    dy64 = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)
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
    big = torch.randn(3, 64, 9, 11, device=DEVICE)
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
@pytest.mark.parametrize("env", [{"CMPE_SE_CUDA_PATH": "per_sample"}, {"CMPE_SE_CUDA_VEC": "0"},
                                 {"CMPE_SE_CUDA_THREADS": "512", "CMPE_SE_CUDA_BLOCKS": "7"},
                                 {"CMPE_SE_CUDA_SPLITS": "3", "CMPE_SE_CUDA_THREADS": "128"},
                                 {"CMPE_SE_CUDA_PATH": "resident"},
                                 {"CMPE_SE_CUDA_PATH": "resident", "CMPE_SE_CUDA_CLUSTER": "4"},
                                 {"CMPE_SE_CUDA_PATH": "resident", "CMPE_SE_CUDA_CLUSTER": "16",
                                  "CMPE_SE_CUDA_VEC": "0"}],
                         ids=["per_sample", "scalar", "t512_b7", "s3_t128", "resident", "resident_c4",
                              "resident_c16_scalar"])
def test_launch_variants(env):
    """The launch options of docs/CUDA.md (read once per process: run in a subprocess)."""
    _need_ext()
    code = ("import sys, torch\nsys.path.insert(0, '.')\nimport test_cuda as T\n"
            "for mode in T.MODES:\n"
            "    for layout in ('nchw', 'channels_last'):\n"
            "        for training in (True, False):\n"
            "            T._check_case(mode, torch.float16, (5, 32, 7, 7), layout, training)\n"
            "            T._check_case(mode, torch.float32, (3, 40, 8, 8), layout, training)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False,
                         cwd=os.path.join(ROOT, "tests"), env={**os.environ, **env})
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.cuda
def test_resident_path_is_taken():
    """CMPE_SE_CUDA_PATH=resident runs the resident kernels where they apply (forward: se, double_fc,
    eval pair modes; backward: se, double_fc) and only there: the kernel names in a profiler trace,
    in a subprocess (the variable is read once)."""
    _need_ext()
    code = ("import sys, torch\nsys.path.insert(0, '.')\nimport test_cuda as T\n"
            "from torch.profiler import profile, ProfilerActivity\n"
            "def names(mode, training, backward, shape=(4, 64, 16, 16)):\n"
            "    d, _, kw = T._case(mode, torch.float32, shape, training=training)\n"
            "    out = torch.ops.cmpe_se.forward(*T._fwd_args(d, kw))\n"
            "    dy = torch.randn_like(d['u'])\n"
            "    torch.cuda.synchronize()\n"
            "    with profile(activities=[ProfilerActivity.CUDA]) as prof:\n"
            "        if backward:\n"
            "            torch.ops.cmpe_se.backward(*T._bwd_args(dy, d, out, kw))\n"
            "        else:\n"
            "            torch.ops.cmpe_se.forward(*T._fwd_args(d, kw))\n"
            "        torch.cuda.synchronize()\n"
            "    return ' '.join(e.name for e in prof.events())\n"
            "for mode, training in (('se', True), ('se', False), ('double_fc', True), ('folded_3x3', False)):\n"
            "    assert 'resident' in names(mode, training, False), (mode, training)\n"
            "for mode in ('se', 'double_fc'):\n"
            "    n = names(mode, True, True)\n"
            "    assert 'cmpe_se_backward_resident_kernel' in n and 'weight_grads' in n, n\n"
            "n = names('folded_3x3', True, False)\n"
            "assert 'resident' not in n and 'cmpe_se_forward_kernel' in n, n\n"
            "n = names('folded_3x3', False, True)\n"
            "assert 'resident' not in n and 'cmpe_se_backward_kernel' in n, n\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False,
                         cwd=os.path.join(ROOT, "tests"), env={**os.environ, "CMPE_SE_CUDA_PATH": "resident"})
    assert res.returncode == 0, res.stderr[-3000:]


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
    p = make_params(mode, c, reduction=4, pair_filters=2, fold_width=4, dtype=torch.float64, device=DEVICE)
    u = (torch.randn(3, c, 3, 2, dtype=torch.float64, device=DEVICE) + 0.5).requires_grad_(True)
    x = torch.randn(3, c, 3, 2, dtype=torch.float64, device=DEVICE).requires_grad_(True)
    names = [k for k in ("fc1_weight", "fc2_weight", "fc1_identity_weight", "pair_weight", "bn_weight", "bn_bias")
             if k in p]
    weights = [p[k].requires_grad_(True) for k in names]
    stats = {k: p[k] for k in ("running_mean", "running_var") if k in p}

    def fn(u, x, *ws):
        return cmpe_se(u, x, **dict(zip(names, ws)), **stats, mode=mode, training=training, fold_width=4,
                       backend=BACKEND)

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

    ref = Net("reference").to(DEVICE).double()
    net = Net(BACKEND).to(DEVICE).double()
    net.load_state_dict(ref.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, net)]
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        inp = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64).to(DEVICE)
        target = torch.randint(0, 10, (8,), generator=g).to(DEVICE)
        for m, opt in zip((ref, net), opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(inp), target).backward()
            opt.step()
    for (k, a), (_, b) in zip(ref.state_dict().items(), net.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9, msg=f"{mode}: {k} diverged")


# ---- the real kernels on the CPU: a thread-per-GPU-thread emulator (slow, no GPU needed) --------
#
# The device code (csrc/kernels/*.cuh) is compiled by the host compiler against a small shim:
# every GPU thread is an OS thread, __syncthreads and warp shuffles are barriers, the grid
# barrier spins on real atomics. It checks indexing, synchronisation structure and numerics of
# the actual kernels on tiny grids (not timing, not the memory model of a real GPU).

EMU_SHIM = r"""
// Host emulator of the CUDA features the cmpe_se kernels use: every GPU thread is an OS thread.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct emu_dim3 { unsigned x, y, z; };
namespace emu {
struct Barrier {
  int n = 0, count = 0, gen = 0;
  std::mutex m;
  std::condition_variable cv;
  void wait() {
    std::unique_lock<std::mutex> lk(m);
    int g = gen;
    if (++count == n) { count = 0; ++gen; cv.notify_all(); }
    else cv.wait(lk, [&] { return gen != g; });
  }
};
struct Block {
  std::vector<unsigned char> smem;
  Barrier bar;
  std::vector<Barrier> warp_bars;
  std::vector<uint64_t> shfl;
  alignas(16) unsigned char vars[64];
  int index = 0, cluster = 1;          // thread-block clusters along x: rank = index % cluster
  Barrier* cbar = nullptr;             // barrier of this block's cluster (threads * cluster)
  std::vector<Block*>* all = nullptr;  // every block of the grid
};
extern thread_local emu_dim3 tl_tid, tl_bid;
extern emu_dim3 g_bdim, g_gdim;
extern thread_local Block* tl_block;
}  // namespace emu
#define threadIdx emu::tl_tid
#define blockIdx emu::tl_bid
#define blockDim emu::g_bdim
#define gridDim emu::g_gdim
#define CMPE_SE_DYNAMIC_SMEM(name) unsigned char* name = emu::tl_block->smem.data()
#define CMPE_SE_SHARED_VAR(type, name) type& name = *reinterpret_cast<type*>(emu::tl_block->vars)
namespace emu {
inline void cluster_sync() { tl_block->cbar->wait(); }
// distributed shared memory: the same offset in block `rank` of this block's cluster
template <typename T>
T* map_shared(T* p, int rank) {
  Block* b = tl_block;
  const auto off = reinterpret_cast<unsigned char*>(p) - b->smem.data();
  if (off < 0 || (size_t)off >= b->smem.size() || rank < 0 || rank >= b->cluster) std::abort();
  Block* t = (*b->all)[(b->index / b->cluster) * b->cluster + rank];
  return reinterpret_cast<T*>(t->smem.data() + off);
}
}  // namespace emu
#define CMPE_SE_CLUSTER_SYNC() emu::cluster_sync()
#define CMPE_SE_CLUSTER_MAP(ptr, rank) emu::map_shared((ptr), (rank))

inline void __syncthreads() { emu::tl_block->bar.wait(); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
  emu::Block* b = emu::tl_block;
  const int t = threadIdx.x, w = t >> 5, lane = t & 31;
  std::memcpy(&b->shfl[t], &v, sizeof(T));
  b->warp_bars[w].wait();
  T r;
  std::memcpy(&r, &b->shfl[(w << 5) | (lane ^ o)], sizeof(T));
  b->warp_bars[w].wait();
  return r;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
inline void __trap() { std::abort(); }
inline float __expf(float x) { return std::exp(x); }
inline int min(int a, int b) { return a < b ? a : b; }
"""

EMU_FP16 = r"""
#pragma once
struct __half { _Float16 v; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { __half h; h.v = (_Float16)f; return h; }
"""

EMU_BF16 = r"""
#pragma once
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = (uint32_t)b.bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}
"""

EMU_HARNESS = r"""
#include <torch/extension.h>
#include <memory>
#include "cuda_runtime.h"
#include "kernels/forward.cuh"
#include "kernels/resident.cuh"
#include "kernels/backward.cuh"
#include "kernels/resident_backward.cuh"

namespace emu {
thread_local emu_dim3 tl_tid, tl_bid;
emu_dim3 g_bdim, g_gdim;
thread_local Block* tl_block;
}

using namespace cmpe_se;
using at::Tensor;

template <typename F>
void run_grid(int blocks, int threads, size_t smem, F kernel, int cluster = 1) {
  emu::g_bdim = {(unsigned)threads, 1, 1};
  emu::g_gdim = {(unsigned)blocks, 1, 1};
  std::vector<std::unique_ptr<emu::Block>> bl;
  std::vector<emu::Block*> all;
  std::vector<std::unique_ptr<emu::Barrier>> cbars;
  for (int b = 0; b < blocks; ++b) {
    auto blk = std::make_unique<emu::Block>();
    blk->smem.assign(smem + 64, 0xCD);  // garbage-fill: reads of unwritten smem show up
    blk->bar.n = threads;
    blk->warp_bars = std::vector<emu::Barrier>(threads / 32);
    for (auto& w : blk->warp_bars) w.n = 32;
    blk->shfl.assign(threads, 0);
    blk->index = b;
    blk->cluster = cluster;
    if (b % cluster == 0) {
      cbars.push_back(std::make_unique<emu::Barrier>());
      cbars.back()->n = threads * cluster;
    }
    blk->cbar = cbars.back().get();
    blk->all = &all;
    all.push_back(blk.get());
    bl.push_back(std::move(blk));
  }
  std::vector<std::thread> ts;
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([&, b, t] {
        emu::tl_tid = {(unsigned)t, 0, 0};
        emu::tl_bid = {(unsigned)b, 0, 0};
        emu::tl_block = bl[b].get();
        kernel();
      });
  for (auto& t : ts) t.join();
}

Mode parse(const std::string& s) {
  if (s == "se") return Mode::SE;
  if (s == "double_fc") return Mode::DOUBLE_FC;
  if (s == "pair_2x1") return Mode::PAIR_2X1;
  if (s == "pair_1x1") return Mode::PAIR_1X1;
  return Mode::FOLDED_3X3;
}

Geometry geom(const Tensor& u, Mode mode, const Tensor& fc1, const c10::optional<Tensor>& pw, int64_t m, int64_t pad,
              bool cl) {
  Geometry g{};
  g.N = u.size(0); g.C = u.size(1); g.P = u.size(2) * u.size(3);
  g.channels_last = cl; g.mode = mode;
  g.r = fc1.size(0); g.Dz = fc1.size(1); g.Rh = mode == Mode::DOUBLE_FC ? 2 * g.r : g.r;
  g.K = 1; g.fold_m = m; g.pad = pad;
  if (is_pair_mode(mode)) {
    g.e = pw->size(0); g.K = pw->size(2) * pw->size(3);
    if (mode == Mode::PAIR_2X1) g.L = g.C;
    else if (mode == Mode::PAIR_1X1) g.L = 2 * g.C;
    else { g.Ho = 2 * (g.C / m) - 2 + 2 * pad; g.Wo = m - 2 + 2 * pad; g.L = g.Ho * g.Wo; }
  }
  return g;
}

template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(__half{}); break;
    default: f(__nv_bfloat16{}); break;
  }
}

void* ptr(const c10::optional<Tensor>& t) { return t && t->defined() && t->numel() ? t->data_ptr() : nullptr; }

Launch mk_launch(const Geometry& g, bool bwd, int elem, int acc, int64_t threads, int64_t blocks, int64_t splits, int64_t vec) {
  Launch l{};
  l.threads = threads; l.blocks = blocks; l.splits = splits; l.vec = vec;
  int nvc = g.C / l.vec, cv = 1;
  while (cv < 32 && cv < nvc) cv *= 2;
  l.cv = cv;
  int nvr = g.P / l.vec, gw = 1;
  while (gw < 32 && gw < nvr) gw *= 2;
  l.gw = gw;
  l.per_sample = std::getenv("CMPE_SE_EMU_PER_SAMPLE") != nullptr;
  l.smem = smem_plan(g, acc, bwd, l.threads, l.vec).total;
  return l;
}

std::vector<Tensor> emu_forward(Tensor u, Tensor x, Tensor fc1, c10::optional<Tensor> fc1i, Tensor fc2,
                                c10::optional<Tensor> pw, c10::optional<Tensor> bw, c10::optional<Tensor> bb,
                                Tensor rm, Tensor rv, std::string mode_s, bool training, double momentum, double eps,
                                int64_t m, int64_t pad, bool cl, int64_t threads, int64_t blocks, int64_t splits,
                                int64_t vec, int64_t cluster) {
  Mode mode = parse(mode_s);
  Geometry g = geom(u, mode, fc1, pw, m, pad, cl);
  auto acc = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto fo = u.options().dtype(acc);
  Tensor y = torch::empty_like(u);
  Tensor pu = torch::empty({g.N, g.C}, fo), px = torch::empty({g.N, g.C}, fo), gate = torch::empty({g.N, g.C}, fo);
  Tensor hid = torch::empty({g.N, g.Rh}, fo), bm = torch::empty({g.e}, fo), bi = torch::empty({g.e}, fo);
  int accb = acc == at::kDouble ? 8 : 4;
  Launch l = mk_launch(g, false, u.element_size(), accb, threads, blocks, splits, vec);
  Tensor part = torch::full({(int64_t)2 * g.N * splits * g.C * accb}, 0x7f, u.options().dtype(at::kByte));
  Tensor stat = torch::full({(int64_t)blocks * 100 * 8}, 0x7f, u.options().dtype(at::kByte));
  Tensor cnt = torch::zeros({16}, u.options().dtype(at::kInt));
  ForwardParams p{};
  p.g = g; p.u = u.data_ptr(); p.x = x.data_ptr(); p.y = y.data_ptr();
  p.fc1_w = fc1.data_ptr(); p.fc1_id_w = ptr(fc1i); p.fc2_w = fc2.data_ptr(); p.pair_w = ptr(pw);
  p.bn_w = ptr(bw); p.bn_b = ptr(bb); p.running_mean = rm.numel() ? rm.data_ptr() : nullptr;
  p.running_var = rv.numel() ? rv.data_ptr() : nullptr;
  p.stat_dtype = rm.scalar_type() == at::kDouble ? StatDtype::F64 : rm.scalar_type() == at::kHalf ? StatDtype::F16 :
                 rm.scalar_type() == at::kBFloat16 ? StatDtype::BF16 : StatDtype::F32;
  p.training = training; p.momentum = momentum; p.eps = eps;
  p.pool_u = pu.data_ptr(); p.pool_x = px.data_ptr(); p.gate = gate.data_ptr(); p.hidden = hid.data_ptr();
  p.bn_mean = bm.data_ptr(); p.bn_invstd = bi.data_ptr();
  p.counter = reinterpret_cast<unsigned*>(cnt.data_ptr()); p.part = part.data_ptr(); p.stat_part = stat.data_ptr();
  if (cluster > 0) {  // the resident kernel: one cluster per sample
    l.cluster = cluster;
    l.smem = resident_plan(g, accb, u.element_size(), l.threads, l.vec, cluster).total;
    const int rb = g.N * cluster;
    dispatch(u.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      constexpr int kV = 16 / sizeof(T);
      if (vec > 1) run_grid(rb, threads, l.smem, [&] { cmpe_se_forward_resident_kernel<T, kV>(p, l); }, cluster);
      else run_grid(rb, threads, l.smem, [&] { cmpe_se_forward_resident_kernel<T, 1>(p, l); }, cluster);
    });
    return {y, pu, px, gate, hid, bm, bi};
  }
  dispatch(u.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kV = 16 / sizeof(T);
    if (vec > 1) run_grid(blocks, threads, l.smem, [&] { cmpe_se_forward_kernel<T, kV>(p, l); });
    else run_grid(blocks, threads, l.smem, [&] { cmpe_se_forward_kernel<T, 1>(p, l); });
  });
  return {y, pu, px, gate, hid, bm, bi};
}

std::vector<Tensor> emu_backward(Tensor dy, Tensor u, Tensor pu, Tensor px, Tensor gate, Tensor hid, Tensor bm,
                                 Tensor bi, Tensor fc1, c10::optional<Tensor> fc1i, Tensor fc2,
                                 c10::optional<Tensor> pw, c10::optional<Tensor> bw, c10::optional<Tensor> bb,
                                 std::string mode_s, bool training, int64_t m, int64_t pad, bool cl, int64_t threads,
                                 int64_t blocks, int64_t splits, int64_t vec, int64_t cluster) {
  Mode mode = parse(mode_s);
  Geometry g = geom(u, mode, fc1, pw, m, pad, cl);
  auto acc = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto fo = u.options().dtype(acc);
  int accb = acc == at::kDouble ? 8 : 4;
  Tensor gu = torch::empty_like(u), gx = torch::empty_like(u);
  Tensor d1 = torch::empty(fc1.sizes(), fo), d2 = torch::empty(fc2.sizes(), fo);
  Tensor d1i = fc1i ? torch::empty(fc1i->sizes(), fo) : torch::empty({0}, fo);
  Tensor dp = pw ? torch::empty(pw->sizes(), fo) : torch::empty({0}, fo);
  Tensor dbw = torch::empty({g.e}, fo), dbb = torch::empty({g.e}, fo);
  Launch l = mk_launch(g, true, u.element_size(), accb, threads, blocks, splits, vec);
  auto bytes = [&](int64_t n) { return torch::full({std::max<int64_t>(n, 1)}, 0x7f, u.options().dtype(at::kByte)); };
  int64_t NC = (int64_t)g.N * g.C;
  Tensor gpart = bytes(NC * splits * accb), dg = bytes(NC * accb), dhp = bytes((int64_t)g.N * g.Rh * accb);
  Tensor zb = bytes((int64_t)g.N * g.L * accb), dv = bytes((int64_t)g.N * g.L * accb), dudx = bytes(2 * NC * accb);
  Tensor dq = bytes((int64_t)blocks * g.L * g.K * accb), part1 = bytes((int64_t)blocks * 100 * 8), fin = bytes((g.e + 1) * 8);
  Tensor cnt = torch::zeros({16}, u.options().dtype(at::kInt));
  BackwardParams p{};
  p.g = g; p.dy = dy.data_ptr(); p.u = u.data_ptr(); p.du_out = gu.data_ptr(); p.dx_out = gx.data_ptr();
  p.pool_u = pu.data_ptr(); p.pool_x = px.data_ptr(); p.gate = gate.data_ptr(); p.hidden = hid.data_ptr();
  p.bn_mean = bm.numel() ? bm.data_ptr() : nullptr; p.bn_invstd = bi.numel() ? bi.data_ptr() : nullptr;
  p.fc1_w = fc1.data_ptr(); p.fc1_id_w = ptr(fc1i); p.fc2_w = fc2.data_ptr(); p.pair_w = ptr(pw);
  p.bn_w = ptr(bw); p.bn_b = ptr(bb); p.training = training;
  p.d_fc1 = d1.data_ptr(); p.d_fc1_id = fc1i ? d1i.data_ptr() : nullptr; p.d_fc2 = d2.data_ptr();
  p.d_pair = pw ? dp.data_ptr() : nullptr; p.d_bn_w = dbw.data_ptr(); p.d_bn_b = dbb.data_ptr();
  p.counter = reinterpret_cast<unsigned*>(cnt.data_ptr());
  p.gpart = gpart.data_ptr(); p.dg = dg.data_ptr(); p.dhp = dhp.data_ptr(); p.zbuf = zb.data_ptr(); p.dv = dv.data_ptr();
  p.dudx = dudx.data_ptr(); p.dq = dq.data_ptr(); p.part1 = part1.data_ptr(); p.fin = fin.data_ptr();
  if (cluster > 0) {  // the resident backward (se, double_fc), then the weight-gradient launch
    l.cluster = cluster;
    l.smem = resident_plan(g, accb, u.element_size(), l.threads, l.vec, cluster, true).total;
    const int rb = g.N * cluster;
    dispatch(u.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      constexpr int kV = 16 / sizeof(T);
      if (vec > 1) run_grid(rb, threads, l.smem, [&] { cmpe_se_backward_resident_kernel<T, kV>(p, l); }, cluster);
      else run_grid(rb, threads, l.smem, [&] { cmpe_se_backward_resident_kernel<T, 1>(p, l); }, cluster);
      run_grid(2, 64, 0, [&] { cmpe_se_weight_grads_kernel<T>(p); });
    });
    return {gu, gx, d1, d1i, d2, dp, dbw, dbb};
  }
  dispatch(u.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kV = 16 / sizeof(T);
    if (vec > 1) run_grid(blocks, threads, l.smem, [&] { cmpe_se_backward_kernel<T, kV>(p, l); });
    else run_grid(blocks, threads, l.smem, [&] { cmpe_se_backward_kernel<T, 1>(p, l); });
  });
  return {gu, gx, d1, d1i, d2, dp, dbw, dbb};
}

"""


def _emulator(tmp_dir):
    from torch.utils import cpp_extension

    inc = os.path.join(tmp_dir, "inc")
    os.makedirs(inc, exist_ok=True)
    for name, text in (("cuda_runtime.h", EMU_SHIM), ("cuda_fp16.h", EMU_FP16), ("cuda_bf16.h", EMU_BF16)):
        with open(os.path.join(inc, name), "w") as fh:
            fh.write(text)
    return cpp_extension.load_inline(
        "cmpe_se_cuda_emulator", cpp_sources=[EMU_HARNESS], functions=["emu_forward", "emu_backward"],
        extra_include_paths=[inc, os.path.join(ROOT, "csrc")],
        extra_cflags=["-std=c++20", "-O1", "-fno-strict-aliasing", "-w"], build_directory=tmp_dir)


def _emulated_case(emu, mode, dtype, shape, cl, training, threads=128, blocks=3, splits=2, fold_width=8, padding=0,
                   cluster=0):
    _, c, h, w = shape
    g = torch.Generator().manual_seed(0)
    u64 = torch.randn(*shape, generator=g, dtype=torch.float64) + 0.5
    x64 = torch.randn(*shape, generator=g, dtype=torch.float64)
    p64 = make_params(mode, c, reduction=4, pair_filters=3, fold_width=fold_width, padding=padding, seed=1)
    acc = _acc(dtype)
    fmt = torch.channels_last if cl else torch.contiguous_format

    def build(dt, wdt):
        d = {"u": u64.to(dt).contiguous(memory_format=fmt), "x": x64.to(dt).contiguous(memory_format=fmt)}
        for k in ("fc1_weight", "fc1_identity_weight", "fc2_weight", "pair_weight", "bn_weight", "bn_bias"):
            d[k] = p64[k].to(wdt) if k in p64 else None
        for k in ("running_mean", "running_var"):
            d[k] = p64[k].float().clone() if k in p64 else torch.zeros(0)
        return d

    d, d64, de = build(dtype, acc), build(torch.float64, torch.float64), build(dtype, acc)
    full = 16 // torch.empty(0, dtype=dtype).element_size()
    cl_eff = (cl and c > 1) or h * w == 1
    vec = full if (c % full == 0 if cl_eff else (h * w) % full == 0) else 1
    kw = {"mode": mode, "training": training, "momentum": 0.1, "eps": 1e-5, "fold_width": fold_width,
          "padding": padding}
    launch = [cl_eff, threads, blocks, splits, vec]
    out = emu.emu_forward(*_fwd_args(d, kw), *launch, cluster)
    ref = forward_op_reference(*_fwd_args(d64, kw))
    eag = forward_op_reference(*_fwd_args(de, kw))
    tag = f"{mode}/{dtype}/{shape}/cl={cl}/train={training}"
    for name, o, r, e in zip(("y", "pool_u", "pool_x", "gate", "hidden", "bn_mean", "bn_invstd"), out, ref, eag):
        if o.numel():
            assert_close_rule(o, r, e, name=f"{tag} {name}")
    if mode in PAIR_MODES and training:
        for k in ("running_mean", "running_var"):
            assert_close_rule(d[k], d64[k], de[k], name=f"{tag} {k}")
    dy64 = torch.randn(*shape, generator=g, dtype=torch.float64)
    dy = dy64.to(dtype).contiguous(memory_format=fmt)
    bwd_cluster = cluster if mode in ("se", "double_fc") else 0  # the resident backward's modes
    grads = emu.emu_backward(*_bwd_args(dy, d, out, kw), *launch, bwd_cluster)
    gref = backward_op_reference(*_bwd_args(dy64, d64, ref, kw))
    geag = backward_op_reference(*_bwd_args(dy, de, eag, kw))
    for name, o, r, e in zip(("grad_u", "grad_x", "d_fc1", "d_fc1_id", "d_fc2", "d_pair", "d_bn_w", "d_bn_b"),
                             grads, gref, geag):
        assert o.shape == r.shape, f"{tag} {name}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        if o.numel():
            assert_close_rule(o, r, e, name=f"{tag} {name}")


@pytest.mark.slow
def test_emulated_kernels_match_reference(tmp_path):
    """Every mode, both layouts, training and eval, all dtypes across the cases, vector and
    scalar paths, several samples per block, spatial splits, H*W = 1: the real kernel code."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no host C++ compiler")
    emu = _emulator(str(tmp_path))
    cases = []
    for mode in MODES:
        cases += [
            (mode, torch.float32, (3, 16, 4, 4), False, True, {}),
            (mode, torch.float16, (3, 16, 4, 4), True, False, {}),
            (mode, torch.bfloat16, (7, 32, 8, 8), True, True, {"blocks": 3, "threads": 256}),
            (mode, torch.float64, (5, 48, 3, 5), False, True, {"blocks": 1, "splits": 1, "fold_width": 16,
                                                                "padding": 1}),
            (mode, torch.float32, (2, 9, 3, 3), True, False, {"fold_width": 3}),
            (mode, torch.float16, (2, 24, 1, 1), False, True, {"blocks": 2, "splits": 1}),
        ]
    for mode, dtype, shape, cl, training, extra in cases:
        _emulated_case(emu, mode, dtype, shape, cl, training, **extra)


@pytest.mark.slow
def test_emulated_resident_kernels_match_reference(tmp_path):
    """The resident forward (one cluster per sample, U and X in shared memory, pools exchanged
    through distributed shared memory) in the emulator: every mode whose samples are independent,
    both layouts, clusters of 1 to 4 blocks including slices of unequal size (C or P not a multiple
    of the cluster) and a cluster larger than the split axis allows for the last rank, vector and
    scalar paths, H*W = 1. The backward runs on the resident backward kernel (plus the weight-gradient
    launch) in se and double_fc, on the persistent kernel in the pair modes."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no host C++ compiler")
    emu = _emulator(str(tmp_path))
    cases = []
    for mode in MODES:
        train = mode in ("se", "double_fc")  # pair modes: evaluation only (batch statistics need the grid)
        cases += [
            (mode, torch.float32, (3, 16, 4, 4), False, train, {"cluster": 2}),
            (mode, torch.float16, (2, 16, 4, 4), True, False, {"cluster": 4}),
            (mode, torch.bfloat16, (2, 32, 3, 5), True, train, {"cluster": 4, "threads": 64}),
            (mode, torch.float64, (2, 48, 3, 5), False, False, {"cluster": 1, "fold_width": 16, "padding": 1}),
            (mode, torch.float32, (2, 24, 3, 3), False, train, {"cluster": 4, "fold_width": 8}),
            (mode, torch.float16, (2, 24, 1, 1), False, False, {"cluster": 2}),
        ]
    for mode, dtype, shape, cl, training, extra in cases:
        _emulated_case(emu, mode, dtype, shape, cl, training, **extra)
