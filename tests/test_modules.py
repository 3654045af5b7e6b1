"""The user-facing API: CMPESE, functional.cmpe_se, backend choice, bad input, edge cases."""
import logging

import pytest
import torch
from conftest import make_params

import cmpe_se_fused
from cmpe_se_fused import CMPESE, CMPESEReference, cmpe_se
from cmpe_se_fused.dispatch import BACKENDS, choose
from cmpe_se_fused.reference import MODES, PAIR_MODES, cmpe_se_reference

SD_KEYS = {
    "se": {"fc1.weight", "fc2.weight"},
    "double_fc": {"fc1.weight", "fc1_identity.weight", "fc2.weight"},
}
BN_KEYS = {"pair_conv.weight", "pair_bn.weight", "pair_bn.bias", "pair_bn.running_mean", "pair_bn.running_var",
           "pair_bn.num_batches_tracked"}


def _cpu_backends():
    return [b for b in ("reference", "cpu") if not BACKENDS[b].not_supported_reasons(torch.empty(1))]


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_names_and_shapes(mode):
    m = CMPESE(64, mode=mode)
    keys = SD_KEYS.get(mode, {"fc1.weight", "fc2.weight"} | BN_KEYS)
    assert set(m.state_dict()) == keys
    r, e = 4, 4
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["fc2.weight"] == ((64, 2 * r) if mode == "double_fc" else (64, r))
    dz = {"se": 64, "double_fc": 64, "pair_2x1": 64, "pair_1x1": 128, "folded_3x3": 6 * 14}[mode]
    assert shapes["fc1.weight"] == (r, dz)
    if mode in PAIR_MODES:
        ks = {"pair_2x1": (1, 2), "pair_1x1": (1, 1), "folded_3x3": (3, 3)}[mode]
        assert shapes["pair_conv.weight"] == (e, 1) + ks
        assert shapes["pair_bn.running_var"] == (e,)


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_roundtrip_with_plain_module(mode):
    fused = CMPESE(32, mode=mode, reduction=4, fold_width=8, backend="reference")
    plain = CMPESEReference(32, mode=mode, reduction=4, fold_width=8)
    plain.load_state_dict(fused.state_dict(), strict=True)
    fused2 = CMPESE(32, mode=mode, reduction=4, fold_width=8)
    fused2.load_state_dict(plain.state_dict(), strict=True)
    u, x = torch.randn(2, 32, 3, 3), torch.randn(2, 32, 3, 3)
    fused.eval(), plain.eval()
    torch.testing.assert_close(fused(u, x), plain(u, x))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [True, False])
def test_module_matches_plain_module(backend, mode, training):
    if backend not in _cpu_backends():
        pytest.skip(f"backend {backend} not usable here: {BACKENDS[backend].not_supported_reasons(torch.empty(1))}")
    torch.manual_seed(0)
    plain = CMPESEReference(48, mode=mode, reduction=8, fold_width=8, pair_filters=3).double().train(training)
    fused = CMPESE(48, mode=mode, reduction=8, fold_width=8, pair_filters=3, backend=backend).double().train(training)
    fused.load_state_dict(plain.state_dict())
    u = torch.randn(4, 48, 5, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 48, 5, 5, dtype=torch.float64, requires_grad=True)
    y1, y2 = plain(u, x), fused(u, x)
    torch.testing.assert_close(y2, y1, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, [u, x] + list(plain.parameters()), gy)
    g2 = torch.autograd.grad(y2, [u, x] + list(fused.parameters()), gy)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
    for (k, v1), (_, v2) in zip(plain.state_dict().items(), fused.state_dict().items()):
        torch.testing.assert_close(v2, v1, rtol=1e-10, atol=1e-12, msg=k)


def test_extra_repr_and_reset():
    m = CMPESE(64, mode="folded_3x3", backend="reference")
    rep = repr(m)
    for s in ("mode='folded_3x3'", "hidden 4", "pair_filters=4", "fold_width=16", "backend='reference'"):
        assert s in rep
    before = m.fc1.weight.clone()
    m.reset_parameters()
    assert not torch.equal(before, m.fc1.weight)


BAD_CONFIG = [
    (dict(channels=64, mode="nope"), ValueError, "mode"),
    (dict(channels=60, mode="folded_3x3", fold_width=16), ValueError, "fold_width"),
    (dict(channels=16, mode="folded_3x3", fold_width=16), ValueError, "fold too small"),
    (dict(channels=64, backend="tpu"), ValueError, "backend"),
    (dict(channels=0), ValueError, "channels"),
    (dict(channels=64, padding=2), ValueError, "padding"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_CONFIG)
def test_bad_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CMPESE(**kwargs)


def _good():
    return torch.randn(2, 32, 4, 4), torch.randn(2, 32, 4, 4)


BAD_INPUT = [
    (lambda u, x: (u, x[:, :16]), ValueError, "same shape"),
    (lambda u, x: (u, x.double()), TypeError, "same dtype"),
    (lambda u, x: (u[0], x[0]), ValueError, "4-D"),
    (lambda u, x: (u.long(), x.long()), TypeError, "floating"),
    (lambda u, x: (u[:, :16], x[:, :16]), ValueError, "32 channels"),
    (lambda u, x: (u.to("meta"), x), ValueError, "same device"),
    (lambda u, x: (u.numpy(), x), TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("make,exc,match", BAD_INPUT)
def test_bad_input(make, exc, match):
    m = CMPESE(32, mode="folded_3x3", fold_width=8)
    u, x = make(*_good())
    with pytest.raises(exc, match=match):
        m(u, x)


def test_functional_bad_weights():
    u, x = _good()
    prm = make_params("folded_3x3", 32, dtype=torch.float32)
    with pytest.raises(ValueError, match="fc1_weight"):
        cmpe_se(u, x, **{**prm, "fc1_weight": prm["fc1_weight"][:, :5]}, mode="folded_3x3", training=False, fold_width=8)
    with pytest.raises(ValueError, match="pair_weight is required"):
        cmpe_se(u, x, **{**prm, "pair_weight": None}, mode="folded_3x3", training=False, fold_width=8)
    with pytest.raises(ValueError, match="running_var"):
        cmpe_se(u, x, **{**prm, "running_var": prm["running_var"][:1]}, mode="folded_3x3", training=True, fold_width=8)
    with pytest.raises(ValueError, match="more than one value"):
        prm2 = make_params("pair_2x1", 1, reduction=1, dtype=torch.float32)
        cmpe_se(u[:1, :1, :1, :1], x[:1, :1, :1, :1], **prm2, mode="pair_2x1", training=True)


def test_backend_choice_and_errors(monkeypatch, caplog):
    u = torch.randn(2, 32, 4, 4)
    assert choose("reference", u).name == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        choose("nope", u)
    with pytest.raises(RuntimeError, match="cuda"):
        choose("cuda", u)  # CPU tensor: the cuda backend says why it cannot run
    monkeypatch.setenv("CMPE_SE_BACKEND", "reference")
    assert choose("auto", u).name == "reference"
    monkeypatch.setenv("CMPE_SE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="CMPE_SE_BACKEND"):
        choose("auto", u)
    monkeypatch.delenv("CMPE_SE_BACKEND")
    with caplog.at_level(logging.INFO, logger="cmpe_se_fused"):
        from cmpe_se_fused import dispatch
        dispatch._logged.clear()
        name = choose("auto", u).name
        choose("auto", u)
    assert name == ("cpu" if "cpu" in _cpu_backends() else "reference")
    assert sum("backend=auto chose" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_edge_cases(backend):
    if backend not in _cpu_backends():
        pytest.skip(f"backend {backend} not usable here")
    torch.manual_seed(5)
    for mode in MODES:
        m = CMPESE(32, mode=mode, fold_width=8, reduction=8, backend=backend)
        ref = CMPESEReference(32, mode=mode, fold_width=8, reduction=8)
        ref.load_state_dict(m.state_dict())
        m.eval(), ref.eval()
        # N = 1 in eval, H = W = 1
        for shape in [(1, 32, 5, 5), (3, 32, 1, 1), (2, 32, 7, 7)]:
            u, x = torch.randn(shape), torch.randn(shape)
            torch.testing.assert_close(m(u, x), ref(u, x), rtol=2e-5, atol=2e-5)
        # non-contiguous and channels_last: output keeps U's memory format
        big = torch.randn(2, 64, 6, 6)
        u_nc, x_nc = big[:, ::2], big[:, 1::2]
        assert not u_nc.is_contiguous()
        torch.testing.assert_close(m(u_nc, x_nc), ref(u_nc, x_nc), rtol=2e-5, atol=2e-5)
        u_cl = torch.randn(2, 32, 4, 4).to(memory_format=torch.channels_last)
        x_cl = torch.randn(2, 32, 4, 4).to(memory_format=torch.channels_last)
        y = m(u_cl, x_cl)
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, ref(u_cl, x_cl), rtol=2e-5, atol=2e-5)
        # float64
        m64, ref64 = m.double(), ref.double()
        u64, x64 = torch.randn(2, 32, 3, 3, dtype=torch.float64), torch.randn(2, 32, 3, 3, dtype=torch.float64)
        assert m64(u64, x64).dtype == torch.float64
        torch.testing.assert_close(m64(u64, x64), ref64(u64, x64))
        m.float(), ref.float()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nan_inf_propagate(backend):
    if backend not in _cpu_backends():
        pytest.skip(f"backend {backend} not usable here")
    m = CMPESE(32, mode="se", reduction=8, backend=backend).eval()
    ref = CMPESEReference(32, mode="se", reduction=8).eval()
    ref.load_state_dict(m.state_dict())
    u, x = torch.randn(2, 32, 3, 3), torch.randn(2, 32, 3, 3)
    u[0, 3, 1, 1] = float("nan")
    x[1, 5, 0, 0] = float("inf")
    y, y_ref = m(u, x), ref(u, x)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert torch.equal(torch.isinf(y), torch.isinf(y_ref))


def test_num_batches_tracked_and_momentum_none():
    m = CMPESE(32, mode="pair_2x1", backend="reference", bn_momentum=None)
    ref = CMPESEReference(32, mode="pair_2x1", bn_momentum=None)
    ref.load_state_dict(m.state_dict())
    for _ in range(3):
        u, x = torch.randn(4, 32, 2, 2), torch.randn(4, 32, 2, 2)
        m(u, x), ref(u, x)
    assert int(m.pair_bn.num_batches_tracked) == 3
    torch.testing.assert_close(m.pair_bn.running_mean, ref.pair_bn.running_mean)
    torch.testing.assert_close(m.pair_bn.running_var, ref.pair_bn.running_var)


def test_functional_matches_reference_function():
    u, x = _good()
    prm = make_params("double_fc", 32, dtype=torch.float32)
    y = cmpe_se(u, x, **prm, mode="double_fc", training=True, backend="reference")
    torch.testing.assert_close(y, cmpe_se_reference(u, x, **prm, mode="double_fc", training=True))


def test_top_level_exports():
    for name in ("CMPESE", "cmpe_se", "models", "functional", "reference", "availability"):
        assert hasattr(cmpe_se_fused, name)
    assert cmpe_se_fused.availability()["reference"] == []
