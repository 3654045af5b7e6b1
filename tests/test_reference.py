"""The reference is the oracle, so it is checked against an independent per-sample loop
(explicit fold, explicit 3x3 correlation, explicit BatchNorm formulas), against the nn-layer
module, and by fp64 gradcheck for every mode, training and eval."""
import math

import pytest
import torch
from conftest import make_params

from cmpe_se_fused.reference import (
    MODES,
    PAIR_MODES,
    CMPESEReference,
    backward_op_reference,
    cmpe_se_reference,
    forward_op_reference,
)

CASES = [(m, t, p) for m in MODES for t in (True, False) for p in ((0, 1) if m == "folded_3x3" else (0,))]


def _loop_reference(u, x, prm, mode, training, momentum, eps, m, pad):
    """SPEC section 1 with Python loops over samples, rows and columns (no conv2d, no batch ops)."""
    n_, c, h, w = u.shape
    pools = [([sum(u[n, ch].flatten().tolist()) / (h * w) for ch in range(c)],
              [sum(x[n, ch].flatten().tolist()) / (h * w) for ch in range(c)]) for n in range(n_)]
    rm, rv = prm.get("running_mean"), prm.get("running_var")
    if mode in PAIR_MODES:
        wts = prm["pair_weight"].tolist()
        e = len(wts)
        maps = []  # maps[n][i] = 2-D list
        for pu, px in pools:
            if mode == "folded_3x3":
                k = c // m
                fimg = []
                for q in range(k):
                    fimg.append([pu[q * m + j] for j in range(m)])
                    fimg.append([px[q * m + j] for j in range(m)])
                rows, cols = 2 * k, m
                get = lambda r, cc: fimg[r][cc] if 0 <= r < rows and 0 <= cc < cols else 0.0  # noqa: E731
                hm, wm = rows - 2 + 2 * pad, cols - 2 + 2 * pad
                per = [[[sum(wts[i][0][a][b] * get(r + a - pad, cc + b - pad) for a in range(3) for b in range(3))
                         for cc in range(wm)] for r in range(hm)] for i in range(e)]
            elif mode == "pair_2x1":
                per = [[[wts[i][0][0][0] * pu[ch] + wts[i][0][0][1] * px[ch]] for ch in range(c)] for i in range(e)]
            else:
                per = [[[wts[i][0][0][0] * pu[ch], wts[i][0][0][0] * px[ch]] for ch in range(c)] for i in range(e)]
            maps.append(per)
        gam, bet = prm["bn_weight"].tolist(), prm["bn_bias"].tolist()
        zs = [None] * n_
        for i in range(e):
            vals = [v for n in range(n_) for row in maps[n][i] for v in row]
            big_m = len(vals)
            if training:
                mu = sum(vals) / big_m
                var = sum((v - mu) ** 2 for v in vals) / big_m
                rm[i] = (1 - momentum) * rm[i] + momentum * mu
                rv[i] = (1 - momentum) * rv[i] + momentum * var * big_m / (big_m - 1)
            else:
                mu, var = rm[i].item(), rv[i].item()
            sd = math.sqrt(var + eps)
            for n in range(n_):
                flat = [gam[i] * (v - mu) / sd + bet[i] for row in maps[n][i] for v in row]
                zs[n] = flat if zs[n] is None else [a + b for a, b in zip(zs[n], flat)]
        zs = [[v / e for v in z] for z in zs]
    w1, w2 = prm["fc1_weight"].tolist(), prm["fc2_weight"].tolist()
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))  # noqa: E731
    y = torch.empty_like(u)
    for n in range(n_):
        pu, px = pools[n]
        if mode == "double_fc":
            wi = prm["fc1_identity_weight"].tolist()
            hid = [max(0.0, dot(row, pu)) for row in w1] + [max(0.0, dot(row, px)) for row in wi]
        else:
            z = pu if mode == "se" else zs[n]
            hid = [max(0.0, dot(row, z)) for row in w1]
        for ch in range(c):
            s = 1 / (1 + math.exp(-dot(w2[ch], hid)))
            y[n, ch] = s * u[n, ch] + x[n, ch]
    return y


@pytest.mark.parametrize("mode,training,pad", CASES)
def test_reference_matches_loop(mode, training, pad):
    torch.manual_seed(1)
    u, x = torch.randn(3, 16, 2, 3, dtype=torch.float64), torch.randn(3, 16, 2, 3, dtype=torch.float64)
    prm = make_params(mode, 16, fold_width=4, padding=pad, pair_filters=2)
    loop_prm = {k: v.clone() for k, v in prm.items()}
    y = cmpe_se_reference(u, x, mode=mode, training=training, fold_width=4, padding=pad, **prm)
    y_loop = _loop_reference(u, x, loop_prm, mode, training, 0.1, 1e-5, 4, pad)
    torch.testing.assert_close(y, y_loop, rtol=1e-10, atol=1e-10)
    for name in ("running_mean", "running_var"):
        if name in prm:
            torch.testing.assert_close(prm[name], loop_prm[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode,training,pad", CASES)
def test_reference_matches_nn_module(mode, training, pad):
    """The functional reference against CMPESEReference (nn.Linear/Conv2d/BatchNorm2d themselves)."""
    torch.manual_seed(2)
    mod = CMPESEReference(32, mode=mode, reduction=4, fold_width=8, padding=pad, pair_filters=3).double()
    mod.train(training)
    if mode in PAIR_MODES:
        with torch.no_grad():
            mod.pair_bn.weight.uniform_(0.5, 1.5)
            mod.pair_bn.bias.uniform_(-0.5, 0.5)
            mod.pair_bn.running_mean.uniform_(-0.2, 0.2)
            mod.pair_bn.running_var.uniform_(0.5, 1.5)
    u, x = torch.randn(4, 32, 3, 3, dtype=torch.float64), torch.randn(4, 32, 3, 3, dtype=torch.float64)
    sd = {k: v.clone() for k, v in mod.state_dict().items()}
    y_mod = mod(u, x)
    kw = dict(fc1_weight=sd["fc1.weight"], fc2_weight=sd["fc2.weight"], fc1_identity_weight=sd.get("fc1_identity.weight"))
    if mode in PAIR_MODES:
        kw.update(pair_weight=sd["pair_conv.weight"], bn_weight=sd["pair_bn.weight"], bn_bias=sd["pair_bn.bias"],
                  running_mean=sd["pair_bn.running_mean"], running_var=sd["pair_bn.running_var"])
    y = cmpe_se_reference(u, x, mode=mode, training=training, fold_width=8, padding=pad, **kw)
    torch.testing.assert_close(y, y_mod, rtol=1e-12, atol=1e-12)
    if mode in PAIR_MODES:
        torch.testing.assert_close(kw["running_mean"], mod.pair_bn.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(kw["running_var"], mod.pair_bn.running_var, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode,training,pad", CASES)
def test_reference_gradcheck(mode, training, pad):
    torch.manual_seed(3)
    prm = make_params(mode, 16, fold_width=4, padding=pad, pair_filters=2)
    u = torch.randn(3, 16, 2, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 16, 2, 2, dtype=torch.float64, requires_grad=True)
    names = [k for k in prm if k not in ("running_mean", "running_var")]
    for k in names:
        prm[k].requires_grad_(True)
    rm0 = {k: prm[k].clone() for k in ("running_mean", "running_var") if k in prm}

    def f(u, x, *weights):
        stats = {k: v.clone() for k, v in rm0.items()}  # running stats must not drift between calls
        return cmpe_se_reference(u, x, mode=mode, training=training, fold_width=4, padding=pad,
                                 **dict(zip(names, weights)), **stats)

    # fast mode (a random direction per input): the formulas themselves are checked entry by entry by
    # test_op_contract_reference_matches_autograd; this checks that autograd through the reference is
    # a true derivative (no detached or in-place step), which one direction per input shows
    assert torch.autograd.gradcheck(f, (u, x, *[prm[k] for k in names]), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("mode,training,pad", CASES)
def test_op_contract_reference_matches_autograd(mode, training, pad):
    """backward_op_reference (SPEC section 2, formula by formula) == autograd of the reference."""
    torch.manual_seed(4)
    prm = make_params(mode, 24, fold_width=6, padding=pad, pair_filters=3)
    u, x = torch.randn(5, 24, 3, 2, dtype=torch.float64), torch.randn(5, 24, 3, 2, dtype=torch.float64)
    args = [prm.get(k) for k in ("fc1_weight", "fc1_identity_weight", "fc2_weight", "pair_weight", "bn_weight",
                                 "bn_bias")]
    stats = [prm.get("running_mean", torch.empty(0, dtype=torch.float64)),
             prm.get("running_var", torch.empty(0, dtype=torch.float64))]
    stats_copy = [s.clone() for s in stats]
    y, pool_u, pool_x, gate, hidden, mean, invstd = forward_op_reference(
        u, x, *args, *stats, mode, training, 0.1, 1e-5, 6, pad)
    gy = torch.randn_like(y)
    grads = backward_op_reference(gy, u, pool_u, pool_x, gate, hidden, mean, invstd, *args, mode, training, 6, pad)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in [u, x] + args]
    y2 = cmpe_se_reference(leaves[0], leaves[1], leaves[2], leaves[4], leaves[3], *leaves[5:],
                           *stats_copy, mode=mode, training=training, fold_width=6, padding=pad)
    torch.testing.assert_close(y, y2)
    y2.backward(gy)
    order = [0, 1, 2, 3, 4, 5, 6, 7]  # grads order: u, x, fc1, fc1_id, fc2, pair, bn_w, bn_b
    for i, leaf in zip(order, leaves):
        if leaf is None:
            assert grads[i].numel() == 0
        else:
            torch.testing.assert_close(grads[i], leaf.grad, rtol=1e-9, atol=1e-11)
    for s, s_copy in zip(stats, stats_copy):  # both paths updated the running stats the same way
        torch.testing.assert_close(s, s_copy)
