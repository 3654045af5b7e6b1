"""The real CUDA kernels on the CPU: a thread-per-GPU-thread emulator, plus an access tracer.

The device code (``csrc/kernels/*.cuh``) and the launch planner (``csrc/cuda/launch_plan.cuh``)
are compiled by the host compiler against a small shim (``shim/``): every GPU thread is a fiber
(its own stack; all fibers of a launch take turns on the calling OS thread, switching only where a
GPU thread waits), ``__syncthreads`` and warp shuffles are barriers, the grid barrier spins on its counters,
thread-block clusters and distributed shared memory are emulated. ``harness.cpp`` exposes
``emu_forward`` / ``emu_backward`` (one pass with a given launch), ``emu_plan`` (the launch the
binding would pick, on an emulated device) and the tracer of the full-size tensors' global
accesses (``emu_trace``, ``emu_trace_take``, ``emu_site_names``).

What it checks: indexing, the barrier/phase structure, the numerics of the actual kernels, the
planner's choices and workspace layout, bytes moved and the 32-byte sectors each warp-level access
touches. What it cannot check: the GPU memory model, real occupancy, cooperative / cluster
launches, graph capture, speed (docs/CUDA.md).

The extension is built once per source hash (``build/emulator-<hash>/``) and once per process.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import shutil
import threading

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CFLAGS = ["-std=c++20", "-O1", "-fno-strict-aliasing", "-w"]
LAUNCH_FIELDS = ("threads", "blocks", "splits", "cv", "gw", "vec", "smem", "cooperative", "per_sample", "cluster")
PATHS = {"persistent": 0, "per_sample": 1, "resident": 2}

_lock = threading.Lock()
_module = None


def sources() -> list[str]:
    """Every file the kernels' translation unit (harness.cpp) depends on. The build folder and the
    module name carry their hash; module.cpp (the Python bindings only) is rebuilt in place by
    ninja when it changes."""
    files = [os.path.join(HERE, "harness.cpp")] + sorted(glob.glob(os.path.join(HERE, "shim", "*.h")))
    files += sorted(glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cuh")))
    files += [os.path.join(ROOT, "csrc", "cmpe_se.h"), os.path.join(ROOT, "csrc", "cuda", "launch_plan.cuh")]
    return files


def source_hash() -> str:
    h = hashlib.sha256()
    for f in sources():
        h.update(os.path.relpath(f, ROOT).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    h.update(" ".join(CFLAGS).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:12]


def have_compiler() -> bool:
    return shutil.which("c++") is not None or shutil.which("g++") is not None


def build():
    """The compiled emulator (built at most once per process; reused across processes while the
    sources are unchanged: torch's extension loader finds the finished build in the folder)."""
    global _module
    with _lock:
        if _module is not None:
            return _module
        from torch.utils import cpp_extension

        digest = source_hash()
        build_dir = os.path.join(ROOT, "build", f"emulator-{digest}")
        os.makedirs(build_dir, exist_ok=True)
        _module = cpp_extension.load(
            f"cmpe_se_cuda_emulator_{digest}",
            sources=[os.path.join(HERE, "harness.cpp"), os.path.join(HERE, "module.cpp")],
            extra_include_paths=[os.path.join(HERE, "shim"), os.path.join(ROOT, "csrc")],
            extra_cflags=CFLAGS, build_directory=build_dir, verbose=False)
        return _module


# ---- devices ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EmuDevice:
    """The emulated device the planner sees: real limits scaled down so that grids stay a few blocks
    of GPU threads and the resident path needs clusters at small shapes."""
    cc_major: int = 9
    sms: int = 2
    smem_optin: int = 24 * 1024
    smem_per_sm: int = 48 * 1024 + 2048
    regs_per_sm: int = 32768
    max_threads_per_sm: int = 256
    max_blocks_per_sm: int = 32

    def vector(self):
        return [self.cc_major, self.sms, self.smem_optin, self.smem_per_sm, self.regs_per_sm,
                self.max_threads_per_sm, self.max_blocks_per_sm]


TINY = EmuDevice()
TINY_SM80 = EmuDevice(cc_major=8)


# ---- launches ---------------------------------------------------------------------------------

def _geom_args(mode, shape, fold_width, padding, pair_filters, reduction):
    n, c, h, w = shape
    r = max(1, c // reduction)
    return [n, c, h, w, mode, pair_filters, r, fold_width, padding]


def plan(mode, shape, dtype, *, layout="nchw", backward=False, training=True, fold_width=8, padding=0, pair_filters=3,
         reduction=4, path="persistent", cluster=0, threads=128, max_blocks=0, splits=0, vec=True, device=TINY):
    """The planner's launch on the emulated device: dict of LAUNCH_FIELDS plus ``workspace``."""
    emu = build()
    elem = torch.empty(0, dtype=dtype).element_size()
    cl = _layout_cl(layout, shape)
    v = emu.emu_plan(*_geom_args(mode, shape, fold_width, padding, pair_filters, reduction), cl, backward, training,
                     elem, True, [threads, max_blocks, splits, int(vec), 1, PATHS[path], cluster], device.vector())
    d = dict(zip(LAUNCH_FIELDS, v[:10]))
    d["workspace"] = v[10]
    return d


def explicit(mode, shape, dtype, *, layout="nchw", backward=False, fold_width=8, padding=0, pair_filters=3,
             reduction=4, threads=128, blocks=3, splits=2, vec=None, cluster=0, per_sample=False):
    """A hand-picked launch (tiny grids, any thread count): dict of LAUNCH_FIELDS."""
    emu = build()
    elem = torch.empty(0, dtype=dtype).element_size()
    cl = _layout_cl(layout, shape)
    if vec is None:
        full = 16 // elem
        c, p = shape[1], shape[2] * shape[3]
        vec = full if (c % full == 0 if cl else p % full == 0) else 1
    v = emu.emu_explicit(*_geom_args(mode, shape, fold_width, padding, pair_filters, reduction), cl, backward, elem,
                         threads, blocks, splits, vec, cluster, per_sample)
    return dict(zip(LAUNCH_FIELDS, v))


def _layout_cl(layout, shape):
    """The binding's layout rule: channels_last when asked and C > 1, or whenever H*W == 1."""
    _, c, h, w = shape
    return (layout == "channels_last" and c > 1) or h * w == 1


def _lvec(launch):
    return [int(launch[k]) for k in LAUNCH_FIELDS]


# ---- a case against the float64 reference -----------------------------------------------------

def make_case(mode, dtype, shape, layout, training, *, fold_width=8, padding=0, pair_filters=3, reduction=4, seed=0,
              momentum=0.1, eps=1e-5):
    from conftest import make_params

    _, c, _, _ = shape
    g = torch.Generator().manual_seed(seed)
    u64 = torch.randn(*shape, generator=g, dtype=torch.float64) + 0.5
    x64 = torch.randn(*shape, generator=g, dtype=torch.float64)
    dy64 = torch.randn(*shape, generator=g, dtype=torch.float64)
    p64 = make_params(mode, c, reduction=reduction, pair_filters=pair_filters, fold_width=fold_width, padding=padding,
                      seed=seed + 1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def build_args(dt, wdt):
        d = {"u": u64.to(dt).contiguous(memory_format=fmt), "x": x64.to(dt).contiguous(memory_format=fmt),
             "dy": dy64.to(dt).contiguous(memory_format=fmt)}
        for k in ("fc1_weight", "fc1_identity_weight", "fc2_weight", "pair_weight", "bn_weight", "bn_bias"):
            d[k] = p64[k].to(wdt) if k in p64 else None
        for k in ("running_mean", "running_var"):
            d[k] = p64[k].float().clone() if k in p64 else torch.zeros(0)
        return d

    # (the op takes a float momentum; the module's bn_momentum=None is 1 / num_batches_tracked per step)
    kw = {"mode": mode, "training": training, "momentum": momentum, "eps": eps, "fold_width": fold_width,
          "padding": padding}
    return build_args(dtype, acc), build_args(torch.float64, torch.float64), build_args(dtype, acc), kw


FWD_ORDER = ("u", "x", "fc1_weight", "fc1_identity_weight", "fc2_weight", "pair_weight", "bn_weight", "bn_bias",
             "running_mean", "running_var")
KW_ORDER = ("mode", "training", "momentum", "eps", "fold_width", "padding")
FWD_NAMES = ("y", "pool_u", "pool_x", "gate", "hidden", "bn_mean", "bn_invstd")
BWD_NAMES = ("grad_u", "grad_x", "d_fc1", "d_fc1_id", "d_fc2", "d_pair", "d_bn_w", "d_bn_b")


def fwd_args(d, kw):
    return [d[k] for k in FWD_ORDER] + [kw[k] for k in KW_ORDER]


def bwd_args(dy, d, saved, kw):
    _, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd = saved
    return [dy, d["u"], pool_u, pool_x, gate, hidden, bn_mean, bn_invstd, d["fc1_weight"], d["fc1_identity_weight"],
            d["fc2_weight"], d["pair_weight"], d["bn_weight"], d["bn_bias"], kw["mode"], kw["training"],
            kw["fold_width"], kw["padding"]]


def run_case(mode, dtype, shape, layout, training, fwd_launch, bwd_launch, *, check=True, fold_width=8, padding=0,
             pair_filters=3, reduction=4, momentum=0.1, eps=1e-5, seed=0):
    """Forward then backward with the given launches; with ``check``, every output against the
    float64 reference with the eager-error tolerance rule (conftest.assert_close_rule)."""
    from conftest import assert_close_rule

    from cmpe_se_fused.reference import PAIR_MODES, backward_op_reference, forward_op_reference

    emu = build()
    d, d64, de, kw = make_case(mode, dtype, shape, layout, training, fold_width=fold_width, padding=padding,
                               pair_filters=pair_filters, reduction=reduction, momentum=momentum, eps=eps, seed=seed)
    cl = _layout_cl(layout, shape)
    tag = f"{mode}/{dtype}/{shape}/{layout}/train={training}/eps={eps}/momentum={momentum}"
    out = emu.emu_forward(*fwd_args(d, kw), cl, _lvec(fwd_launch))
    grads = emu.emu_backward(*bwd_args(d["dy"], d, out, kw), cl, _lvec(bwd_launch))
    if not check:
        return out, grads
    ref = forward_op_reference(*fwd_args(d64, kw))
    eag = forward_op_reference(*fwd_args(de, kw))
    for name, o, r, e in zip(FWD_NAMES, out, ref, eag):
        assert o.shape == r.shape, f"{tag} {name}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        if o.numel():
            assert_close_rule(o, r, e, name=f"{tag} {name}")
    if mode in PAIR_MODES and training:
        for k in ("running_mean", "running_var"):
            assert_close_rule(d[k], d64[k], de[k], name=f"{tag} {k}")
    gref = backward_op_reference(*bwd_args(d64["dy"], d64, ref, kw))
    geag = backward_op_reference(*bwd_args(de["dy"], de, eag, kw))
    for name, o, r, e in zip(BWD_NAMES, grads, gref, geag):
        assert o.shape == r.shape, f"{tag} {name}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        if o.numel():
            assert_close_rule(o, r, e, name=f"{tag} {name}")
    return out, grads


# ---- the tracer: bytes moved and coalescing ---------------------------------------------------

FWD_TENSORS = ("U", "X", "Y")
BWD_TENSORS = ("dY", "U", "dU", "dX")


@dataclasses.dataclass
class Traffic:
    """Global traffic of the full-size tensors of one pass (all its launches), from the tracer."""
    tensor_bytes: int                      # T
    read: dict                             # tensor name -> bytes read
    written: dict                          # tensor name -> bytes written
    phases: dict                           # phase -> {"bytes", "sectors", "min_sectors", "requests"}

    @property
    def read_T(self):
        return sum(self.read.values()) / self.tensor_bytes

    @property
    def written_T(self):
        return sum(self.written.values()) / self.tensor_bytes

    @property
    def total_T(self):
        return self.read_T + self.written_T

    def efficiency(self, phase):
        p = self.phases[phase]
        return p["min_sectors"] / p["sectors"] if p["sectors"] else 1.0


def _phase_name(site: str, store: bool, epoch: int) -> str:
    """Kernel phase of a traced access, from the function that made it (the call site of the vector
    helper) and, where the compiler inlined the phase function into the kernel body, from the grid
    barriers the block had passed (the persistent kernels' squeeze is before the first one)."""
    if store:
        return "apply (store)"
    if "resident_load" in site:
        return "load"
    if "squeeze" in site:
        return "squeeze"
    if "apply" in site or "resident_backward_body" in site:
        return "apply (load)"
    if "forward_body" in site and "ItemRange const&)#1}" in site:
        return "squeeze"  # forward_body's first lambda
    if "forward_body" in site and "ItemRange const&)#2}" in site:
        return "apply (load)"
    return "squeeze" if epoch == 0 else "apply (load)"


def traced(fn):
    """Run ``fn()`` with the tracer on; returns (fn's result, events, threads per launch)."""
    emu = build()
    emu.emu_trace(True)
    try:
        res = fn()
        ev, threads = emu.emu_trace_take()
    finally:
        emu.emu_trace(False)
    return res, ev, threads


def analyse(ev: torch.Tensor, threads: torch.Tensor, names, tensor_bytes: int) -> Traffic:
    """Bytes per tensor and, per phase, the 32-byte sectors each warp-level access touches versus
    the minimum for its bytes. A warp-level access: the same call site, the k-th time each lane of
    the warp reached it (lanes of a warp run the same loops; a lane that skips the tail of a loop
    simply is not in that request, as on the GPU)."""
    emu = build()
    read = {n: 0 for n in names}
    written = {n: 0 for n in names}
    phases: dict = {}
    if ev.numel() == 0:
        return Traffic(tensor_bytes, read, written, phases)
    launch, gthread, addr, nbytes, store, _epoch, rng, site = ev.unbind(1)
    for i, n in enumerate(names):
        m = rng == i
        read[n] = int(nbytes[m & (store == 0)].sum())
        written[n] = int(nbytes[m & (store == 1)].sum())
    usites, site_idx = torch.unique(site, return_inverse=True)
    site_names = emu.emu_site_names(usites)
    thr = threads[launch]
    warp = (gthread // thr) * 1024 + (gthread % thr) // 32  # block * 1024 + warp in block
    # occurrence of (launch, thread, site): events of one thread are in program order
    key = (launch * (1 << 20) + gthread) * 4096 + site_idx
    order = torch.sort(key, stable=True).indices
    ks = key[order]
    start = torch.ones_like(ks, dtype=torch.bool)
    start[1:] = ks[1:] != ks[:-1]
    pos = torch.arange(ks.numel())
    first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values
    occ = torch.empty_like(pos)
    occ[order] = pos - first
    # request id: (launch, warp, site, occurrence)
    req_key = torch.stack([launch, warp, site_idx, occ], 1)
    _, req = torch.unique(req_key, dim=0, return_inverse=True)
    sector = addr // 32
    last_sector = (addr + nbytes - 1) // 32
    # touched sectors per request (a 16-byte aligned vector lies in one sector; count the span otherwise)
    pairs = torch.unique(torch.stack([req, sector], 1), dim=0)
    extra = torch.stack([req, last_sector], 1)[last_sector != sector]
    if extra.numel():
        pairs = torch.unique(torch.cat([pairs, extra]), dim=0)
    n_req = int(req.max()) + 1
    touched = torch.bincount(pairs[:, 0], minlength=n_req)
    # distinct bytes per request (lanes reading the same address count once)
    uniq = torch.unique(torch.stack([req, addr, nbytes], 1), dim=0)
    req_bytes = torch.bincount(uniq[:, 0], weights=uniq[:, 2].double(), minlength=n_req)
    min_sectors = torch.ceil(req_bytes / 32)
    req_site = torch.zeros(n_req, dtype=torch.long)
    req_site[req] = site_idx
    req_store = torch.zeros(n_req, dtype=torch.long)
    req_store[req] = store
    req_epoch = torch.zeros(n_req, dtype=torch.long)
    req_epoch[req] = _epoch
    combos = torch.unique(torch.stack([req_site, req_store, req_epoch], 1), dim=0)
    for si, st, ep in combos.tolist():
        name = _phase_name(site_names[si], bool(st), ep)
        m = (req_site == si) & (req_store == st) & (req_epoch == ep)
        ph = phases.setdefault(name, {"bytes": 0, "sectors": 0, "min_sectors": 0, "requests": 0})
        ph["bytes"] += int(req_bytes[m].sum())
        ph["sectors"] += int(touched[m].sum())
        ph["min_sectors"] += int(min_sectors[m].sum())
        ph["requests"] += int(m.sum())
    return Traffic(tensor_bytes, read, written, phases)


def measure(mode, dtype, shape, layout, training, fwd_launch, bwd_launch, **case_kw):
    """Forward and backward under the tracer: (Traffic forward, Traffic backward)."""
    emu = build()
    d, _, _, kw = make_case(mode, dtype, shape, layout, training, **case_kw)
    cl = _layout_cl(layout, shape)
    tb = d["u"].numel() * d["u"].element_size()
    out, ev, th = traced(lambda: emu.emu_forward(*fwd_args(d, kw), cl, _lvec(fwd_launch)))
    fwd = analyse(ev, th, FWD_TENSORS, tb)
    _, ev, th = traced(lambda: emu.emu_backward(*bwd_args(d["dy"], d, out, kw), cl, _lvec(bwd_launch)))
    bwd = analyse(ev, th, BWD_TENSORS, tb)
    return fwd, bwd
