"""convert_model / revert_model: exact round trips, every tensor kept, checkpoints across backends."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from cmpe_se_fused import CMPESE, CMPESEReference
from cmpe_se_fused.convert import convert_model, is_cmpe_se_layer, layer_config, revert_model
from cmpe_se_fused.dispatch import BACKENDS
from cmpe_se_fused.distributed import SyncCMPESE
from cmpe_se_fused.models import preact_resnet
from cmpe_se_fused.reference import MODES, PAIR_MODES

HAS_CPU_KERNEL = not BACKENDS["cpu"].not_supported_reasons()
BACKENDS_HERE = ["reference", "auto"] + (["cpu"] if HAS_CPU_KERNEL else [])
LAYER_KW = dict(reduction=4, pair_filters=3, fold_width=8)


def tiny_net(se_mode, backend="reference", seed=0):
    torch.manual_seed(seed)
    return preact_resnet(20, num_classes=10, se_mode=se_mode, fold_width=4, pair_filters=2, backend=backend)


def se_layers(model):
    return [m for m in model.modules() if is_cmpe_se_layer(m)]


def assert_state_equal(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].device == sb[k].device, k
        assert torch.equal(sa[k], sb[k]), k


def randomise_bn(model, seed=1):
    """Non-trivial running statistics and affine parameters everywhere (defaults hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.num_batches_tracked.fill_(7)
    return model


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_layer_round_trip(mode, backend):
    torch.manual_seed(0)
    ref = randomise_bn(CMPESEReference(16, mode=mode, **LAYER_KW).double())
    fused = convert_model(ref, backend=backend)
    assert type(fused) is CMPESE and fused.backend == backend and fused.mode == mode
    assert type(ref) is CMPESEReference  # inplace=False leaves the original alone
    assert_state_equal(ref, fused)
    back = revert_model(fused)
    assert type(back) is CMPESEReference
    assert_state_equal(ref, back)
    u, x = torch.randn(6, 16, 3, 3, dtype=torch.float64), torch.randn(6, 16, 3, 3, dtype=torch.float64)
    for training in (False, True):
        for m in (ref, fused, back):
            m.train(training)
        y_ref, y_fused, y_back = ref(u, x), fused(u, x), back(u, x)
        assert torch.equal(y_ref, y_back)
        torch.testing.assert_close(y_fused, y_ref, rtol=1e-10, atol=1e-10)
    # training updated the running stats of all three the same way
    torch.testing.assert_close(fused.state_dict(), ref.state_dict(), rtol=1e-10, atol=0)
    assert_state_equal(ref, back)


@pytest.mark.parametrize("se_mode", ["double_fc", "folded_3x3"])  # every mode: test_layer_round_trip
def test_network_round_trip(se_mode):
    net = randomise_bn(tiny_net(se_mode))
    ref = revert_model(net)
    assert all(type(m) is CMPESEReference for m in se_layers(ref)) and len(se_layers(ref)) == 9
    again = convert_model(ref, backend="reference")
    assert all(type(m) is CMPESE for m in se_layers(again))
    assert_state_equal(net, ref)
    assert_state_equal(net, again)
    img = torch.randn(3, 3, 4, 4)
    for training in (False, True):
        for m in (net, ref, again):
            m.train(training)
        y_net, y_ref, y_again = net(img), ref(img), again(img)
        assert torch.equal(y_net, y_again)
        torch.testing.assert_close(y_ref, y_net, rtol=1e-4, atol=1e-5)
    assert_state_equal(net, again)


def test_keeps_tensors_device_dtype_flags_and_rng():
    net = tiny_net("pair_2x1").to(torch.float64)
    net.train()
    net.stages[1].eval()  # mixed train/eval flags must survive
    net.stages[0][0].se.fc2.weight.requires_grad_(False)
    params_before = {k: v for k, v in net.named_parameters()}
    rng = torch.random.get_rng_state()
    out = revert_model(net, inplace=True)
    assert out is net and torch.equal(rng, torch.random.get_rng_state())  # no re-initialisation
    params_after = dict(net.named_parameters())
    assert all(params_after[k] is params_before[k] for k in params_before)  # an optimizer keeps working
    assert all(p.dtype == torch.float64 for p in net.parameters())
    assert not net.stages[0][0].se.fc2.weight.requires_grad
    flags = [m.training for m in net.modules()]
    assert flags.count(False) > 0 and flags.count(True) > 0
    back = convert_model(net, backend="reference")
    assert [m.training for m in back.modules()] == flags


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_backend_change_and_checkpoint_across_backends(backend):
    src = randomise_bn(tiny_net("folded_3x3", backend="reference"))
    moved = convert_model(src, backend=backend)
    assert {m.backend for m in se_layers(moved)} == {backend}
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    for target in (tiny_net("folded_3x3", backend=backend, seed=5), revert_model(tiny_net("folded_3x3", seed=5))):
        buf.seek(0)
        target.load_state_dict(torch.load(buf), strict=True)
        assert_state_equal(src, target)
        src.eval(), target.eval()
        img = torch.randn(2, 3, 4, 4)
        torch.testing.assert_close(target(img), src(img), rtol=1e-4, atol=1e-5)


def test_same_backend_is_left_alone_and_shared_layers_stay_shared():
    layer = CMPESE(16, mode="se", reduction=4, backend="reference")
    net = nn.ModuleDict({"a": layer, "b": layer})
    out = convert_model(net, backend="reference", inplace=True)
    assert out["a"] is layer
    out = convert_model(net, backend="auto", inplace=True)
    assert out["a"] is out["b"] and out["a"] is not layer and out["a"].backend == "auto"


class DuckSE(nn.Module):
    """A user's own CMPE-SE layer (SPEC names, its own forward)."""

    def __init__(self, channels, hidden, pair_filters, padding=0, fold_width=None, bias=False):
        super().__init__()
        self.mode = "folded_3x3"
        if fold_width is not None:
            self.fold_width = fold_width
        m = fold_width or 8
        rows, cols = 2 * (channels // m) - 2 + 2 * padding, m - 2 + 2 * padding
        self.fc1 = nn.Linear(rows * cols, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, channels, bias=False)
        self.pair_conv = nn.Conv2d(1, pair_filters, 3, padding=padding, bias=False)
        self.pair_bn = nn.BatchNorm2d(pair_filters)

    def forward(self, u, x):  # the reference module's forward is the SPEC; borrow it
        return CMPESEReference.forward(self, u, x)


def test_duck_typed_layer():
    torch.manual_seed(0)
    duck = randomise_bn(DuckSE(24, hidden=5, pair_filters=2, padding=1, fold_width=8)).double()
    assert is_cmpe_se_layer(duck)
    cfg = layer_config(duck)
    assert (cfg["channels"], cfg["hidden"], cfg["fold_width"], cfg["padding"], cfg["pair_filters"]) == (24, 5, 8, 1, 2)
    fused = convert_model(nn.Sequential(duck), backend="reference")[0]
    assert type(fused) is CMPESE and fused.hidden == 5
    assert_state_equal(duck, fused)
    u, x = torch.randn(4, 24, 2, 2, dtype=torch.float64), torch.randn(4, 24, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(fused(u, x), duck(u, x), rtol=1e-10, atol=1e-10)
    # no fold_width attribute: inferred when fc1's width allows only one, else a clear error
    assert layer_config(DuckSE(32, 5, 2, padding=0, fold_width=None))["fold_width"] == 8
    with pytest.raises(ValueError, match=r"fit fold widths \[6, 8\]"):
        layer_config(DuckSE(24, 5, 2, padding=0, fold_width=None))


def test_unfaithful_duck_raises():
    with pytest.raises(ValueError, match="state_dict must hold exactly"):
        convert_model(DuckSE(24, 5, 2, fold_width=8, bias=True))
    bad = DuckSE(24, 5, 2, fold_width=8)
    bad.pair_conv = nn.Conv2d(1, 2, 3, stride=2, bias=False)
    with pytest.raises(ValueError, match="stride 1"):
        convert_model(bad)
    assert not is_cmpe_se_layer(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="backend"):
        convert_model(nn.Linear(3, 3), backend="nope")


@pytest.mark.parametrize("mode", PAIR_MODES)
def test_sync_batchnorm_pair_bn_becomes_sync_layer(mode):
    ref = CMPESEReference(16, mode=mode, **LAYER_KW)
    ref.pair_bn = nn.SyncBatchNorm.convert_sync_batchnorm(ref.pair_bn)
    fused = convert_model(ref, backend="reference")
    assert type(fused) is SyncCMPESE and type(fused.pair_bn) is nn.BatchNorm2d
    assert_state_equal(ref, fused)
    back = convert_model(fused, backend="auto")
    assert type(back) is SyncCMPESE and back.backend == "auto"
    assert type(revert_model(back)) is CMPESEReference


def test_fused_layer_with_torch_sync_batchnorm_becomes_sync_layer():
    fused = CMPESE(16, mode="pair_2x1", pair_filters=2, backend="reference")
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(fused)  # torch's converter reaches pair_bn too
    out = convert_model(fused, backend="reference")
    assert type(out) is SyncCMPESE and type(out.pair_bn) is nn.BatchNorm2d
    assert_state_equal(fused, out)
