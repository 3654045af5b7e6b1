"""Kernel edge cases a user meets without looking for them (issue 13, items 4 and 13).

* Non-finite inputs in a training pair mode: the BatchNorm batch variance must stay NaN / inf,
  as in ``nn.BatchNorm2d`` and the reference, and reach ``running_var`` (a clamp written
  ``v > 0 ? v : 0`` maps NaN to 0 and hides the divergence in the buffers). CPU kernel here; the
  Triton kernel in its interpreter (a fresh process with ``TRITON_INTERPRET=1``); the CUDA kernel
  in the CPU emulator (``tests/emulator``).
* Broadcast (stride-0) and strided upstream gradients (``y.sum().backward()``, ``y.sum((2, 3))``,
  ``y.sum(0)``, a slice of ``torch.cat``): values against the float64 reference, and the CPU
  backward must read them in place rather than materialise a full-size copy.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import assert_close_rule, make_params

from cmpe_se_fused import cmpe_se
from cmpe_se_fused.dispatch import BACKENDS
from cmpe_se_fused.reference import MODES, PAIR_MODES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CPU = not BACKENDS["cpu"].not_supported_reasons()
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="needs the compiled CPU backend (cmpe_se_fused._C)")
WEIGHTS = ("fc1_weight", "fc2_weight", "fc1_identity_weight", "pair_weight", "bn_weight", "bn_bias")


def _layer_args(mode, c, dtype, seed=1):
    p = make_params(mode, c, reduction=4, pair_filters=3, fold_width=8, seed=seed)
    w = {k: p[k].to(torch.float32 if dtype != torch.float64 else dtype) for k in WEIGHTS if k in p}
    stats = {k: p[k].float().clone() for k in ("running_mean", "running_var") if k in p}
    return w, stats


# ---------------------------------------------------------------------------------------------
# item 4: non-finite batch statistics propagate
# ---------------------------------------------------------------------------------------------

def _poisoned(kind, shape=(4, 16, 3, 3), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(*shape, generator=g, dtype=torch.float64)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if kind == "nan":
        u[1, 5, 1, 2] = float("nan")
    else:  # "overflow": finite inputs whose batch variance (~1e50) is beyond fp32 in exact arithmetic too
        u[1] *= 1e25
    return u.to(dtype), x.to(dtype)


def _running_stats_after_one_step(backend, mode, kind):
    u, x = _poisoned(kind)
    w, stats = _layer_args(mode, u.shape[1], u.dtype)
    cmpe_se(u, x, **w, **stats, mode=mode, training=True, fold_width=8, backend=backend)
    return stats["running_mean"], stats["running_var"]


def _same_nonfinite(out, ref, name):
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref)), f"{name}: {out.tolist()} vs reference {ref.tolist()}"
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) or not torch.isnan(ref).all(), \
        f"{name}: {out.tolist()} vs reference {ref.tolist()}"


@needs_cpu
@pytest.mark.parametrize("kind", ["nan", "overflow"])
@pytest.mark.parametrize("mode", PAIR_MODES)
def test_cpu_nonfinite_batch_variance_reaches_running_var(mode, kind):
    rm_ref, rv_ref = _running_stats_after_one_step("reference", mode, kind)
    assert not torch.isfinite(rv_ref).all()  # the case is what it claims to be
    rm, rv = _running_stats_after_one_step("cpu", mode, kind)
    _same_nonfinite(rv, rv_ref, f"{mode}/{kind} running_var")
    _same_nonfinite(rm, rm_ref, f"{mode}/{kind} running_mean")


def test_triton_nonfinite_batch_variance_reaches_running_var():
    """The Triton BN-statistics kernel in the interpreter (a fresh process: TRITON_INTERPRET must be
    set before triton is imported). ``tl.maximum`` is maxNum in the interpreter as on the GPU: it
    drops a NaN operand, the defect this checks for."""
    pytest.importorskip("triton")
    code = (
        "import json, sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "import test_kernel_edge_cases as t\n"
        "from cmpe_se_fused.triton import streaming as tk\n"
        "ok, why = tk.is_available()\n"
        "out = {'ok': ok, 'why': why, 'rows': []}\n"
        "if ok:\n"
        "    for mode in ('pair_1x1', 'folded_3x3'):\n"
        "        for kind in ('nan', 'overflow'):\n"
        "            ref = t._running_stats_after_one_step('reference', mode, kind)\n"
        "            got = t._running_stats_after_one_step('triton', mode, kind)\n"
        "            out['rows'].append([mode, kind, [r.tolist() for r in ref], [g.tolist() for g in got]])\n"
        "print('RESULT' + json.dumps(out))\n")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    if not out["ok"]:
        pytest.skip(f"triton backend unavailable: {out['why']}")
    nan = float("nan")
    for mode, kind, ref, got in out["rows"]:
        for name, r, g in zip(("running_mean", "running_var"), ref, got):
            r = torch.tensor([nan if v is None else v for v in r])
            g = torch.tensor([nan if v is None else v for v in g])
            _same_nonfinite(g, r, f"triton {mode}/{kind} {name}")


@pytest.mark.slow
def test_cuda_kernel_nonfinite_batch_variance_in_emulator():
    """The CUDA forward (csrc/kernels/forward.cuh) in the host emulator (tests/emulator)."""
    import emulator

    if not emulator.have_compiler():
        pytest.skip("no host C++ compiler")
    emu = emulator.build()
    for mode in ("pair_1x1", "folded_3x3"):
        for kind in ("nan", "overflow"):
            rm_ref, rv_ref = _running_stats_after_one_step("reference", mode, kind)
            u, x = _poisoned(kind)
            w, stats = _layer_args(mode, u.shape[1], u.dtype)
            launch = emulator.explicit(mode, tuple(u.shape), u.dtype, threads=64, blocks=2, splits=1, vec=1,
                                       pair_filters=w["pair_weight"].shape[0],
                                       reduction=u.shape[1] // w["fc1_weight"].shape[0])
            emu.emu_forward(u, x, w["fc1_weight"], None, w["fc2_weight"], w["pair_weight"], w["bn_weight"],
                            w["bn_bias"], stats["running_mean"], stats["running_var"], mode, True, 0.1, 1e-5, 8, 0,
                            False, emulator._lvec(launch))
            _same_nonfinite(stats["running_var"], rv_ref, f"cuda {mode}/{kind} running_var")
            _same_nonfinite(stats["running_mean"], rm_ref, f"cuda {mode}/{kind} running_mean")


# ---------------------------------------------------------------------------------------------
# item 13: broadcast and strided upstream gradients
# ---------------------------------------------------------------------------------------------

def _grad_cases(y):
    """(name, loss of y) whose gradient w.r.t. y is broadcast or strided."""
    n, c, h, w = y.shape
    g = torch.Generator().manual_seed(7)
    wc = torch.randn(n, c, generator=g, dtype=torch.float64).to(y.dtype)
    t = torch.randn(c, h, w, generator=g, dtype=torch.float64).to(y.dtype)
    other = torch.randn(n, 3, h, w, generator=g, dtype=torch.float64).to(y.dtype)
    cat_w = torch.randn(n, c + 3, h, w, generator=g, dtype=torch.float64).to(y.dtype)
    return [
        ("sum", lambda y: y.sum()),                                   # strides (0, 0, 0, 0)
        ("sum_hw", lambda y: (y.sum((2, 3)) * wc).sum()),             # (C, 1, 0, 0)
        ("sum_n", lambda y: (y.sum(0) * t).sum()),                    # (0, HW, W, 1)
        ("cat_slice", lambda y: (torch.cat([y, other], 1) * cat_w).sum()),  # (C'HW, HW, W, 1)
        ("transposed", lambda y: (y.transpose(2, 3).contiguous() * t.transpose(1, 2)).sum()),
    ]


def _run_layer(backend, mode, dtype, layout, training, loss_fn, shape=(3, 16, 4, 5)):
    g = torch.Generator().manual_seed(3)
    u = (torch.randn(*shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "cl":
        u, x = u.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    u.requires_grad_(True)
    x.requires_grad_(True)
    w, stats = _layer_args(mode, shape[1], dtype)
    w = {k: v.to(dtype).requires_grad_(True) for k, v in w.items()}
    y = cmpe_se(u, x, **w, **stats, mode=mode, training=training, fold_width=8, backend=backend)
    loss_fn(y).backward()
    return [u.grad, x.grad] + [w[k].grad for k in WEIGHTS if k in w]


@needs_cpu
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("mode", MODES)
def test_cpu_backward_broadcast_and_strided_grads(mode, layout, training):
    probe = torch.zeros(3, 16, 4, 5)
    for name, loss_fn in _grad_cases(probe):
        ref = _run_layer("reference", mode, torch.float64, layout, training, loss_fn)
        eag = _run_layer("reference", mode, torch.float32, layout, training, loss_fn)
        out = _run_layer("cpu", mode, torch.float32, layout, training, loss_fn)
        for i, (o, r, e) in enumerate(zip(out, ref, eag)):
            assert o.shape == r.shape
            assert_close_rule(o, r, e, name=f"{mode}/{layout}/train={training}/{name} grad #{i}")


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cpu_backward_broadcast_grads_other_dtypes(dtype):
    probe = torch.zeros(3, 16, 4, 5)
    for name, loss_fn in _grad_cases(probe)[:3]:
        for mode in ("se", "folded_3x3"):
            ref = _run_layer("reference", mode, torch.float64, "nchw", True, loss_fn)
            eag = _run_layer("reference", mode, dtype, "nchw", True, loss_fn)
            out = _run_layer("cpu", mode, dtype, "nchw", True, loss_fn)
            for i, (o, r, e) in enumerate(zip(out, ref, eag)):
                assert_close_rule(o, r, e, name=f"{mode}/{dtype}/{name} grad #{i}")


def _backward_profile(mode, layout, loss_fn, shape=(4, 32, 16, 16)):
    """(grad_y strides as cmpe_se::backward receives them, ops run inside it, bytes it allocates)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.cmpe_se.backward.default:
                seen.append(args[0].stride())
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    u = torch.randn(*shape, generator=g)
    x = torch.randn(*shape, generator=g)
    if layout == "cl":
        u, x = u.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    u.requires_grad_(True)
    w, stats = _layer_args(mode, shape[1], u.dtype)
    y = cmpe_se(u, x, **w, **stats, mode=mode, training=True, fold_width=8, backend="cpu")
    loss = loss_fn(y)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                record_shapes=True) as prof:
        loss.backward()
    events = prof.events()
    bwd = [e for e in events if e.name == "cmpe_se::backward"]
    assert len(bwd) == 1, [e.name for e in events]
    b = bwd[0]

    def inside(e):
        return e is not b and e.time_range.start >= b.time_range.start and e.time_range.end <= b.time_range.end \
            and e.thread == b.thread

    full_shape = list(shape)
    ops = [e.name + ("(full)" if full_shape in e.input_shapes else "") for e in events if inside(e)]
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in events if inside(e) or e is b)
    # the strides the op receives (the autograd path must pass grad_y through untouched)
    y2 = cmpe_se(u, x, **w, **stats, mode=mode, training=True, fold_width=8, backend="cpu")
    with Spy():
        loss_fn(y2).backward()
    return seen, ops, allocated, u.numel() * u.element_size()


@needs_cpu
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("mode", ["se", "folded_3x3"])
def test_cpu_backward_reads_broadcast_grad_in_place(mode, layout):
    """``y.sum().backward()`` hands the op a stride-0 gradient: the op must neither copy it
    (no full-size aten::copy_/clone under cmpe_se::backward) nor allocate more than its two outputs
    (dU, dX) plus small buffers."""
    # y.sum(0) keeps the NCHW layout of the sum: dense per sample in NCHW, read in place only when U is NCHW
    # (the kernels read dY and U in one layout; a channels_last U with it needs the one copy)
    for name, loss_fn in _grad_cases(torch.zeros(4, 32, 16, 16))[:3 if layout == "nchw" else 2]:
        seen, ops, allocated, full = _backward_profile(mode, layout, loss_fn)
        assert seen and all(0 in s for s in seen), f"{name}: cmpe_se::backward got grad_y strides {seen}"
        copies = [o for o in ops if o in ("aten::copy_(full)", "aten::clone(full)", "aten::contiguous(full)")]
        assert not copies, f"{mode}/{layout}/{name}: the backward copies grad_y: {ops}"
        assert allocated < 2 * full + full // 4, \
            f"{mode}/{layout}/{name}: the backward allocated {allocated} bytes (one full tensor: {full})"


@needs_cpu
def test_cpu_backward_reads_sliced_grad_in_place():
    """A channel slice of torch.cat's gradient is dense per sample (NCHW): read in place too."""
    loss_fn = _grad_cases(torch.zeros(4, 32, 16, 16))[3][1]
    seen, ops, allocated, full = _backward_profile("se", "nchw", loss_fn)
    assert seen and seen[0][0] != 32 * 16 * 16, seen  # not contiguous: the sample stride is the cat's
    assert not [o for o in ops if o in ("aten::copy_(full)", "aten::clone(full)", "aten::contiguous(full)")], ops
    assert allocated < 2 * full + full // 4, allocated
