"""The paper's networks: parameter counts against the paper's table (SPEC section 5) and a
training step through the CMPE-SE layers."""
import pytest
import torch

from cmpe_se_fused.models import preact_resnet, preact_resnet50, wide_resnet
from cmpe_se_fused.models.networks import wrn_fold_width

# millions, CIFAR heads (10 classes for pre-act ResNet, 100 for WRN); None = empty cell
PAPER = {
    "preact_resnet110": (lambda s: preact_resnet(110, 10, se_mode=s),
                         {None: 1.7, "se": 1.75, "pair_1x1": 1.76}),
    "preact_resnet164": (lambda s: preact_resnet(164, 10, se_mode=s),
                         {None: 1.7, "se": 1.95, "double_fc": 2.12, "pair_2x1": 1.95, "pair_1x1": 2.04,
                          "folded_3x3": 1.99}),
    "wrn16_8": (lambda s: wide_resnet(16, 8, 100, se_mode=s), {"pair_1x1": 11.1, "folded_3x3": 11.1}),
    "wrn22_10": (lambda s: wide_resnet(22, 10, 100, se_mode=s),
                 {None: 26.8, "se": 27.0, "pair_1x1": 27.1, "folded_3x3": 27.1}),
    "wrn28_10": (lambda s: wide_resnet(28, 10, 100, se_mode=s),
                 {None: 36.5, "se": 36.8, "double_fc": 37.0, "pair_2x1": 36.8, "pair_1x1": 36.9,
                  "folded_3x3": 36.9}),
}
CELLS = [(net, mode, val) for net, (_, row) in PAPER.items() for mode, val in row.items()]


@pytest.mark.parametrize("net,mode,paper", CELLS, ids=[f"{n}-{m}" for n, m, _ in CELLS])
def test_parameter_counts_match_paper(net, mode, paper):
    with torch.device("meta"):
        model = PAPER[net][0](mode)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    assert abs(count - paper) / paper <= 0.03, f"{net} {mode}: {count:.3f}M vs paper {paper}M"


def test_defaults_follow_spec():
    wrn = wide_resnet(28, 10, se_mode="folded_3x3")
    se_layers = [m.se for m in wrn.modules() if hasattr(m, "se") and m.se is not None]
    assert {(l.channels, l.fold_width, l.pair_filters) for l in se_layers} == {(160, 16, 10), (320, 32, 20),
                                                                               (640, 64, 40)}
    r164 = preact_resnet(164, se_mode="folded_3x3")
    se_layers = [m.se for m in r164.modules() if hasattr(m, "se") and m.se is not None]
    assert {(l.channels, l.fold_width, l.pair_filters) for l in se_layers} == {(64, 16, 1), (128, 16, 2),
                                                                               (256, 16, 4)}
    assert wrn_fold_width(128) == 16 and wrn_fold_width(160) == 16 and wrn_fold_width(640) == 64


def test_bad_depth():
    with pytest.raises(ValueError, match="depth"):
        preact_resnet(100)
    with pytest.raises(ValueError, match="depth"):
        wide_resnet(27, 10)


@pytest.mark.parametrize("mode", [None, "se", "double_fc", "pair_2x1", "pair_1x1", "folded_3x3"])
def test_training_step_small_resnet(mode):
    torch.manual_seed(0)
    model = preact_resnet(20, se_mode=mode, fold_width=4, backend="auto")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    model.eval()
    assert model(x[:1]).shape == (1, 10)


def test_resnet50_forward():
    with torch.device("meta"):
        model = preact_resnet50(se_mode="se")
    assert model.fc.out_features == 1000
    model = preact_resnet50(num_classes=5, se_mode="folded_3x3").eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
