"""The op layer: schemas, opcheck, torch.compile, autograd, determinism, autocast.

Runs through the compiled CPU backend (``cmpe_se::forward/backward`` on CPU tensors); skips with
a reason when ``cmpe_se_fused._C`` is not built. (Under Triton's interpreter, fake-tensor
tracing of Triton ops breaks, so the Triton kernels are tested by direct calls in
``test_triton.py``.)"""
import copy

import pytest
import torch
from conftest import make_params

from cmpe_se_fused import CMPESE, CMPESEReference, ops
from cmpe_se_fused.models.networks import PreActBasicBlock
from cmpe_se_fused.reference import MODES, PAIR_MODES

needs_c = pytest.mark.skipif(not ops.HAS_C, reason=f"cmpe_se_fused._C not built: {ops.EXTENSION_STATUS.get('_C')}")
CASES = [(m, t) for m in MODES for t in (True, False)]


def _op_args(mode, training, dtype=torch.float64, shape=(3, 16, 3, 2), requires_grad=False, pad=0):
    torch.manual_seed(0)
    prm = make_params(mode, shape[1], fold_width=4, padding=pad, pair_filters=2, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = {k: (v.to(acc).requires_grad_(requires_grad) if k not in ("running_mean", "running_var") else v.to(acc))
         for k, v in prm.items()}
    empty = torch.empty(0, dtype=acc)
    u = torch.randn(shape, dtype=dtype).requires_grad_(requires_grad)
    x = torch.randn(shape, dtype=dtype).requires_grad_(requires_grad)
    return (u, x, w["fc1_weight"], w.get("fc1_identity_weight"), w["fc2_weight"], w.get("pair_weight"),
            w.get("bn_weight"), w.get("bn_bias"), w.get("running_mean", empty), w.get("running_var", empty.clone()),
            mode, training, 0.1, 1e-5, 4, pad)


@needs_c
def test_schemas_match_python_strings():
    """csrc/ops.cpp and ops.py (the Triton ops) declare the same schema, argument for argument."""
    for name, py in (("forward", ops.FORWARD_SCHEMA), ("backward", ops.BACKWARD_SCHEMA)):
        assert ops.schema_of(name) == str(torch._C.parse_schema(f"cmpe_se::{name}{py}"))
        assert ops.schema_of("triton_" + name) == str(torch._C.parse_schema(f"cmpe_se::triton_{name}{py}"))


@needs_c
@pytest.mark.parametrize("mode,training", CASES)
def test_opcheck_forward(mode, training):
    torch.library.opcheck(torch.ops.cmpe_se.forward.default, _op_args(mode, training, requires_grad=True))


@needs_c
@pytest.mark.parametrize("mode,training", CASES)
def test_opcheck_backward(mode, training):
    args = _op_args(mode, training)
    y, pu, px, gate, hidden, mean, invstd = torch.ops.cmpe_se.forward(*args)
    u, _x, fc1, fc1i, fc2, pw, bw, bb = args[:8]
    bargs = (torch.randn_like(y), u, pu, px, gate, hidden, mean, invstd, fc1, fc1i, fc2, pw, bw, bb, mode, training,
             4, 0)
    torch.library.opcheck(torch.ops.cmpe_se.backward.default, bargs)


@needs_c
@pytest.mark.parametrize("mode,training", CASES)
def test_gradcheck_through_op(mode, training):
    args = _op_args(mode, training, requires_grad=True, shape=(3, 8, 2, 1))
    tensors = [i for i, a in enumerate(args[:8]) if isinstance(a, torch.Tensor)]
    stats = (args[8].clone(), args[9].clone())

    def f(*ts):
        full = list(args)
        for i, t in zip(tensors, ts):
            full[i] = t
        full[8], full[9] = stats[0].clone(), stats[1].clone()
        return torch.ops.cmpe_se.forward(*full)[0]

    assert torch.autograd.gradcheck(f, [args[i] for i in tensors], eps=1e-6, atol=1e-6, fast_mode=True)


@needs_c
def test_double_backward_raises():
    args = _op_args("folded_3x3", True, requires_grad=True)
    y = torch.ops.cmpe_se.forward(*args)[0]
    (gu,) = torch.autograd.grad(y.sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        gu.sum().backward()


@needs_c
@pytest.mark.parametrize("mode,training", CASES)
def test_deterministic(mode, training):
    outs = []
    for _ in range(2):
        args = _op_args(mode, training, torch.float32, shape=(4, 32, 5, 5), requires_grad=True)
        y = torch.ops.cmpe_se.forward(*args)[0]
        grads = torch.autograd.grad(y, [a for a in args[:8] if isinstance(a, torch.Tensor)], torch.ones_like(y))
        outs.append((y, grads, args[8], args[9]))
    (y1, g1, m1, v1), (y2, g2, m2, v2) = outs
    assert torch.equal(y1, y2) and torch.equal(m1, m2) and torch.equal(v1, v2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def _grads(module, inputs):
    """Gradients of the inputs and of every parameter, by name."""
    out = {f"input{i}": t.grad for i, t in enumerate(inputs)}
    out.update({name: p.grad for name, p in module.named_parameters()})
    return out


def _assert_grads_close(got, want, rtol, atol):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] is not None and want[name] is not None, f"{name}: no gradient"
        assert want[name].abs().max() > 0, f"{name}: the reference gradient is all zero (degenerate case)"
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@needs_c
@pytest.mark.parametrize("mode", MODES)
def test_compile_module_fullgraph(mode):
    """The compiled module (aot_eager) gives the reference's output, running statistics and the
    gradients of both inputs and of every weight."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = CMPESE(32, mode=mode, fold_width=8, reduction=8, backend="cpu")
    ref = CMPESEReference(32, mode=mode, fold_width=8, reduction=8)
    ref.load_state_dict(m.state_dict())
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    inputs = [torch.randn(4, 32, 3, 3, requires_grad=True), torch.randn(4, 32, 3, 3, requires_grad=True)]
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = cm(*inputs)
    y_ref = ref(*ref_inputs)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    _assert_grads_close(_grads(m, inputs), _grads(ref, ref_inputs), rtol=1e-4, atol=1e-5)
    if mode in PAIR_MODES:  # the mutation of the running stats survives functionalization
        torch.testing.assert_close(m.pair_bn.running_mean, ref.pair_bn.running_mean)
        torch.testing.assert_close(m.pair_bn.running_var, ref.pair_bn.running_var)
        assert int(m.pair_bn.num_batches_tracked) == 1


@needs_c
def test_compile_resnet_block_inductor():
    """A network block through inductor: output, input gradient and every weight gradient equal the
    eager block's (same backend, same weights)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = PreActBasicBlock(16, 32, 2, "folded_3x3", {"backend": "cpu", "reduction": 8}, fold_width=8)
    eager = copy.deepcopy(block)
    cblock = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    x_eager = x.detach().clone().requires_grad_(True)
    y = cblock(x)
    y_eager = eager(x_eager)
    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-4)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_eager.backward(gy)
    _assert_grads_close(_grads(block, [x]), _grads(eager, [x_eager]), rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(block.named_buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"{n}: {m}")


@needs_c
@pytest.mark.parametrize("mode", PAIR_MODES)
def test_bn_momentum_none_and_eps_through_module(mode):
    """``bn_momentum=None`` (cumulative average) and a non-default eps, over three training steps
    and one evaluation step: outputs, gradients and running statistics as the reference."""
    torch.manual_seed(0)
    m = CMPESE(32, mode=mode, fold_width=8, reduction=4, pair_filters=3, bn_eps=0.25, bn_momentum=None,
               backend="cpu").double()
    ref = CMPESEReference(32, mode=mode, fold_width=8, reduction=4, pair_filters=3, bn_eps=0.25,
                          bn_momentum=None).double()
    ref.load_state_dict(m.state_dict())
    for step in range(4):
        m.train(step < 3)
        ref.train(step < 3)
        inputs = [(torch.randn(3, 32, 2, 3, dtype=torch.float64) + step).requires_grad_(True) for _ in range(2)]
        ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
        y, y_ref = m(*inputs), ref(*ref_inputs)
        torch.testing.assert_close(y, y_ref)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        _assert_grads_close(_grads(m, inputs), _grads(ref, ref_inputs), rtol=1e-7, atol=1e-9)
        m.zero_grad()
        ref.zero_grad()
        for name, b in ref.named_buffers():
            torch.testing.assert_close(dict(m.named_buffers())[name], b, msg=lambda s, n=name: f"step {step} {n}: {s}")


@needs_c
def test_autocast_policy():
    m = CMPESE(32, mode="folded_3x3", fold_width=8, backend="cpu").eval()
    ref = CMPESEReference(32, mode="folded_3x3", fold_width=8).eval()
    ref.load_state_dict(m.state_dict())
    u, x = torch.randn(2, 32, 4, 4), torch.randn(2, 32, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(u, x)
    assert y.dtype == torch.bfloat16
    assert m.fc1.weight.dtype == torch.float32
    torch.testing.assert_close(y, ref(u.bfloat16(), x.bfloat16()), rtol=1.6e-2, atol=1e-2)
