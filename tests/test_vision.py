"""add_cmpe_se on torchvision's and timm's ResNets: placement, checkpoints, conversion, compile/export,
parameter counts, bad input, and the end-to-end benchmark rows."""
from __future__ import annotations

import copy
import functools
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from cmpe_se_fused import CMPESE, CMPESEReference
from cmpe_se_fused.convert import add_cmpe_se, convert_model, revert_model
from cmpe_se_fused.dispatch import BACKENDS
from cmpe_se_fused.models import preact_resnet50
from cmpe_se_fused.reference import MODES, PAIR_MODES
from cmpe_se_fused.vision import CMPESEResidualBlock
from conftest import assert_close_rule

tvm = pytest.importorskip("torchvision.models", reason="torchvision is not installed (pip install "
                          "'cmpe_se_fused[vision]'; CI installs it)")
timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'cmpe_se_fused[vision]'; CI installs it)")
from timm.models import resnet as timm_resnet  # noqa: E402
from torchvision.models import resnet as tv_resnet  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
HAS_CPU_KERNEL = not BACKENDS["cpu"].not_supported_reasons()
FUSED = "cpu" if HAS_CPU_KERNEL else "reference"


pytestmark = pytest.mark.usefixtures("one_thread")


def resnet10():
    """The smallest torchvision ResNet: one BasicBlock per stage (resnet18 has two), 10 classes."""
    return tv_resnet.ResNet(tv_resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def randomise_bn(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model


class AddAndRecord(nn.Module):
    """Stands in for the CMPE-SE layer: returns ``u + x`` (the plain block's sum) and keeps (u, x)."""

    def forward(self, u, x):
        self.seen = (u.detach().clone(), x.detach().clone())
        return u + x


def _downsample(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


BLOCKS = {
    "tv-basic": lambda: tv_resnet.BasicBlock(8, 16, 2, downsample=_downsample(8, 16, 2)),
    "tv-basic-identity": lambda: tv_resnet.BasicBlock(16, 16),
    "tv-bottleneck": lambda: tv_resnet.Bottleneck(16, 8, 2, downsample=_downsample(16, 32, 2), groups=2,
                                                  base_width=128),
    "timm-basic": lambda: timm_resnet.BasicBlock(8, 16, 2, downsample=_downsample(8, 16, 2)),
    "timm-bottleneck": lambda: timm_resnet.Bottleneck(32, 8),
    "timm-bottleneck-aa": lambda: timm_resnet.Bottleneck(16, 8, 2, downsample=_downsample(16, 32, 2),
                                                         aa_layer=nn.AvgPool2d),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_layer_sits_on_the_branch_output_and_the_shortcut(name):
    """With the layer replaced by ``u + x`` the wrapped block is the original block bit for bit,
    and the layer saw U = the branch's last BatchNorm output and X = the (downsampled) shortcut."""
    torch.manual_seed(0)
    block = randomise_bn(BLOCKS[name]()).eval()
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    seen = {}
    hooks = [last_bn.register_forward_hook(lambda m, i, o: seen.__setitem__("u", o.detach().clone()))]
    if block.downsample is not None:
        hooks.append(block.downsample.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o.detach().clone())))
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    want = block(x.clone())
    for h in hooks:
        h.remove()
    wrapped = add_cmpe_se(block, "se")
    assert isinstance(wrapped, CMPESEResidualBlock) and wrapped.cmpe_se.channels == last_bn.num_features
    wrapped.cmpe_se = AddAndRecord()
    got = wrapped(x.clone())
    assert torch.equal(got, want)
    u, ident = wrapped.cmpe_se.seen
    assert torch.equal(u, seen["u"]) and torch.equal(ident, seen.get("x", x))


def test_timm_drop_path_drops_the_gated_branch():
    """timm applies drop_path after its SE: here it drops ``cmpe_se(U, X) - X``, the same samples."""
    block = timm_resnet.Bottleneck(32, 8, drop_path=timm.layers.DropPath(0.5)).train()
    x = torch.randn(8, 32, 4, 4)
    torch.manual_seed(3)
    want = block(x.clone())
    wrapped = add_cmpe_se(block, "se")
    wrapped.cmpe_se = AddAndRecord()
    torch.manual_seed(3)
    got = wrapped(x.clone())
    torch.testing.assert_close(got, want)
    dropped = (want - torch.relu(x)).flatten(1).abs().amax(1) == 0
    assert 0 < int(dropped.sum()) < 8  # the check above saw both kinds of samples


# one of each block type and width rule (resnet34/101/152 are more of the same blocks: skipped for CI time)
TV_MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"]
TIMM_MODELS = ["resnet18", "seresnet50", "seresnext26d_32x4d"]


@functools.lru_cache(maxsize=None)
def _meta_model(family, name):
    """On the meta device: structure and parameter counts without allocating or initialising
    (callers must not modify it: add_cmpe_se's default inplace=False copies)."""
    with torch.device("meta"):
        return getattr(tvm, name)(weights=None) if family == "torchvision" else \
            timm.create_model(name, pretrained=False)


@pytest.mark.parametrize("family,name", [("torchvision", n) for n in TV_MODELS] + [("timm", n) for n in TIMM_MODELS])
def test_every_block_gets_a_layer_with_the_spec_defaults(family, name):
    plain = _meta_model(family, name)
    n_blocks = sum(len(getattr(plain, f"layer{i}")) for i in range(1, 5))
    model = add_cmpe_se(plain)
    blocks = [m for m in model.modules() if isinstance(m, CMPESEResidualBlock)]
    assert len(blocks) == n_blocks and not any(isinstance(m, (tv_resnet.BasicBlock, tv_resnet.Bottleneck,
                                                               timm_resnet.BasicBlock, timm_resnet.Bottleneck))
                                               for m in model.modules())
    for b in blocks:
        c, bottleneck = b.cmpe_se.channels, hasattr(b, "bn3")
        assert c == (b.bn3 if bottleneck else b.bn2).num_features
        assert (b.cmpe_se.mode, b.cmpe_se.fold_width, b.cmpe_se.reduction) == ("folded_3x3", 16, 16)
        assert b.cmpe_se.pair_filters == c // (64 if bottleneck else 16)
        assert getattr(b, "se", None) is None  # timm's SE is replaced
    assert any(isinstance(m, CMPESEResidualBlock) for m in plain.modules()) is False  # inplace=False


@functools.lru_cache(maxsize=None)
def _meta_preact50():
    with torch.device("meta"):
        return preact_resnet50()


@pytest.mark.parametrize("mode", MODES)
def test_resnet50_adds_the_parameters_preact_resnet50_adds(mode):
    """Same widths, same defaults: CMPE-SE-ResNet-50 from torchvision or timm adds exactly the
    layer parameters the package's preact_resnet50(se_mode=mode) adds to its plain network."""
    with torch.device("meta"):
        ours = n_params(preact_resnet50(se_mode=mode)) - n_params(_meta_preact50())
    for family in ("torchvision", "timm"):
        plain = _meta_model(family, "resnet50")
        added = n_params(add_cmpe_se(plain, mode)) - n_params(plain)
        assert added == ours, (family, mode, added, ours)
    se_net = _meta_model("timm", "seresnet50")  # timm's SE parameters go, CMPE-SE's come
    assert n_params(add_cmpe_se(se_net, mode)) == n_params(_meta_model("timm", "resnet50")) + ours
    # the README's table states these totals
    row = next(line for line in README.read_text().splitlines() if line.startswith("| torchvision `resnet50` +"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    plain = n_params(_meta_model("torchvision", "resnet50"))
    assert cells[1] == f"{plain / 1e6:.3f}M" and cells[2 + MODES.index(mode)] == f"{(plain + ours) / 1e6:.3f}M"


def _plain_checkpoint_round_trip(plain, tmp_path, mode):
    path = tmp_path / "plain.pt"
    torch.save(plain.state_dict(), path)
    model = add_cmpe_se(plain, mode, backend=FUSED)
    # fresh weights everywhere, then the plain checkpoint: only the layers' keys are missing
    for p in model.parameters():
        nn.init.normal_(p)
    res = model.load_state_dict(torch.load(path, weights_only=True), strict=False)
    # (BatchNorm fills a num_batches_tracked missing from a checkpoint with 0 itself, unreported)
    layer_keys = {k for k in model.state_dict() if ".cmpe_se." in k and not k.endswith("num_batches_tracked")}
    assert layer_keys and set(res.missing_keys) == layer_keys
    for k, v in torch.load(path, weights_only=True).items():
        if k in model.state_dict():
            assert torch.equal(model.state_dict()[k], v), k
    return model, res


def test_plain_torchvision_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    model, res = _plain_checkpoint_round_trip(tvm.resnet18(weights=None, num_classes=10), tmp_path, "folded_3x3")
    assert res.unexpected_keys == []


def test_timm_se_checkpoint_loads_without_its_se(tmp_path):
    torch.manual_seed(0)
    model, res = _plain_checkpoint_round_trip(timm.create_model("seresnet18", num_classes=10), tmp_path, "pair_1x1")
    assert res.unexpected_keys and all(".se." in k for k in res.unexpected_keys)


def test_fused_reference_round_trip_and_training_step():
    """revert_model/convert_model on a converted torchvision ResNet: same state_dict, the fused
    network's training step (outputs, gradients, BatchNorm statistics) matches the eager one."""
    torch.manual_seed(0)
    fused = randomise_bn(add_cmpe_se(resnet10(), backend=FUSED))
    ref = revert_model(fused)
    assert {type(m.cmpe_se) for m in ref.modules() if isinstance(m, CMPESEResidualBlock)} == {CMPESEReference}
    back = convert_model(ref, backend=FUSED)
    assert all(type(m.cmpe_se) is CMPESE and m.cmpe_se.backend == FUSED
               for m in back.modules() if isinstance(m, CMPESEResidualBlock))
    for k, v in fused.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ref64 = revert_model(fused).double()
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for net, inp in ((fused, x), (ref, x), (ref64, x.double())):
        out = net.train()(inp)
        out.square().sum().backward()
        outs.append([out] + [p.grad for p in net.parameters()] + [b.clone() for b in net.buffers()
                                                                  if b.is_floating_point()])
    names = ["output"] + [k for k, _ in fused.named_parameters()] + \
        [k for k, b in fused.named_buffers() if b.is_floating_point()]
    for name, got, eager, want in zip(names, *outs, strict=True):
        assert_close_rule(got, want, eager, name)
    with torch.no_grad():
        assert_close_rule(fused.eval()(x), ref64.eval()(x.double()), ref.eval()(x), "eval output")


def test_torch_compile_fullgraph_training_step():
    """The converted network traces as one graph (custom ops, no graph break) and the compiled
    training step computes what the uncompiled one does, BatchNorm statistics included."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = add_cmpe_se(resnet10(), backend=FUSED)
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    y = compiled(x)
    y.sum().backward()
    y_ref = twin(x)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), c in zip(model.named_buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-7, msg=name)


def test_torch_export_eval():
    torch.manual_seed(0)
    model = randomise_bn(add_cmpe_se(resnet10(), "pair_2x1", backend=FUSED)).eval()
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(model, (x,))
    x2 = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x2), model(x2), rtol=1e-5, atol=1e-6)
    if HAS_CPU_KERNEL:
        assert any("cmpe_se" in str(n.target) for n in ep.graph.nodes if n.op == "call_function")


# -- bad input ----------------------------------------------------------------------------------

class MyBlock(tv_resnet.BasicBlock):
    pass


def test_unknown_block_type_is_named():
    with torch.device("meta"):
        net = tv_resnet.ResNet(MyBlock, [1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"unknown residual block type .*MyBlock at layer1\.0"):
        add_cmpe_se(net)
    with pytest.raises(ValueError, match="no torchvision or timm ResNet block in .*Linear"):
        add_cmpe_se(nn.Linear(2, 2))
    with torch.device("meta"):
        eca = timm.create_model("ecaresnet26t")
    with pytest.raises(ValueError, match="EcaModule"):
        add_cmpe_se(eca)


def test_bad_arguments_raise_before_anything_changes():
    with torch.device("meta"):
        net = tvm.resnet18(weights=None)
    before = [type(m) for m in net.modules()]
    with pytest.raises(ValueError, match="mode must be one of"):
        add_cmpe_se(net, "bogus", inplace=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        add_cmpe_se(net, backend="gpu", inplace=True)
    with pytest.raises(TypeError, match="unknown layer argument.*fold"):
        add_cmpe_se(net, fold=16, inplace=True)
    with pytest.raises(ValueError, match="fold_width"):
        add_cmpe_se(net, fold_width=7, inplace=True)  # 64 % 7 != 0: the first block refuses
    assert [type(m) for m in net.modules()] == before
    once = add_cmpe_se(net)
    with pytest.raises(ValueError, match="already has CMPE-SE"):
        add_cmpe_se(once)


def test_layer_kwargs_and_callables():
    with torch.device("meta"):
        net = add_cmpe_se(tvm.resnet50(weights=None), "folded_3x3", reduction=8, padding=1,
                          fold_width=lambda c: c // 16, pair_filters=3)
    layers = [m.cmpe_se for m in net.modules() if isinstance(m, CMPESEResidualBlock)]
    assert {(l.channels, l.fold_width) for l in layers} == {(256, 16), (512, 32), (1024, 64), (2048, 128)}
    assert {(l.reduction, l.padding, l.pair_filters) for l in layers} == {(8, 1, 3)}
    assert all(l.mode in PAIR_MODES for l in layers)


def test_frozen_batchnorm_flags_survive():
    """Fine-tuning often freezes BatchNorms (``bn.eval()``): wrapping must not flip them back."""
    net = tvm.resnet18(weights=None, num_classes=10).train()
    net.layer1[0].bn1.eval()
    model = add_cmpe_se(net)
    assert model.training and model.layer1[0].training and model.layer1[0].cmpe_se.training
    assert not model.layer1[0].bn1.training and model.layer1[0].bn2.training


# -- end-to-end benchmark rows -------------------------------------------------------------------

def test_e2e_rows_for_torchvision_and_timm(monkeypatch):
    """The bench's resnet50-tv rows (plain, CMPE-SE per provider, timm SE baseline) through the same
    code path on one-block-per-stage twins at N=2, 32x32, one timed step each (CPU time in CI)."""
    from cmpe_se_fused.bench import e2e, metrics

    def tv10(se_mode=None, backend="auto"):
        m = resnet10()
        return m if se_mode is None else add_cmpe_se(m, se_mode, backend=backend, inplace=True)

    def one_step(step, device, warmup, reps):
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e6, 1

    monkeypatch.setitem(e2e.NETS, "resnet50-tv", tv10)
    monkeypatch.setitem(e2e.IMAGE_SIZE, "resnet50-tv", {"cpu": 32})
    monkeypatch.setitem(e2e.CLASSES, "resnet50-tv", 10)
    monkeypatch.setitem(e2e.BASELINES, "resnet50-tv", (("timm_se", "timm", lambda: timm.create_model(
        "seresnet18", layers=(1, 1, 1, 1)), "timm"),))
    monkeypatch.setattr(e2e, "_time_steps", one_step)
    providers = ("eager", "cpu") if HAS_CPU_KERNEL else ("eager",)
    rows = []
    e2e.run_e2e(["resnet50-tv"], ("folded_3x3",), ("fp32",), ("nchw",), providers, torch.device("cpu"), (2,),
                on_row=rows.append)
    metrics.derive(rows)
    e2e.derive_e2e(rows)
    assert [(r["se_mode"], r["provider"]) for r in rows] == \
        [("plain", "plain"), *[("folded_3x3", p) for p in providers], ("timm_se", "timm")]
    assert all(r["status"] == "ok" and metrics.check_row(r) == [] for r in rows), rows
    assert all(r["overhead_vs_plain"] is not None for r in rows[1:])
    monkeypatch.setattr(e2e.importlib.util, "find_spec", lambda name: None)  # as without torchvision/timm
    rows = []
    e2e.run_e2e(["resnet50-tv"], ("se",), ("fp32",), ("nchw",), ("eager",), torch.device("cpu"), 2, rows.append)
    assert [r["status"] for r in rows] == ["skipped"] * 3
    assert "torchvision is not installed" in rows[0]["reason"] and "timm is not installed" in rows[2]["reason"]


def test_e2e_presets():
    from cmpe_se_fused.bench import config, e2e
    quick = config.PRESETS["quick"]
    assert quick.e2e and quick.e2e_nets == ("resnet50-tv",) and quick.e2e_batches["resnet50-tv"] == (2,)
    for name in ("gpu", "resnet50"):
        assert config.PRESETS[name].e2e_batches["resnet50-tv"] == (64, 128)
        assert "resnet50-tv" in (config.PRESETS[name].e2e_nets or e2e.NETS)
    for name in ("wrn28-10", "resnet164"):
        assert config.PRESETS[name].e2e_nets == ("wrn16-8", "resnet164")
    assert set(config.CIFAR_E2E_NETS) <= set(e2e.NETS)
    assert e2e.e2e_configs("resnet50-tv", ("se",), ("eager",)) == [(None, "plain"), ("se", "eager"),
                                                                   ("timm_se", "timm")]
