"""``cmpe_se::infer``: ``cmpe_se::forward(..., training=False)``'s y alone, for inference calls.

It must give forward's y bitwise (same kernels) and touch nothing else; it has the op-layer
contract of every op (schema string, opcheck, named errors before any write); its Autograd kernel
raises when a gradient could be needed; and a layer's call plan uses it exactly when no gradient
can be needed (eval under no_grad / inference_mode), never when one can (eval with grad mode on)."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_params

from cmpe_se_fused import CMPESE, ops
from cmpe_se_fused.reference import MODES, PAIR_MODES

needs_c = pytest.mark.skipif(not ops.HAS_C, reason=f"cmpe_se_fused._C not built: {ops.EXTENSION_STATUS.get('_C')}")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(mode, dtype=torch.float64, channels_last=False, pad=0, requires_grad=False, shape=(3, 16, 3, 2)):
    """(u, x, fc1, fc1_id, fc2, pair_w, bn_w, bn_b, running_mean, running_var): the tensors both ops take."""
    prm = make_params(mode, shape[1], fold_width=4, padding=pad, pair_filters=2)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = {k: v.to(acc) for k, v in prm.items()}
    for k in ("fc1_weight", "fc1_identity_weight", "fc2_weight", "pair_weight", "bn_weight", "bn_bias"):
        if k in w:
            w[k].requires_grad_(requires_grad)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        u, x = u.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    u.requires_grad_(requires_grad)
    x.requires_grad_(requires_grad)
    return (u, x, w["fc1_weight"], w.get("fc1_identity_weight"), w["fc2_weight"], w.get("pair_weight"),
            w.get("bn_weight"), w.get("bn_bias"), w.get("running_mean"), w.get("running_var"))


def _infer(t, mode, pad=0, eps=1e-5):
    return torch.ops.cmpe_se.infer(*t, mode, eps, 4, pad)


def _forward(t, mode, pad=0, eps=1e-5):
    empty = t[0].new_empty(0, dtype=t[2].dtype)
    rm = t[8] if t[8] is not None else empty
    rv = t[9] if t[9] is not None else empty.clone()
    return torch.ops.cmpe_se.forward(*t[:8], rm, rv, mode, False, 0.1, eps, 4, pad)[0]


@needs_c
def test_schema_matches_the_python_string():
    assert ops.schema_of("infer") == str(torch._C.parse_schema(f"cmpe_se::infer{ops.INFER_SCHEMA}"))


@needs_c
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_infer_is_forwards_y_bitwise(mode, dtype, channels_last):
    for pad in ((0, 1) if mode == "folded_3x3" else (0,)):
        t = _args(mode, dtype, channels_last, pad)
        stats = [None if s is None else s.clone() for s in t[8:]]
        y = _infer(t, mode, pad)
        assert y.dtype == dtype and y.shape == t[0].shape
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.equal(y, _forward(t, mode, pad))
        for s, before in zip(t[8:], stats):  # the running statistics are only read
            assert (s is None) == (before is None) and (s is None or torch.equal(s, before))


@needs_c
@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    torch.library.opcheck(torch.ops.cmpe_se.infer.default, _args(mode) + (mode, 1e-5, 4, 0))


@needs_c
def test_a_gradient_that_could_be_needed_raises():
    t = _args("folded_3x3", requires_grad=True)
    with pytest.raises(RuntimeError, match="cmpe_se::infer: an input requires grad.*has no backward"):
        _infer(t, "folded_3x3")
    with torch.no_grad():  # nothing can need a gradient: fine, and no graph
        y = _infer(t, "folded_3x3")
    assert y.grad_fn is None and not y.requires_grad
    with torch.inference_mode():
        assert torch.equal(_infer(t, "folded_3x3"), y)


@needs_c
@pytest.mark.parametrize("index,name,match", [
    (4, "fc2_weight", "fc2_weight must have shape"),
    (8, "running_mean", "running_mean is required in mode 'folded_3x3'"),
    (9, "running_var", "running_var is required in mode 'folded_3x3'"),
    (5, "pair_weight", "pair_weight is required in mode 'folded_3x3'"),
])
def test_errors_name_the_argument(index, name, match):
    t = list(_args("folded_3x3"))
    t[index] = None if index != 4 else t[4][:, :1].contiguous()
    with pytest.raises(RuntimeError, match=f"cmpe_se::infer: {match}"):
        _infer(t, "folded_3x3")
    with pytest.raises(RuntimeError, match="cmpe_se::infer: mode must be one of"):
        _infer(_args("se"), "sse")


def _count_infer(monkeypatch, plan):
    """Count the plan's inference calls, whichever entry it takes (the C++ entry of _fastpath, or torch.ops)."""
    calls = []
    real = plan.infer

    def counted(*a):
        calls.append(1)
        return real(*a)
    monkeypatch.setattr(plan, "infer", counted)
    if plan.fast is not None:
        fast = plan.fast

        class CountedFast:
            def infer(self, *a):
                calls.append(1)
                return fast.infer(*a)

            def forward(self, *a):
                return fast.forward(*a)
        monkeypatch.setattr(plan, "fast", CountedFast())
    return calls


@needs_c
@pytest.mark.parametrize("mode", ["se", "folded_3x3"])
def test_the_plan_uses_infer_exactly_when_no_gradient_can_be_needed(monkeypatch, mode):
    torch.manual_seed(0)
    m = CMPESE(64, mode=mode, backend="cpu", **({"fold_width": 8} if mode in PAIR_MODES else {})).double().eval()
    u, x = torch.randn(2, 64, 4, 4, dtype=torch.float64), torch.randn(2, 64, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        y_full = m(u, x)  # the full path records the plan
    plan = m._host_plans[0]
    assert plan.infer is not None
    calls = _count_infer(monkeypatch, plan)
    with torch.no_grad():
        assert torch.equal(m(u, x), y_full)
    with torch.inference_mode():
        assert torch.equal(m(u, x), y_full)
    assert len(calls) == 2
    # eval with grad mode on: the weights require grad (eval-mode fine-tuning), so the forward op runs
    # and the output is part of the graph
    y = m(u, x)
    assert len(calls) == 2 and y.grad_fn is not None and torch.equal(y.detach(), y_full)
    y.sum().backward()
    assert m.fc1.weight.grad is not None
    # training: no inference op at all
    m.train()
    m(u, x)
    assert m._host_plans[1] is not None and m._host_plans[1].infer is None


@needs_c
def test_fresh_process_default_layer_under_no_grad():
    """What a user runs: a default layer in eval, called twice under no_grad (the second call replays
    through cmpe_se::infer), the same bits as the first."""
    code = ("import torch, cmpe_se_fused\n"
            "m = cmpe_se_fused.CMPESE(64).eval()\n"
            "u, x = torch.randn(2, 64, 8, 8), torch.randn(2, 64, 8, 8)\n"
            "with torch.no_grad():\n"
            "    y1 = m(u, x); y2 = m(u, x)\n"
            "assert torch.equal(y1, y2)\n"
            "assert m._host_plans[0] is not None and m._host_plans[0].infer is not None\n"
            "print('ok', m._host_plans[0].backend)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["ok", "cpu"]


def _fastpath_built():
    info = ops.BUILD_INFO or {}
    return "_fastpath" in info.get("planned", []) and "_fastpath" not in info.get("skipped", {})


@needs_c
def test_the_fastpath_entry_is_built_and_used():
    """Where the build planned it, cmpe_se_fused._fastpath imports and the cpu plans call through it; its
    calls give bitwise what torch.ops gives (training forward with its running-statistics update, eval)."""
    from cmpe_se_fused import hostpath
    if not _fastpath_built():
        pytest.skip("cmpe_se_fused._fastpath is not in this build")
    assert hostpath._fastpath is not None
    torch.manual_seed(0)
    m = CMPESE(64, mode="folded_3x3", fold_width=8, backend="cpu").double()
    u, x = torch.randn(2, 64, 4, 4, dtype=torch.float64), torch.randn(2, 64, 4, 4, dtype=torch.float64)
    m(u, x)
    plan = m._host_plans[1]
    assert plan.fast is not None
    bn = m.pair_bn
    before = (bn.running_mean.clone(), bn.running_var.clone())
    y_fast = plan.fast.forward(u, x)
    after_fast = (bn.running_mean.clone(), bn.running_var.clone())
    bn.running_mean.copy_(before[0])
    bn.running_var.copy_(before[1])
    y_ops = plan.op(u, x, *plan.args)[0]
    assert torch.equal(y_fast, y_ops) and y_fast.grad_fn is not None
    assert torch.equal(after_fast[0], bn.running_mean) and torch.equal(after_fast[1], bn.running_var)
    assert not torch.equal(after_fast[0], before[0])  # the update happened, the same in both
    m.eval()
    with torch.no_grad():
        m(u, x)
        ev = m._host_plans[0]
        assert torch.equal(ev.fast.infer(u, x), ev.infer(u, x, *ev.infer_args))


@needs_c
def test_a_torch_function_mode_sees_the_replayed_op():
    """The C++ entry skips Python's __torch_function__ handling, so under a torch function mode the plan
    calls torch.ops, and the mode sees the op as it would without a plan."""
    from torch.overrides import TorchFunctionMode

    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.funcs = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.funcs.append(func)
            return func(*args, **(kwargs or {}))

    m = CMPESE(64, mode="se", backend="cpu").eval()
    u, x = torch.randn(2, 64, 4, 4), torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        y = m(u, x)
        assert m._host_plans[0] is not None
        with Seen() as seen:
            assert torch.equal(m(u, x), y)
    assert torch.ops.cmpe_se.infer.default in seen.funcs, seen.funcs
