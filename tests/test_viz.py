"""cmpe_se_fused.viz: recording is faithful and changes nothing; the plots are written."""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from cmpe_se_fused import CMPESE, CMPESEReference
from cmpe_se_fused.models import preact_resnet
from cmpe_se_fused.reference import MODES, PAIR_MODES
from cmpe_se_fused.viz import AttentionRecorder, gate_statistics, plot_gate_curves, plot_gate_stats, plot_maps

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def tiny_net(se_mode, seed=0):
    torch.manual_seed(seed)
    return preact_resnet(20, se_mode=se_mode, fold_width=4, pair_filters=2, backend="auto")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("se_mode", ["folded_3x3", "double_fc"])
def test_recording_changes_nothing(se_mode, training):
    net = tiny_net(se_mode).train(training)
    twin = copy.deepcopy(net)
    img = torch.randn(4, 3, 8, 8)
    torch.manual_seed(1)
    y_plain = net(img)
    y_plain.square().sum().backward()
    rng_plain = torch.random.get_rng_state()
    torch.manual_seed(1)
    with AttentionRecorder(twin) as rec:
        y_rec = twin(img)
        y_rec.square().sum().backward()
    assert torch.equal(torch.random.get_rng_state(), rng_plain)
    assert torch.equal(y_rec, y_plain)
    for (k, a), b in zip(net.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k  # running statistics included
    for (k, p), q in zip(net.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), k
    assert len(rec.records) == 9
    assert all(not m._forward_hooks for m in twin.modules())  # removed on exit


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cls", [CMPESE, CMPESEReference])
def test_recorded_values_are_the_layers(mode, cls):
    torch.manual_seed(0)
    kw = dict(backend="reference") if cls is CMPESE else {}
    layer = cls(24, mode=mode, reduction=4, pair_filters=3, fold_width=8, **kw).double()
    holder = nn.ModuleDict({"blk": layer})
    u, x = torch.randn(5, 24, 3, 3, dtype=torch.float64), torch.randn(5, 24, 3, 3, dtype=torch.float64)
    with AttentionRecorder(holder) as rec:
        y = layer(u, x=x)  # keyword inputs are recorded too
    r = rec.records["blk"]
    assert r.mode == mode and r.gate.shape == (5, 24) and r.gate.dtype == torch.float32
    torch.testing.assert_close(r.pool_u, u.mean((2, 3)).float())
    torch.testing.assert_close(r.pool_y, y.mean((2, 3)).float(), rtol=1e-5, atol=1e-5)  # mean Y = s*u + x
    assert r.fold_before.shape == r.fold_after.shape == (5, 6, 8)
    assert torch.equal(r.fold_before[:, 0::2].flatten(1), r.pool_u)  # rows alternate residual / identity
    assert torch.equal(r.fold_after[:, 1::2].flatten(1), r.pool_x)
    torch.testing.assert_close(r.fold_after[:, 0::2].flatten(1), r.gate * r.pool_u)
    if mode in PAIR_MODES:  # z = v.flatten() is what fc1 reads
        z = r.v.double().flatten(1)
        gate = torch.sigmoid(torch.relu(z @ layer.fc1.weight.t()) @ layer.fc2.weight.t())
        torch.testing.assert_close(gate.float(), r.gate, rtol=1e-5, atol=1e-6)
    else:
        assert r.v is None
    stats = gate_statistics(rec.records)[0]
    assert stats["mean"] == pytest.approx(r.gate.double().mean().item(), rel=1e-6)
    assert stats["var"] == pytest.approx(r.gate.double().var(unbiased=False).item(), rel=1e-4)


def test_max_samples_layers_and_errors():
    net = tiny_net("pair_1x1").eval()
    with AttentionRecorder(net, layers=["stages.0.0.se", "stages.2.2.se"], max_samples=5) as rec, torch.no_grad():
        net(torch.randn(3, 3, 8, 8))
        net(torch.randn(4, 3, 8, 8))
    assert list(rec.records) == ["stages.0.0.se", "stages.2.2.se"]
    assert all(r.gate.shape[0] == 5 and r.v.shape[0] == 5 for r in rec.records.values())
    assert rec.records["stages.0.0.se"].fold_before.shape == (5, 8, 4)  # pair_1x1 folded with m=4 for display
    with pytest.raises(ValueError, match="no CMPE-SE layer"):
        AttentionRecorder(nn.Linear(2, 2))


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_plots(tmp_path):
    runs = {}
    img = torch.randn(3, 3, 4, 4)
    for mode in ("se", "pair_2x1", "folded_3x3"):
        net = tiny_net(mode).eval()
        with AttentionRecorder(net) as rec, torch.no_grad():
            net(img)
        runs[mode] = rec.records
    plot_maps(runs["folded_3x3"], tmp_path / "maps.png", blocks=["stages.0.0.se", "stages.2.2.se"])
    plot_maps(runs["se"], tmp_path / "maps_se.png", sample=1, blocks=[0, 8])
    plot_gate_curves(runs["pair_2x1"], tmp_path / "gates.png")
    plot_gate_stats(runs, tmp_path / "stats.png")
    for name in ("maps.png", "maps_se.png", "gates.png", "stats.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
