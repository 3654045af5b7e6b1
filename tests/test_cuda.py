"""The CUDA backend (``cmpe_se_fused._C_cuda``): registration and ptxas resources (no GPU
needed), then the kernels against the op contract on a GPU (``-m cuda``).

GPU tests compare ``torch.ops.cmpe_se.forward/backward`` on CUDA with
``reference.forward_op_reference/backward_op_reference`` run in float64 (the truth) and in the
test dtype (the eager error that sets the tolerance, conftest.assert_close_rule).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import assert_close_rule, make_params
from emulator import bwd_args, fwd_args

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
            "for op in ('cmpe_se::forward', 'cmpe_se::backward', 'cmpe_se::infer'):\n"
            "    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, 'CUDA'), op\n"
            "    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, 'CPU'), op\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                         cwd=ROOT)
    assert res.returncode == 0, f"importing _C_cuda failed (rc {res.returncode}):\n{res.stderr[-3000:]}"


PTXAS_FN = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(text: str) -> dict[str, dict[str, int]]:
    """``{kernel: {regs, stack, spill_st, spill_ld}}`` from an ``-Xptxas -v`` report (gpu_check's ptxas.txt)."""
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


MAIN_KERNELS = ("cmpe_se_forward_kernel", "cmpe_se_backward_kernel", "cmpe_se_forward_resident_kernel",
                "cmpe_se_backward_resident_kernel", "cmpe_se_weight_grads_kernel")


def _built_resources():
    from emulator.resources import read_resources

    res, why = read_resources()
    if why:
        pytest.skip(why)
    return res


def test_kernel_resources_no_spills_no_stack():
    """Every cmpe_se kernel of the built extension, every architecture it was built for: no local
    memory (spills or a stack frame). Read from the .so with cuobjdump --dump-resource-usage (no
    recompilation); skipped when the extension is not built or is older than csrc/."""
    res = _built_resources()
    assert res, "no cmpe_se kernels in the extension"
    for arch, kernels in sorted(res.items()):
        for name in MAIN_KERNELS:
            assert any(k.startswith(name + "<") for k in kernels), f"{arch}: {name} missing ({sorted(kernels)})"
        # sm_90 (the target): no stack frame and no local memory at all; other architectures: no
        # local memory (spills); their stack frames are printed (sm_80: an 8-byte frame in the
        # fp64 forward, 2026-11-30)
        bad = {k: v for k, v in kernels.items()
               if v.get("LOCAL", 0) or (arch.startswith("sm_90") and v.get("STACK", 0))}
        assert not bad, f"{arch}: kernels with local memory (spills / stack):\n" + "\n".join(
            f"  {k}: {v}" for k, v in sorted(bad.items()))
        sys.stdout.write("".join(f"{arch} {k}: {v}\n" for k, v in sorted(kernels.items())))


def test_kernels_compile_for_sm80(tmp_path):
    """sm_80 (A100) must compile too: the cluster code of the resident kernels is sm_90-only and
    guarded (docs/CUDA.md). From the built extension when it has sm_80 code (every kernel present,
    no local memory / spills); otherwise the float32 forward and backward units are compiled for sm_80
    (CI's sm_90-only build), unoptimised: the guards of the sm_90-only code are checked by the front
    end and the sm_80 assembler at any optimisation level (an unguarded cluster call fails the same
    way), and -Xcicc -O0 -Xptxas -O0 takes 13 s instead of 91 s per unit."""
    from emulator.resources import read_resources

    res, _ = read_resources()
    if "sm_80" in res:
        kernels = res["sm_80"]
        for name in MAIN_KERNELS:
            assert any(k.startswith(name + "<") for k in kernels), f"sm_80: {name} missing"
        bad = {k: v for k, v in kernels.items() if v.get("LOCAL", 0)}
        assert not bad, f"sm_80: local memory (spills) in {bad}"
        return
    if _nvcc() is None:
        pytest.skip("nvcc not found and the extension has no sm_80 code")
    srcs = [os.path.join(ROOT, "csrc", "cuda", f) for f in ("forward_f32.cu", "backward_f32.cu")]

    def compile_one(src):
        cmd = [_nvcc(), "-c", "-arch=sm_80", "-O1", "-Xcicc", "-O0", "-Xptxas=-O0", "-std=c++17",
               "--expt-relaxed-constexpr", "-I",
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


_fwd_args, _bwd_args = fwd_args, bwd_args  # the op argument order, shared with the emulator


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


# ---- the real kernels on the CPU: a thread-per-GPU-thread emulator (no GPU needed) -----------
#
# tests/emulator/: the device code (csrc/kernels/*.cuh) and the launch planner
# (csrc/cuda/launch_plan.cuh) compiled by the host compiler against a small shim in which every GPU
# thread is a fiber (a user-space context; a launch's fibers take turns on one OS thread, switching
# where a GPU thread waits). Built once per session (and cached by a hash of its sources under build/).
# Bytes moved and coalescing: tests/test_gpu_evidence.py.

def _emu():
    import emulator

    if not emulator.have_compiler():
        pytest.skip("no host C++ compiler")
    emulator.build()
    return emulator


def _emulated_case(mode, dtype, shape, cl, training, threads=128, blocks=3, splits=2, fold_width=8, padding=0,
                   cluster=0, per_sample=False, eps=1e-5, momentum=0.1, seed=0):
    E = _emu()
    layout = "channels_last" if cl else "nchw"
    geo = {"fold_width": fold_width, "padding": padding}
    fl = E.explicit(mode, shape, dtype, layout=layout, threads=threads, blocks=blocks, splits=splits, cluster=cluster,
                    per_sample=per_sample, **geo)
    bwd_cluster = cluster if mode in ("se", "double_fc") else 0  # the resident backward's modes
    bl = E.explicit(mode, shape, dtype, layout=layout, backward=True, threads=threads, blocks=blocks, splits=splits,
                    cluster=bwd_cluster, **geo)
    E.run_case(mode, dtype, shape, layout, training, fl, bl, eps=eps, momentum=momentum, seed=seed, **geo)


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(PAIR_MODES))
def test_emulated_eps_and_momentum(mode):
    """Non-default BatchNorm eps and momentum (the pair modes) on every kernel path that reads them:
    the persistent forward in training (batch statistics, eps, the running-stat update with momentum)
    and in evaluation (running statistics and eps), the per-sample and the resident forward in
    evaluation (eps folded into the excitation). Defaults (1e-5, 0.1) would hide a hard-coded value."""
    kw = {"eps": 0.3, "momentum": 0.35}
    for training in (True, False):
        _emulated_case(mode, torch.float32, (3, 16, 4, 4), mode == "pair_1x1", training, **kw)
    _emulated_case(mode, torch.float32, (3, 16, 4, 4), False, False, per_sample=True, **kw)
    _emulated_case(mode, torch.float32, (2, 16, 4, 4), True, False, cluster=2, **kw)


@pytest.mark.slow
def test_emulated_kernels_match_reference():
    """Every mode, both layouts, training and eval, all dtypes across the cases, vector and
    scalar paths, several samples per block, spatial splits, H*W = 1: the real kernel code on
    hand-picked tiny grids (the planner's own launches: test_emulated_planner_paths)."""
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
        _emulated_case(mode, dtype, shape, cl, training, **extra)


@pytest.mark.slow
def test_emulated_resident_kernels_match_reference():
    """The resident forward (one cluster per sample, U and X in shared memory, pools exchanged
    through distributed shared memory) in the emulator: every mode whose samples are independent,
    both layouts, clusters of 1 to 4 blocks including slices of unequal size (C or P not a multiple
    of the cluster) and a cluster larger than the split axis allows for the last rank, vector and
    scalar paths, H*W = 1. The backward runs on the resident backward kernel (plus the weight-gradient
    launch) in se and double_fc, on the persistent kernel in the pair modes."""
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
        _emulated_case(mode, dtype, shape, cl, training, **extra)


# Scaled-down shapes on which the planner of the emulated device (tests/emulator TINY: 2 SMs,
# 24 KB of shared memory per block, sm_90) picks every path it has: the persistent grid with and
# without splits, the per-sample grid, and resident clusters of several sizes
# (test_planner_picks_every_path checks the coverage).
PLANNER_CASES = [
    # mode, dtype, shape, layout, training, path
    ("se", torch.float32, (2, 16, 4, 4), "nchw", True, "resident"),
    ("double_fc", torch.float32, (2, 32, 8, 8), "nchw", True, "resident"),
    ("se", torch.float16, (2, 32, 12, 12), "channels_last", False, "resident"),
    ("se", torch.float32, (2, 16, 12, 12), "channels_last", True, "resident"),
    ("folded_3x3", torch.float32, (2, 32, 16, 16), "nchw", False, "resident"),
    ("pair_1x1", torch.bfloat16, (2, 16, 8, 8), "nchw", False, "resident"),
    ("folded_3x3", torch.float32, (3, 16, 6, 6), "nchw", True, "resident"),   # training pair: persistent
    ("pair_2x1", torch.bfloat16, (3, 24, 5, 5), "channels_last", False, "per_sample"),
    ("se", torch.float32, (1, 8, 32, 32), "nchw", True, "persistent"),       # splits of long rows
    ("pair_1x1", torch.float64, (2, 16, 3, 3), "nchw", True, "persistent"),
]


def _fold(shape):
    return {"fold_width": 8 if shape[1] % 8 == 0 else 4}


def _plans(case):
    mode, dtype, shape, layout, training, path = case
    E = _emu()
    fl = E.plan(mode, shape, dtype, layout=layout, training=training, path=path, **_fold(shape))
    bl = E.plan(mode, shape, dtype, layout=layout, training=training, path=path, backward=True, **_fold(shape))
    return fl, bl


def test_planner_picks_every_path():
    """Over PLANNER_CASES the planner (csrc/cuda/launch_plan.cuh, the binding's) picks the persistent
    grid with and without splits, the per-sample grid, the resident kernels with at least three
    cluster sizes, and never fewer than 128 threads (the binding's clamp)."""
    kinds, clusters = set(), set()
    for case in PLANNER_CASES:
        fl, bl = _plans(case)
        assert fl["threads"] >= 128 and bl["threads"] >= 128
        for launch in (fl, bl):
            kinds.add("resident" if launch["cluster"] else "per_sample" if launch["per_sample"] else
                      "persistent_split" if launch["splits"] > 1 else "persistent")
            if launch["cluster"]:
                clusters.add(launch["cluster"])
        if case[0] in PAIR_MODES and case[4]:  # training pair modes: batch statistics need the grid
            assert fl["cluster"] == 0 and not fl["per_sample"]
    assert kinds == {"resident", "per_sample", "persistent_split", "persistent"}, kinds
    assert len(clusters) >= 3 and 1 in clusters, clusters


@pytest.mark.slow
@pytest.mark.parametrize("case", PLANNER_CASES, ids=lambda c: f"{c[0]}-{c[3]}-{c[5]}")
def test_emulated_planner_paths(case):
    """The launches the binding would pick (csrc/cuda/launch_plan.cuh, shared with bindings.cpp:
    path, grid, threads >= 128, splits, cluster size, shared memory, workspace layout) run in the
    emulator against the float64 reference."""
    mode, dtype, shape, layout, training, _ = case
    fl, bl = _plans(case)
    _emu().run_case(mode, dtype, shape, layout, training, fl, bl, **_fold(shape))
