"""The thin call path (cmpe_se_fused/hostpath.py): a layer's call plan, recorded by a successful full
call, must give bitwise what the full path gives, and every change the plan depends on must send the
next call the full way (with its checks and errors). Also: the C++ autograd kernel of cmpe_se::forward
and the batch count under activation checkpointing (issue 25 item 7)."""
import copy
import io
import os
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cmpe_se_fused import CMPESE, CMPESEReference, dispatch, functional, hostpath
from cmpe_se_fused.dispatch import BACKENDS

HAS_CPU = not BACKENDS["cpu"].not_supported_reasons(torch.empty(1))
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="needs the compiled CPU extension (cmpe_se_fused._C)")
MODES = ("se", "folded_3x3")


def _layer(mode, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    extra = {"fold_width": 8} if mode == "folded_3x3" else {}
    m = CMPESE(64, mode=mode, backend="cpu", **extra, **kw).to(dtype)
    if mode == "folded_3x3":  # non-trivial statistics, so a stale eps / momentum shows
        with torch.no_grad():
            m.pair_bn.running_mean.uniform_(-1, 1)
            m.pair_bn.running_var.uniform_(0.5, 2)
    return m


def _inputs(n=2, dtype=torch.float64, hw=4):
    g = torch.Generator().manual_seed(n * 10 + hw)
    return (torch.randn(n, 64, hw, hw, generator=g, dtype=dtype), torch.randn(n, 64, hw, hw, generator=g,
                                                                                  dtype=dtype))


def _check_against_full(m, u, x):
    """``m(u, x)`` (possibly through its plan) equals a plan-less copy's full call, bitwise, output
    and buffers (the copy is taken before the call)."""
    fresh = copy.deepcopy(m)  # a deep copy carries no plan: its call takes the full path
    assert fresh._host_plans == [None, None]
    y = m(u, x)
    y_full = fresh(u, x)
    assert torch.equal(y, y_full)
    for (name, a), (_, b) in zip(m.named_buffers(), fresh.named_buffers()):
        assert torch.equal(a, b), name
    return y


@needs_cpu
@pytest.mark.parametrize("mode", MODES)
def test_plan_is_recorded_and_replays_the_full_path(mode):
    m = _layer(mode).eval()
    u, x = _inputs()
    with torch.no_grad():
        _check_against_full(m, u, x)
        plan = m._host_plans[0]
        assert plan is not None and torch.equal(plan.replay(m, u, x), m(u, x))
        _check_against_full(m, u, x)
    ref = CMPESEReference(64, mode=mode, **({"fold_width": 8} if mode == "folded_3x3" else {})).double().eval()
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(u, x), ref(u, x))


@needs_cpu
@pytest.mark.parametrize("mode", MODES)
def test_shape_and_dtype_changes_take_the_full_path(mode):
    m = _layer(mode).eval()
    for n, hw in ((2, 4), (3, 4), (2, 8), (2, 4)):
        _check_against_full(m, *_inputs(n, hw=hw))
        assert m._host_plans[0].shape == (n, 64, hw, hw)
    # float32 inputs with float64 weights: the full path (weights cast to fp32) every call
    u, x = _inputs(dtype=torch.float32)
    y = _check_against_full(m, u, x)
    assert y.dtype == torch.float32 and m._host_plans[0] is None  # not replayable: no plan
    with pytest.raises(ValueError, match="u must have 64 channels"):
        m(torch.randn(2, 32, 4, 4, dtype=torch.float64), torch.randn(2, 32, 4, 4, dtype=torch.float64))
    u, x = _inputs()
    with pytest.raises(TypeError, match="x must have the same dtype as u"):
        m(u, x.float())
    with pytest.raises(ValueError, match="x must have the same shape as u"):
        m(u, x[:1])
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        m(u, x.numpy())


@needs_cpu
def test_to_another_device_invalidates_the_plan():
    m = _layer("folded_3x3").eval()
    m.backend = "auto"
    u, x = _inputs()
    _check_against_full(m, u, x)
    state = copy.deepcopy(m.state_dict())
    m.to("meta")
    assert m._host_plans == [None, None]
    with pytest.raises(ValueError, match="fc1_weight must be on the same device as u"):
        m(u, x)
    y = m(u.to("meta"), x.to("meta"))  # auto on meta tensors: the reference
    assert y.device.type == "meta" and y.shape == u.shape
    m.to_empty(device="cpu")
    assert m._host_plans == [None, None]
    m.load_state_dict(state)
    _check_against_full(m, u, x)
    m.float()
    _check_against_full(m, u.float(), x.float())
    assert m._host_plans[0].dtype == torch.float32


@needs_cpu
@pytest.mark.parametrize("mode", MODES)
def test_train_eval_flips(mode):
    m = _layer(mode)
    u, x = _inputs()
    for training in (True, False, True, True, False):
        m.train(training)
        before = m.state_dict()["pair_bn.num_batches_tracked"].item() if mode == "folded_3x3" else None
        _check_against_full(m, u, x)
        assert m._host_plans[int(training)] is not None
        if mode == "folded_3x3":
            assert m.pair_bn.num_batches_tracked.item() == before + int(training)


@needs_cpu
def test_changing_momentum_and_eps_after_the_first_call():
    m = _layer("folded_3x3").train()
    u, x = _inputs()
    _check_against_full(m, u, x)
    for momentum in (0.5, 0.0, 1.0):
        m.pair_bn.momentum = momentum
        rm = m.pair_bn.running_mean.clone()
        _check_against_full(m, u, x)
        assert torch.equal(m.pair_bn.running_mean, rm) == (momentum == 0.0)
    m.pair_bn.momentum = None  # cumulative average: the full path, as nn.BatchNorm2d's
    _check_against_full(m, u, x)
    m.eval()
    ys = []
    for eps in (1e-5, 0.5, 1e-5):
        m.pair_bn.eps = eps
        ys.append(_check_against_full(m, u, x))
    assert not torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])
    m.pair_bn.eps = "0.5"
    with pytest.raises(TypeError, match="eps must be a float"):
        m(u, x)
    m.pair_bn.eps = 1e-5
    m.train()
    m(u, x)
    m.pair_bn.momentum = "0.1"
    count = m.pair_bn.num_batches_tracked.clone()
    with pytest.raises(TypeError, match="momentum must be a float"):
        m(u, x)
    assert torch.equal(m.pair_bn.num_batches_tracked, count)


@needs_cpu
@pytest.mark.parametrize("name", ["fc1", "fc2", "pair_conv", "pair_bn"])
def test_replacing_a_parameter_or_buffer(name):
    m = _layer("folded_3x3").train()
    u, x = _inputs()
    _check_against_full(m, u, x)
    child = getattr(m, name)
    child.weight = nn.Parameter(torch.randn_like(child.weight))
    if name == "pair_bn":
        child.running_mean = torch.randn_like(child.running_mean)
    _check_against_full(m, u, x)
    assert m._host_plans[1].objs[0] is m.fc1.weight
    child.weight = nn.Parameter(torch.randn(*child.weight.shape[:-1], child.weight.shape[-1] + 1, dtype=torch.float64))
    count = m.pair_bn.num_batches_tracked.clone()
    with pytest.raises(ValueError, match="must have shape"):
        m(u, x)
    assert torch.equal(m.pair_bn.num_batches_tracked, count)  # a failed call leaves the count alone


@needs_cpu
def test_validation_and_backend_choice_run_once_per_shape(monkeypatch):
    """The point of the plan: a repeated call neither validates nor chooses the backend again; a new
    shape does both once."""
    calls = {"validate": 0, "choose": 0}

    def counting(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper
    monkeypatch.setattr(functional, "validate", counting("validate", functional.validate))
    monkeypatch.setattr(dispatch, "_choose", counting("choose", dispatch._choose))
    hostpath.clear_host_caches()
    m = _layer("folded_3x3").train()
    u, x = _inputs()
    for _ in range(3):
        m(u, x)
    assert calls == {"validate": 1, "choose": 1}
    m.eval()
    for _ in range(3):
        m(u, x)
    assert calls == {"validate": 2, "choose": 1}  # the eval plan's first call; the choice is cached
    u2, x2 = _inputs(n=3)
    for _ in range(3):
        m(u2, x2)
    assert calls == {"validate": 3, "choose": 1}
    assert m.pair_bn.num_batches_tracked.item() == 3


def _fails_leaving_the_count(m, u, x, error):
    """The call raises ``ValueError`` matching ``error`` and leaves ``num_batches_tracked`` as it was."""
    count = m.pair_bn.num_batches_tracked.clone()
    with pytest.raises(ValueError, match=error):
        m(u, x)
    assert torch.equal(m.pair_bn.num_batches_tracked, count)


@needs_cpu
@pytest.mark.parametrize("attr, value, error", [("backend", "bogus", "backend must be one of"),
                                                ("padding", 1, "fc1_weight must have shape"),
                                                ("fold_width", 4, "fc1_weight must have shape"),
                                                ("mode", "pair_1x1", "must have shape")])
def test_reassigning_a_layer_attribute(attr, value, error):
    """The layer's configuration attributes are read by the full path on every call: reassigning one
    after the first call must reach the full path's checks, not replay the old configuration."""
    m = _layer("folded_3x3").train()
    u, x = _inputs()
    m(u, x)
    setattr(m, attr, value)
    _fails_leaving_the_count(m, u, x, error)


@needs_cpu
def test_reassigning_the_backend_attribute_switches_the_backend():
    m = _layer("folded_3x3").eval()
    u, x = _inputs()
    m(u, x)
    m.backend = "reference"
    y = m(u, x)
    assert m._host_plans[0] is None  # the reference ran: no plan
    m.backend = "cpu"
    torch.testing.assert_close(y, _check_against_full(m, u, x))
    assert m._host_plans[0].backend == "cpu"


@needs_cpu
@pytest.mark.parametrize("name", ["fc1", "fc2", "pair_conv", "pair_bn"])
def test_a_weight_changed_in_place_behind_the_plan(name):
    """``weight.data = ...`` keeps the Parameter object (the plan's identity check passes) but changes
    its shape or dtype: the call must give what a fresh layer gives (the full path's error naming
    the argument, or a cast), and a failed call leaves the count alone."""
    m = _layer("folded_3x3").train()
    u, x = _inputs()
    m(u, x)
    m(u, x)
    w = getattr(m, name).weight
    w.data = w.data.float()  # castable: the full path casts it to float64, as for a fresh layer
    _check_against_full(m, u, x)
    w.data = torch.randn(*w.shape[:-1], w.shape[-1] + 1, dtype=torch.float64)
    _fails_leaving_the_count(m, u, x, "must have shape")


@needs_cpu
def test_running_statistics_changed_in_place_are_used():
    m = _layer("folded_3x3").eval()
    u, x = _inputs()
    y0 = m(u, x)
    m.pair_bn.running_var.data = m.pair_bn.running_var.data * 4
    y1 = _check_against_full(m, u, x)
    assert not torch.equal(y0, y1)
    m.pair_bn.running_mean.data = m.pair_bn.running_mean.data[:1]  # another shape: the full path's error
    with pytest.raises(ValueError, match="running_mean must have shape"):
        m(u, x)


@needs_cpu
@pytest.mark.parametrize("mode", MODES)
def test_requires_grad_flips_after_the_first_call(mode):
    """The plan holds the Parameter objects; whether the call records a graph node is decided per
    call by the C++ autograd kernel, so freezing or unfreezing the layer takes effect at once."""
    m = _layer(mode).train()
    u, x = _inputs()
    assert m(u, x).grad_fn is not None
    m.requires_grad_(False)
    assert m(u, x).grad_fn is None
    m.fc2.weight.requires_grad_(True)
    y = m(u, x)
    assert y.grad_fn is not None
    y.sum().backward()
    assert m.fc2.weight.grad is not None and m.fc1.weight.grad is None
    ug = u.clone().requires_grad_()
    m.requires_grad_(False)
    m(ug, x).sum().backward()
    assert ug.grad is not None and m.fc2.weight.grad is not None


@needs_cpu
def test_inputs_on_another_device_after_the_first_call():
    m = _layer("folded_3x3").eval()
    u, x = _inputs()
    m(u, x)
    with pytest.raises(ValueError, match="fc1_weight must be on the same device as u"):
        m(u.to("meta"), x.to("meta"))


@needs_cpu
def test_autocast_after_the_first_call():
    """A plan recorded without autocast must not run under it: the call casts, as a fresh layer's."""
    m = _layer("folded_3x3", dtype=torch.float32).eval()
    u, x = _inputs(dtype=torch.float32)
    m(u, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _check_against_full(m, u, x)
    assert y.dtype == torch.bfloat16


@needs_cpu
@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_after_the_first_call(transform):
    """The torch.func error of the compiled backends, also once a plan exists."""
    m = _layer("se").eval()
    u, x = _inputs()
    m(u, x) if transform == "grad" else m(u[:1], x[:1])  # a plan for the shape the transform calls with
    assert m._host_plans[0] is not None
    fn = (torch.func.grad(lambda a: m(a, x).sum()) if transform == "grad"
          else torch.func.vmap(lambda a, b: m(a[None], b[None])))
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        fn(u) if transform == "grad" else fn(u, x)


@needs_cpu
def test_a_failed_call_leaves_the_count_alone_with_a_plan():
    m = _layer("folded_3x3").train()
    u, x = _inputs()
    m(u, x)
    m(u, x)
    assert m.pair_bn.num_batches_tracked.item() == 2
    for bad in ((u, x.float()), (u, x[:, :, :2]), (u, "x"), (u.float(), x.float().requires_grad_()[..., :1])):
        with pytest.raises((TypeError, ValueError)):
            m(*bad)
    assert m.pair_bn.num_batches_tracked.item() == 2


@needs_cpu
def test_hooks_registered_after_the_first_call_still_warn_once():
    m = _layer("folded_3x3").eval()
    u, x = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(u, x)
        m(u, x)
    m.pair_bn.register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match="do not fire"):
        m(u, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_against_full(m, u, x)


@needs_cpu
def test_backend_variable_is_read_on_every_call(monkeypatch):
    """CMPE_SE_BACKEND (and TRITON_INTERPRET) are read on every call, with or without a plan, as the
    functional form reads them: setting one after the first call takes effect at the next."""
    monkeypatch.delenv("CMPE_SE_BACKEND", raising=False)
    m = CMPESE(64, mode="se").eval()
    u, x = _inputs(dtype=torch.float32)
    m(u, x)
    assert m._host_plans[0] is not None and m._host_plans[0].backend == "cpu"
    monkeypatch.setenv("CMPE_SE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="CMPE_SE_BACKEND='bogus'"):
        m(u, x)
    monkeypatch.setenv("CMPE_SE_BACKEND", "reference")
    m(u, x)
    assert m._host_plans[0] is None  # the reference runs eagerly: no plan
    monkeypatch.setenv("CMPE_SE_BACKEND", "cpu")
    m(u, x)
    plan = m._host_plans[0]
    assert plan.backend == "cpu" and plan.replay(m, u, x) is not None
    monkeypatch.setenv("TRITON_INTERPRET", "0" if os.environ.get("TRITON_INTERPRET") == "1" else "1")
    assert plan.replay(m, u, x) is None  # part of the backend choice's key: choose again


@needs_cpu
def test_backend_choice_cache_follows_the_machine_state(monkeypatch):
    """The cached choice is reused only while what the backends' reasons read is unchanged (here: a
    faked missing extension, as tests/test_distribution.py fakes GPUs)."""
    from cmpe_se_fused import ops
    u = torch.empty(1, 64, 1, 1)
    assert dispatch.choose("auto", u).name == "cpu"
    monkeypatch.setattr(ops, "HAS_C", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the missing-extension warning (once per process)
        assert dispatch.choose("auto", u).name == "reference"
    with pytest.raises(RuntimeError, match="compiled extension cmpe_se_fused._C is not available"):
        dispatch.choose("cpu", u)
    monkeypatch.undo()
    assert dispatch.choose("auto", u).name == "cpu" and dispatch.choose("cpu", u).name == "cpu"


@needs_cpu
def test_clear_host_caches_drops_every_plan(monkeypatch):
    m = _layer("folded_3x3").eval()
    u, x = _inputs()
    m(u, x)
    plan = m._host_plans[0]
    assert plan.replay(m, u, x) is not None
    hostpath.clear_host_caches()
    assert plan.replay(m, u, x) is None  # a stale generation: the full path, which records a new plan
    _check_against_full(m, u, x)
    assert m._host_plans[0] is not plan


@needs_cpu
def test_pickle_and_deepcopy_carry_no_plan():
    m = _layer("folded_3x3").train()
    u, x = _inputs()
    m(u, x)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    assert m2._host_plans == [None, None]
    assert torch.equal(m2(u, x), copy.deepcopy(m)(u, x))


@needs_cpu
@pytest.mark.parametrize("mode", MODES)
def test_cpp_autograd_kernel(mode):
    """cmpe_se::forward's Autograd kernel is C++ (no Python autograd.Function); its gradients match
    the reference's; under no_grad it records nothing."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("cmpe_se::forward", "Autograd")
    assert "autograd.cpp" in torch._C._dispatch_dump("cmpe_se::forward")
    m = _layer(mode).train()
    ref = CMPESEReference(64, mode=mode, **({"fold_width": 8} if mode == "folded_3x3" else {})).double().train()
    ref.load_state_dict(m.state_dict())
    u, x = (t.requires_grad_() for t in _inputs())
    u2, x2 = (t.detach().clone().requires_grad_() for t in (u, x))
    g = torch.randn_like(u)
    y = m(u, x)
    assert "CMPESEFunction" in y.grad_fn.name()
    y.backward(g)
    ref(u2, x2).backward(g)
    torch.testing.assert_close(u.grad, u2.grad)
    torch.testing.assert_close(x.grad, x2.grad)
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    with torch.no_grad():
        assert m(u, x).grad_fn is None
    frozen = _layer(mode).eval().requires_grad_(False)
    assert frozen(u.detach(), x.detach()).grad_fn is None


@needs_cpu
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_counts_batches_as_batchnorm(use_reentrant):
    """Issue 25 item 7: under activation checkpointing the recompute counts a batch, as it does for
    nn.BatchNorm2d (which counts before its kernel) and CMPESEReference."""
    u, x = (t.requires_grad_() for t in _inputs(dtype=torch.float32))
    counts = {}
    for name, layer in (("cmpe", CMPESE(64, mode="folded_3x3", fold_width=8, backend="cpu")),
                        ("ref", CMPESEReference(64, mode="folded_3x3", fold_width=8)), ("bn", nn.BatchNorm2d(64))):
        layer.train()
        call = (lambda a, b, m=layer: m(a, b)) if name != "bn" else (lambda a, b, m=layer: m(a) + b)
        for _ in range(2):
            checkpoint(call, u, x, use_reentrant=use_reentrant).sum().backward()
        bn = layer if name == "bn" else layer.pair_bn
        counts[name] = bn.num_batches_tracked.item()
    assert counts["cmpe"] == counts["bn"] == counts["ref"] == 4

