"""Synchronised pair-view BatchNorm and DDP, on CPU: 2 processes, gloo, a free port.

One spawn runs every multi-process check (starting processes is the slow part); each check
compares against the single-process computation on the concatenated batch, which every rank
also runs itself.
"""
from __future__ import annotations

import copy
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from cmpe_se_fused import CMPESE, CMPESEReference
from cmpe_se_fused.dispatch import BACKENDS
from cmpe_se_fused.distributed import SyncCMPESE, convert_sync_batchnorm, convert_sync_cmpe_se, revert_sync_cmpe_se
from cmpe_se_fused.reference import PAIR_MODES

HAS_CPU_KERNEL = not BACKENDS["cpu"].not_supported_reasons()
LAYER_BACKENDS = ["reference"] + (["cpu"] if HAS_CPU_KERNEL else [])
SPLITS = (3, 5)  # uneven on purpose: the global count must come from the all-reduce
TIGHT = dict(rtol=1e-9, atol=1e-11)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def randomise(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
                t.copy_(1 + 0.2 * noise.abs() if name.endswith("running_var") else
                        1 + 0.2 * noise if name.endswith("bn.weight") else 0.5 * noise)
    return module


def layer(mode, backend, cls=CMPESE):
    torch.manual_seed(0)
    return randomise(cls(16, mode=mode, reduction=4, pair_filters=3, fold_width=8, backend=backend).double())


class TinyNet(nn.Module):
    """conv -> conv -> CMPE-SE -> head: no BatchNorm outside the layer (gloo has no CPU SyncBatchNorm)."""

    def __init__(self, mode, backend):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.se = CMPESE(16, mode=mode, reduction=4, pair_filters=2, fold_width=8, backend=backend)
        self.fc = nn.Linear(16, 10)

    def forward(self, img):
        x = self.conv1(img)
        return self.fc(self.se(self.conv2(torch.relu(x)), x).mean((2, 3)))


def my_slice(rank):
    start = sum(SPLITS[:rank])
    return slice(start, start + SPLITS[rank])


def check_sync_layer(rank, mode, backend):
    """SyncCMPESE on each rank's part == CMPESE on the whole batch: output, dU, dX, weight grads, stats."""
    single = layer(mode, backend)
    synced = convert_sync_cmpe_se(copy.deepcopy(single))
    assert type(synced) is SyncCMPESE and synced.state_dict().keys() == single.state_dict().keys()
    g = torch.Generator().manual_seed(2)
    n = sum(SPLITS)
    u, x, w = (torch.randn(n, 16, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    uf, xf = u.clone().requires_grad_(), x.clone().requires_grad_()
    y_full = single(uf, xf)
    (y_full * w).sum().backward()
    sl = my_slice(rank)
    ur, xr = u[sl].clone().requires_grad_(), x[sl].clone().requires_grad_()
    y = synced(ur, xr)
    (y * w[sl]).sum().backward()  # sum of the ranks' losses == the full-batch loss
    torch.testing.assert_close(y, y_full[sl], **TIGHT)
    torch.testing.assert_close(ur.grad, uf.grad[sl], **TIGHT)
    torch.testing.assert_close(xr.grad, xf.grad[sl], **TIGHT)
    for (name, p), p_full in zip(synced.named_parameters(), single.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, p_full.grad, **TIGHT, msg=f"{mode} {name}")
    torch.testing.assert_close(synced.state_dict(), single.state_dict(), **TIGHT)
    # evaluation mode (and no grad): the fused layer itself, bit for bit
    synced.eval(), single.eval()
    with torch.no_grad():
        assert torch.equal(synced(u[sl], x[sl]), single(u[sl], x[sl]))


def check_sync_autocast(rank, backend):
    """Under bf16 autocast the synchronised layer matches the single-process one on bf16 inputs."""
    single = layer("folded_3x3", backend).float()
    synced = convert_sync_cmpe_se(copy.deepcopy(single))
    g = torch.Generator().manual_seed(5)
    u, x = (torch.randn(sum(SPLITS), 16, 3, 3, generator=g) for _ in range(2))
    sl = my_slice(rank)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = synced(u[sl], x[sl])
    # SPEC: under autocast the layer runs on bf16 inputs with an fp32 small network
    y_full = single(u.bfloat16(), x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_full[sl].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(synced.state_dict(), single.state_dict(), rtol=1e-5, atol=1e-6)


def check_local_stats(rank, mode, backend):
    """Without sync, each rank's pair_bn normalises with its own part of the batch."""
    single = layer(mode, backend)
    mine = copy.deepcopy(single)
    g = torch.Generator().manual_seed(3)
    n = sum(SPLITS)
    u, x = (torch.randn(n, 16, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    sl = my_slice(rank)
    y_local = mine(u[sl], x[sl])
    alone = copy.deepcopy(single)
    assert torch.equal(y_local, alone(u[sl], x[sl]))  # exactly a one-process run on this rank's part
    assert not torch.allclose(y_local, single(u, x)[sl], rtol=1e-6, atol=1e-8)


def check_ddp(rank, mode, backend, sync):
    """DDP of a tiny network: gradients agree across ranks; with sync they equal the full-batch ones."""
    torch.manual_seed(0)
    single = randomise(TinyNet(mode, backend).double())
    net = copy.deepcopy(single)
    if sync:
        net = convert_sync_batchnorm(net, cmpe_se=True)
        assert type(net.se) is SyncCMPESE
    ddp = DDP(net)
    g = torch.Generator().manual_seed(4)
    n = sum(SPLITS)
    img = torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64)
    label = torch.randint(0, 10, (n,), generator=g)
    sl = my_slice(rank)
    # DDP averages gradients over ranks: weight the local mean loss so the sum is the full-batch mean
    (F.cross_entropy(ddp(img[sl]), label[sl]) * (len(SPLITS) * SPLITS[rank] / n)).backward()
    F.cross_entropy(single(img), label).backward()
    for (name, p), p_full in zip(net.named_parameters(), single.parameters()):
        gathered = [torch.empty_like(p.grad) for _ in SPLITS]
        dist.all_gather(gathered, p.grad)
        assert all(torch.equal(gathered[0], t) for t in gathered), f"DDP gradients differ across ranks: {name}"
        if sync or mode not in PAIR_MODES:
            torch.testing.assert_close(p.grad, p_full.grad, **TIGHT, msg=f"{mode} {name}")
        elif name.startswith(("se.fc1", "conv")):
            assert not torch.allclose(p.grad, p_full.grad, rtol=1e-6, atol=1e-9), name  # local stats differ


def _worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for backend in LAYER_BACKENDS:
                for mode in PAIR_MODES:
                    check_sync_layer(rank, mode, backend)
                    check_local_stats(rank, mode, backend)
                check_sync_autocast(rank, backend)
                for mode, sync in (("folded_3x3", True), ("pair_2x1", True), ("folded_3x3", False), ("se", True)):
                    check_ddp(rank, mode, backend, sync)
        # the synchronised layer uses no deprecated torch.distributed API (it warned on every rank)
        deprecated = [str(w.message) for w in caught
                      if "deprecated" in str(w.message) and "distributed" in str(w.message)]
        assert not deprecated, deprecated
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_gloo():
    mp.spawn(_worker, args=(len(SPLITS), free_port()), nprocs=len(SPLITS), join=True)


@pytest.mark.parametrize("mode", PAIR_MODES)
def test_single_process_sync_layer_is_the_fused_layer(mode):
    """No process group: SyncCMPESE is CMPESE, training mode included, bit for bit."""
    plain = layer(mode, "reference")
    synced = convert_sync_cmpe_se(copy.deepcopy(plain))
    u, x = torch.randn(4, 16, 2, 2, dtype=torch.float64), torch.randn(4, 16, 2, 2, dtype=torch.float64)
    assert torch.equal(synced(u, x), plain(u, x))
    assert all(torch.equal(a, b) for a, b in zip(synced.state_dict().values(), plain.state_dict().values()))
    back = revert_sync_cmpe_se(synced)
    assert type(back) is CMPESE and back.pair_bn is synced.pair_bn


def test_convert_sync_batchnorm_leaves_pair_bn_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(16), CMPESEReference(16, mode="pair_1x1", pair_filters=2))
    keys = list(net.state_dict())
    out = convert_sync_batchnorm(copy.deepcopy(net))
    assert type(out[0]) is nn.SyncBatchNorm and type(out[1]) is CMPESEReference
    assert type(out[1].pair_bn) is nn.BatchNorm2d
    out = convert_sync_batchnorm(copy.deepcopy(net), cmpe_se=True)
    assert type(out[1]) is SyncCMPESE and type(out[1].pair_bn) is nn.BatchNorm2d
    assert list(out.state_dict()) == keys
