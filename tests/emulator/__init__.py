"""The real CUDA kernels on the CPU: a thread-per-GPU-thread emulator, plus an access tracer.

The device code (``csrc/kernels/*.cuh``) and the launch planner (``csrc/cuda/launch_plan.cuh``)
are compiled by the host compiler against a small shim (``shim/``): every GPU thread is a fiber
(its own stack; all fibers of a launch take turns on the calling OS thread, switching only where a
GPU thread waits), ``__syncthreads`` and warp shuffles are barriers, the grid barrier spins on its counters,
thread-block clusters and distributed shared memory are emulated. ``harness.cpp`` exposes
``emu_forward`` / ``emu_backward`` (one pass with a given launch), ``emu_plan`` (the launch the
binding would pick, on an emulated device) and the tracer of the full-size tensors' global
accesses (``emu_trace``, ``emu_trace_take``, ``emu_site_names``) as a C interface: a plain shared
library without torch headers (a translation unit with torch's headers costs about 40 s of CPU
here), loaded with ctypes; ``_Emulator`` below allocates the tensors and passes data pointers.

What it checks: indexing, the barrier/phase structure, the numerics of the actual kernels, the
planner's choices and workspace layout, bytes moved and the 32-byte sectors each warp-level access
touches. What it cannot check: the GPU memory model, real occupancy, cooperative / cluster
launches, graph capture, speed (docs/CUDA.md).

The "small" build (``build(variant="small")``) also counts the small tensors' bytes (pools, gate,
hidden, BN moments, weights, running stats, weight gradients, workspace areas): the same source
compiled with GCC's ThreadSanitizer instrumentation and linked without libtsan, harness.cpp's
hooks counting accesses in registered ranges while a GPU thread runs (``measure_small``).

The library is built once per source hash (``build/emulator-<hash>/``) and loaded once per process.
"""
from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import threading

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CFLAGS = ["-std=c++20", "-O1", "-fno-strict-aliasing", "-w"]
# The "small" variant: the same translation unit compiled with GCC's ThreadSanitizer
# instrumentation (a hook call before every memory access) and linked WITHOUT libtsan; harness.cpp
# supplies the hooks, which count the bytes of the small tensors (emu_small_*). About 3x slower
# than the plain build, which is unchanged and stays the default.
SMALL_CFLAGS = ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0", "-DCMPE_SE_EMU_SMALL_TRAFFIC"]
VARIANTS = ("plain", "small")
LAUNCH_FIELDS = ("threads", "blocks", "splits", "cv", "gw", "vec", "smem", "cooperative", "per_sample", "cluster")
PATHS = {"persistent": 0, "per_sample": 1, "resident": 2}

_lock = threading.Lock()
_modules: dict = {}


def sources() -> list[str]:
    """Every file the emulator library (harness.cpp, one translation unit) depends on; the build
    folder carries their hash."""
    files = [os.path.join(HERE, "harness.cpp")] + sorted(glob.glob(os.path.join(HERE, "shim", "*.h")))
    files += sorted(glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cuh")))
    files += [os.path.join(ROOT, "csrc", "cmpe_se.h"), os.path.join(ROOT, "csrc", "cuda", "launch_plan.cuh")]
    return files


def source_hash(variant: str = "plain") -> str:
    h = hashlib.sha256()
    for f in sources():
        h.update(os.path.relpath(f, ROOT).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    h.update(" ".join(CFLAGS).encode())
    if variant != "plain":
        h.update(" ".join(SMALL_CFLAGS).encode())
    return h.hexdigest()[:12]


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def have_compiler() -> bool:
    return compiler() is not None


def _run(cmd) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"building the CUDA emulator failed ({' '.join(cmd)}):\n{res.stderr[-6000:]}")


def _compile(out: str, variant: str = "plain") -> None:
    """One plain shared library, no torch headers (the Python side allocates every tensor). The
    "small" variant compiles with -fsanitize=thread into an object first and links it with -shared
    only (no libtsan; -z defs: a ThreadSanitizer hook harness.cpp does not supply fails the link)."""
    tmp = f"{out}.{os.getpid()}.tmp"
    inc = ["-I", os.path.join(HERE, "shim"), "-I", os.path.join(ROOT, "csrc")]
    src = os.path.join(HERE, "harness.cpp")
    if variant == "plain":
        _run([compiler(), *CFLAGS, "-shared", "-fPIC", *inc, src, "-o", tmp, "-ldl"])
    else:
        obj = f"{out}.{os.getpid()}.o"
        try:
            _run([compiler(), *CFLAGS, *SMALL_CFLAGS, "-fPIC", *inc, "-c", src, "-o", obj])
            _run([compiler(), "-shared", obj, "-o", tmp, "-ldl", "-Wl,-z,defs", "-Wl,-Bsymbolic"])
        finally:
            if os.path.exists(obj):
                os.remove(obj)
    os.replace(tmp, out)


def build(variant: str = "plain"):
    """The compiled emulator (built at most once per source hash and variant: later processes, and
    the other pytest-xdist workers, find the finished library in build/emulator-<hash>/ (the
    "small" variant, which also counts the small tensors' bytes: build/emulator-small-<hash>/) and
    wait on its lock while one of them builds it)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    with _lock:
        if variant in _modules:
            return _modules[variant]
        digest = source_hash(variant)
        build_dir = os.path.join(ROOT, "build", f"emulator-{digest}" if variant == "plain"
                                 else f"emulator-{variant}-{digest}")
        os.makedirs(build_dir, exist_ok=True)
        lib = os.path.join(build_dir, "libcmpe_se_emulator.so")
        with open(os.path.join(build_dir, "lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not os.path.exists(lib):
                    _compile(lib, variant)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        _modules[variant] = _Emulator(lib)
        return _modules[variant]


# ---- the library's C interface, with the calls of the former torch extension -------------------

_MODES = {"se": 0, "double_fc": 1, "pair_2x1": 2, "pair_1x1": 3, "folded_3x3": 4}
_KERNEL_TAPS = {"pair_2x1": 2, "pair_1x1": 1, "folded_3x3": 9}
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _i64(values):
    return (ctypes.c_int64 * len(values))(*[int(v) for v in values])


def _ptr(t):
    return None if t is None or t.numel() == 0 else ctypes.c_void_p(t.data_ptr())


class _Emulator:
    """ctypes front of libcmpe_se_emulator.so (harness.cpp); a method per entry point."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        lib.emu_last_error.restype = ctypes.c_char_p
        lib.emu_trace_rows.restype = ctypes.c_int64
        lib.emu_trace_launches.restype = ctypes.c_int64
        lib.emu_workspace_bytes.restype = ctypes.c_int64
        lib.emu_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_int, ctypes.c_double, ctypes.c_double]
        lib.emu_backward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.emu_workspace_areas.restype = ctypes.c_int
        self.small = bool(lib.emu_small_available())
        if self.small:
            lib.emu_small_probe.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self._lib = lib
        self.path = path
        self._count_small = False
        self.last_small = None

    def _call(self, rc):
        if rc != 0:
            raise RuntimeError(self._lib.emu_last_error().decode())

    @staticmethod
    def _geom(n, c, h, w, mode, e, r, dz, m, pad, cl):
        return _i64([n, c, h, w, _MODES[mode], e, _KERNEL_TAPS.get(mode, 1), r, dz, m, pad, cl])

    @staticmethod
    def _plan_geom(n, c, h, w, mode, e, r, m, pad, cl):
        if mode in _KERNEL_TAPS:
            dz = c if mode == "pair_2x1" else 2 * c if mode == "pair_1x1" else \
                (2 * (c // m) - 2 + 2 * pad) * (m - 2 + 2 * pad)
        else:
            dz = c
        return _Emulator._geom(n, c, h, w, mode, e, r, dz, m, pad, cl)

    def emu_plan(self, n, c, h, w, mode, e, r, m, pad, cl, backward, training, elem, aligned, opts, dev):
        out = (ctypes.c_int64 * 11)()
        self._call(self._lib.emu_plan(self._plan_geom(n, c, h, w, mode, e, r, m, pad, cl), int(backward),
                                      int(training), int(elem), int(aligned), _i64(opts), _i64(dev), out))
        return list(out)

    def emu_explicit(self, n, c, h, w, mode, e, r, m, pad, cl, backward, elem, threads, blocks, splits, vec, cluster,
                     per_sample):
        out = (ctypes.c_int64 * 10)()
        self._call(self._lib.emu_explicit(self._plan_geom(n, c, h, w, mode, e, r, m, pad, cl), int(backward),
                                          int(elem), ctypes.c_int64(threads), ctypes.c_int64(blocks),
                                          ctypes.c_int64(splits), ctypes.c_int64(vec), ctypes.c_int64(cluster),
                                          int(per_sample), out))
        return list(out)

    def _pass_geom(self, u, mode, fc1, pw, m, pad, cl):
        n, c, h, w = u.shape
        e = pw.shape[0] if pw is not None and mode in _KERNEL_TAPS else 0
        return self._geom(n, c, h, w, mode, e, fc1.shape[0], fc1.shape[1], m, pad, cl), e

    # ---- the small-tensor counter (the "small" build) ----

    def emu_small_count(self, on):
        """Count the small tensors' bytes in every following pass (emu_forward / emu_backward); each
        pass leaves its counts in ``last_small`` (see ``emu_small_traffic``)."""
        if on and not self.small:
            raise RuntimeError("the small-tensor counter needs build(variant='small')")
        self._count_small = bool(on)
        self.last_small = None
        if self.small and not on:
            self._call(self._lib.emu_small_set(0, None, None))

    def emu_small_set(self, named):
        """Register the ranges to count: [(name, address, bytes)] (zero-size ones dropped)."""
        named = [(n, int(a), int(b)) for n, a, b in named if b > 0 and a]
        spans = sorted((a, a + b, n) for n, a, b in named)
        for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise RuntimeError(f"small-tensor ranges overlap: {n0}, {n1}")
        self._call(self._lib.emu_small_set(len(named), _i64([a for _, a, _ in named]), _i64([b for _, _, b in named])))
        self._small_names = [(n, b) for n, _, b in named]

    def emu_small_take(self):
        """{name: {"bytes", "read", "written", "reads", "writes", "distinct_read", "distinct_written"}}
        of the registered ranges since emu_small_set (bytes: the range's size)."""
        out = (ctypes.c_int64 * (6 * max(1, len(self._small_names))))()
        self._lib.emu_small_take(out)
        keys = ("read", "written", "reads", "writes", "distinct_read", "distinct_written")
        return {n: {"bytes": b, **dict(zip(keys, out[6 * i:6 * i + 6]))} for i, (n, b) in enumerate(self._small_names)}

    def emu_small_traffic(self):
        """The small-tensor counts of the last pass (None when the counter was off)."""
        return self.last_small

    def emu_small_probe(self, w, out, blocks, threads):
        self._call(self._lib.emu_small_probe(_ptr(w), _ptr(out), w.numel(), blocks, threads))

    def _ws_areas(self, gv, lv, backward, acc_bytes, ws):
        vals = (ctypes.c_int64 * 10)()
        k = self._lib.emu_workspace_areas(gv, lv, int(backward), acc_bytes, vals)
        names = ("gpart", "dg", "dhp", "z", "dv", "dudx", "dq", "part1", "fin") if backward else ("part", "stat")
        offs = [0] + list(vals[:k])
        base = ws.data_ptr()
        return [(n, base + offs[i], offs[i + 1] - offs[i]) for i, n in enumerate(("header",) + names)]

    def _small_begin(self, tensors, gv, lv, backward, acc_bytes, ws):
        if not self._count_small:
            return
        named = [(n, t.data_ptr(), t.numel() * t.element_size()) for n, t in tensors if t is not None and t.numel()]
        named += [("ws_" + n, a, b) for n, a, b in self._ws_areas(gv, lv, backward, acc_bytes, ws)]
        self.emu_small_set(named)

    def _small_end(self):
        if self._count_small:
            self.last_small = self.emu_small_take()
            self._call(self._lib.emu_small_set(0, None, None))

    def _workspace(self, gv, launch, backward, acc_bytes, like):
        total = self._lib.emu_workspace_bytes(gv, launch, int(backward), acc_bytes)
        ws = torch.full((total,), 0x7F, dtype=torch.uint8, device=like.device)
        ws[:16].zero_()  # the header (counters) zeroed, the rest garbage, as the binding lays it out
        return ws

    def emu_forward(self, u, x, fc1, fc1i, fc2, pw, bw, bb, rm, rv, mode, training, momentum, eps, m, pad, cl,
                    launch):
        gv, e = self._pass_geom(u, mode, fc1, pw, m, pad, cl)
        acc = torch.float64 if u.dtype == torch.float64 else torch.float32
        n, c = u.shape[:2]
        rh = 2 * fc1.shape[0] if mode == "double_fc" else fc1.shape[0]
        y = torch.empty_like(u)
        pu, px, gate = (torch.empty(n, c, dtype=acc) for _ in range(3))
        hid, bm, bi = torch.empty(n, rh, dtype=acc), torch.empty(e, dtype=acc), torch.empty(e, dtype=acc)
        lv = _i64(launch)
        ws = self._workspace(gv, lv, False, acc.itemsize, u)
        ptrs = (ctypes.c_void_p * 18)(*[_ptr(t) for t in (u, x, y, fc1, fc1i, fc2, pw, bw, bb, rm, rv, pu, px, gate,
                                                          hid, bm, bi, ws)])
        self._small_begin([("pool_u", pu), ("pool_x", px), ("gate", gate), ("hidden", hid), ("bn_mean", bm),
                           ("bn_invstd", bi), ("fc1", fc1), ("fc1_identity", fc1i), ("fc2", fc2), ("pair_weight", pw),
                           ("bn_weight", bw), ("bn_bias", bb), ("running_mean", rm), ("running_var", rv)],
                          gv, lv, False, acc.itemsize, ws)
        self._call(self._lib.emu_forward(ptrs, gv, lv, _DTYPE_CODES[u.dtype], _DTYPE_CODES.get(rm.dtype, 0),
                                         int(training), float(momentum), float(eps)))
        self._small_end()
        return [y, pu, px, gate, hid, bm, bi]

    def emu_backward(self, dy, u, pu, px, gate, hid, bm, bi, fc1, fc1i, fc2, pw, bw, bb, mode, training, m, pad, cl,
                     launch):
        gv, e = self._pass_geom(u, mode, fc1, pw, m, pad, cl)
        acc = torch.float64 if u.dtype == torch.float64 else torch.float32
        gu, gx = torch.empty_like(u), torch.empty_like(u)
        d1, d2 = torch.empty(fc1.shape, dtype=acc), torch.empty(fc2.shape, dtype=acc)
        d1i = torch.empty(fc1i.shape, dtype=acc) if fc1i is not None else torch.empty(0, dtype=acc)
        dp = torch.empty(pw.shape, dtype=acc) if pw is not None else torch.empty(0, dtype=acc)
        dbw, dbb = torch.empty(e, dtype=acc), torch.empty(e, dtype=acc)
        lv = _i64(launch)
        ws = self._workspace(gv, lv, True, acc.itemsize, u)
        ptrs = (ctypes.c_void_p * 23)(*[_ptr(t) for t in (dy, u, gu, gx, pu, px, gate, hid, bm, bi, fc1, fc1i, fc2, pw,
                                                          bw, bb, d1, d1i, d2, dp, dbw, dbb, ws)])
        self._small_begin([("pool_u", pu), ("pool_x", px), ("gate", gate), ("hidden", hid), ("bn_mean", bm),
                           ("bn_invstd", bi), ("fc1", fc1), ("fc1_identity", fc1i), ("fc2", fc2), ("pair_weight", pw),
                           ("bn_weight", bw), ("bn_bias", bb), ("d_fc1", d1), ("d_fc1_identity", d1i), ("d_fc2", d2),
                           ("d_pair_weight", dp), ("d_bn_weight", dbw), ("d_bn_bias", dbb)],
                          gv, lv, True, acc.itemsize, ws)
        self._call(self._lib.emu_backward(ptrs, gv, lv, _DTYPE_CODES[u.dtype], int(training)))
        self._small_end()
        return [gu, gx, d1, d1i, d2, dp, dbw, dbb]

    def emu_trace(self, on):
        self._lib.emu_trace(int(on))

    def emu_trace_take(self):
        rows, launches = self._lib.emu_trace_rows(), self._lib.emu_trace_launches()
        ev = torch.empty(rows, 8, dtype=torch.int64)
        th = torch.empty(launches, dtype=torch.int64)
        self._lib.emu_trace_take(ctypes.c_void_p(ev.data_ptr()), ctypes.c_void_p(th.data_ptr()))
        return [ev, th]

    def emu_site_names(self, sites):
        buf = ctypes.create_string_buffer(4096)
        names = []
        for s in sites.tolist():
            self._lib.emu_site_name(ctypes.c_int64(s), buf, ctypes.c_int64(len(buf)))
            names.append(buf.value.decode(errors="replace"))
        return names


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


# ---- the small tensors' bytes (the "small" build) -----------------------------------------------

def measure_small(mode, dtype, shape, layout, training, fwd_launch, bwd_launch, **case_kw):
    """Forward and backward on the "small" build with the small-tensor counter on: (forward counts,
    backward counts, T bytes); counts as ``_Emulator.emu_small_take`` returns them (per small
    tensor and workspace area: bytes read and written, accesses, distinct bytes)."""
    emu = build("small")
    d, _, _, kw = make_case(mode, dtype, shape, layout, training, **case_kw)
    cl = _layout_cl(layout, shape)
    tb = d["u"].numel() * d["u"].element_size()
    emu.emu_small_count(True)
    try:
        out = emu.emu_forward(*fwd_args(d, kw), cl, _lvec(fwd_launch))
        fwd = emu.emu_small_traffic()
        emu.emu_backward(*bwd_args(d["dy"], d, out, kw), cl, _lvec(bwd_launch))
        bwd = emu.emu_small_traffic()
    finally:
        emu.emu_small_count(False)
    return fwd, bwd, tb
