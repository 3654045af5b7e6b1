"""Triton backend of the CMPE-SE op contract (docs/ARCHITECTURE.md; math in docs/SPEC.md).

``forward`` / ``backward`` take exactly the op schema arguments and return the same tuples;
``cmpe_se_fused/ops.py`` wraps them as ``cmpe_se::triton_forward`` / ``triton_backward``.

Launches (``U, X: (N, C, H, W)``; T = one activation tensor in bytes):

* forward, ``se`` / ``double_fc`` / evaluation of the pair modes: one ``_excite_kernel`` launch,
  one program per sample: squeeze both flows, the small network (pair map, averaged BN folded
  into one effective filter, MLP), then ``Y = s*U + X`` re-reading U, X (L2 hits when a sample's
  tiles fit). ``single_launch=False``: ``_squeeze_kernel`` then ``_excite_kernel``, both with
  ``chunks`` programs per sample (more parallelism for small batches).
* forward, training pair modes: ``_squeeze_kernel`` (+ per-sample patch moments when
  ``chunks == 1``; else a separate moments launch), ``_bn_stats_kernel`` (one program: batch
  statistics, running-stat update), ``_excite_kernel`` (gate + rescale). 3 launches, 5T.
* backward: ``_grad_gate_kernel`` (``dg = sum_p(dY*U) * s(1-s)``, 2T; with ``chunks == 1`` it
  then runs the sample's MLP backward ``dh_pre``, ``dz`` and, pair modes, its patch/dv moments;
  else ``_mlp_backward_kernel`` does), pair modes only ``_pair_backward_stats_kernel`` (one
  program: BN and pair-conv weight gradients, patch-gradient coefficients),
  ``_weight_grad_kernel`` (dW1, dW2 tiles, samples summed in order; pair modes: the transposed
  pair conv per sample, onto ``[du; dx]``), ``_input_grad_kernel`` (``dU = s*dY + du/P``,
  ``dX = dY + dx/P``, 3T). 3 launches (4 in pair modes) with ``chunks == 1``, one more
  otherwise; 5T.

No torch op runs on the host (no memsets, no copies): every output is written by a kernel.
Layouts: every activation is addressed through its own strides; a 2D ``[BLOCK_C, BLOCK_P]`` tile
lets Triton coalesce along whichever axis has stride 1 (NCHW: P; channels_last: C). Spatial
positions are flattened when ``stride_h == W * stride_w`` (both fast layouts), else split.
Accumulation is fp32 (fp64 for fp64 inputs); weight gradients are reduced in a fixed order.
"""
from __future__ import annotations

import contextlib
import functools
import os
import struct

import torch

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001  (any import failure means: backend unavailable)
    triton = tl = None
    _IMPORT_ERROR = f"triton cannot be imported: {exc}"

MODES = {"se": 0, "double_fc": 1, "pair_2x1": 2, "pair_1x1": 3, "folded_3x3": 4}
_TAPS = {0: 1, 1: 1, 2: 2, 3: 1, 4: 9}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Triton decides at decoration time whether kernels are compiled or interpreted.
INTERPRETED = _interpreting()


def is_available() -> tuple[bool, str]:
    """``(ok, reason)``: Triton importable and a device it can run on (CUDA, or the interpreter)."""
    if _IMPORT_ERROR is not None:
        return False, _IMPORT_ERROR
    if INTERPRETED:
        return True, "triton interpreter (TRITON_INTERPRET=1): CPU tensors, slow"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU)"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


if triton is not None:
    from .small import (
        _bn_affine,
        _bn_stats_kernel,
        _hidden,
        _load_bn_stats,
        _mlp_backward_kernel,
        _pair_backward_stats_kernel,
        _sample_moments,
        _small_backward_sample,
        _split_float,
        _weight_grad_kernel,
    )

    @triton.jit
    def _sp(p, W, s_h, s_w, FLAT: tl.constexpr):
        # spatial offset of flattened position p
        if FLAT:
            off = p * s_w
        else:
            off = (p // W) * s_h + (p % W) * s_w
        return off

    @triton.jit
    def _squeeze_block(u_row, x_row, c, cm, P, W, su_c, su_h, su_w, sx_c, sx_h, sx_w,
                       FLAT_U: tl.constexpr, FLAT_X: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """Spatial means of channels ``c`` of one sample, both flows (tile sums reduced once)."""
        pp = tl.arange(0, BLOCK_P)
        acc_u = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
        acc_x = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + pp
            m = cm[:, None] & (p < P)[None, :]
            acc_u += tl.load(u_row + c[:, None] * su_c + _sp(p, W, su_h, su_w, FLAT_U)[None, :],
                             mask=m, other=0.0).to(ACC)
            acc_x += tl.load(x_row + c[:, None] * sx_c + _sp(p, W, sx_h, sx_w, FLAT_X)[None, :],
                             mask=m, other=0.0).to(ACC)
        return tl.sum(acc_u, axis=1) / P, tl.sum(acc_x, axis=1) / P

    @triton.jit
    def _squeeze_kernel(u, x, pu, px, mom, C, P, W, CPP,
                        su_n, su_c, su_h, su_w, sx_n, sx_c, sx_h, sx_w,
                        MODE: tl.constexpr, JP: tl.constexpr, FOLD_M: tl.constexpr, FOLD_ROWS: tl.constexpr,
                        OC: tl.constexpr, PAD: tl.constexpr, DM: tl.constexpr, MOMENTS: tl.constexpr,
                        FLAT_U: tl.constexpr, FLAT_X: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
        """Grid (N, chunks): pools of ``CPP`` channels; MOMENTS (chunks == 1): patch moments too."""
        n = tl.program_id(0)
        c_lo = tl.program_id(1) * CPP
        c_hi = tl.minimum(c_lo + CPP, C)
        u_row = u + n.to(tl.int64) * su_n
        x_row = x + n.to(tl.int64) * sx_n
        for c0 in range(c_lo, c_hi, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < c_hi
            mu, mx = _squeeze_block(u_row, x_row, c, cm, P, W, su_c, su_h, su_w, sx_c, sx_h, sx_w,
                                    FLAT_U, FLAT_X, ACC, BLOCK_C, BLOCK_P)
            tl.store(pu + n * C + c, mu, mask=cm)
            tl.store(px + n * C + c, mx, mask=cm)
        if MOMENTS:
            tl.debug_barrier()  # the pools of this sample were written by other threads of this program
            MS = 2 * JP + 1 + JP * JP
            _sample_moments(pu + n * C, px + n * C, pu, mom + n * MS, DM, MODE, JP, FOLD_M, FOLD_ROWS, OC, PAD,
                            ACC, False, BLOCK_M)

    @triton.jit
    def _moments_kernel(pu, px, mom, C, MODE: tl.constexpr, JP: tl.constexpr, FOLD_M: tl.constexpr,
                        FOLD_ROWS: tl.constexpr, OC: tl.constexpr, PAD: tl.constexpr, DM: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_M: tl.constexpr):
        """Grid (N,): per-sample patch moments when the squeeze ran with several chunks."""
        n = tl.program_id(0)
        MS = 2 * JP + 1 + JP * JP
        _sample_moments(pu + n * C, px + n * C, pu, mom + n * MS, DM, MODE, JP, FOLD_M, FOLD_ROWS, OC, PAD,
                        ACC, False, BLOCK_M)

    @triton.jit
    def _excite_kernel(u, x, y, pu, px, gate, hidden, w1, w1i, w2, pw, gamma, beta, stat_mean, stat_var,
                       bn_mean, bn_invstd, qmean, C, P, W, R, R_TOT, DZ, E, CPP, eps_hi, eps_lo,
                       su_n, su_c, su_h, su_w, sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w,
                       MODE: tl.constexpr, J: tl.constexpr, JP: tl.constexpr, FOLD_M: tl.constexpr,
                       FOLD_ROWS: tl.constexpr, OC: tl.constexpr, PAD: tl.constexpr,
                       SQUEEZE: tl.constexpr, STATS_ARE_RUNNING: tl.constexpr,
                       FLAT_U: tl.constexpr, FLAT_X: tl.constexpr, FLAT_Y: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
        """Grid (N, chunks): [squeeze (SQUEEZE, chunks == 1)], gate of ``CPP`` channels, rescale.

        ``stat_mean``/``stat_var``: running stats (STATS_ARE_RUNNING, evaluation; program (0, 0)
        then writes ``bn_mean``/``bn_invstd``) or the batch ``bn_mean``/``bn_invstd`` (training;
        ``qmean``: the batch mean of the patches, the centre of the affine map)."""
        n = tl.program_id(0)
        chunk = tl.program_id(1)
        u_row = u + n.to(tl.int64) * su_n
        x_row = x + n.to(tl.int64) * sx_n
        y_row = y + n.to(tl.int64) * sy_n
        cc = tl.arange(0, BLOCK_C)
        if SQUEEZE:
            for c0 in range(0, C, BLOCK_C):
                c = c0 + cc
                mu, mx = _squeeze_block(u_row, x_row, c, c < C, P, W, su_c, su_h, su_w, sx_c, sx_h, sx_w,
                                        FLAT_U, FLAT_X, ACC, BLOCK_C, BLOCK_P)
                tl.store(pu + n * C + c, mu, mask=c < C)
                tl.store(px + n * C + c, mx, mask=c < C)
            tl.debug_barrier()  # the small network below reads pools written by other threads
        if MODE >= 2:
            eps = _split_float(eps_hi, eps_lo, ACC)
            mean, invstd = _load_bn_stats(stat_mean, stat_var, E, eps, STATS_ARE_RUNNING, ACC, BLOCK_E)
            if STATS_ARE_RUNNING:
                ei = tl.arange(0, BLOCK_E)
                first = (ei < E) & (n == 0) & (chunk == 0)
                tl.store(bn_mean + ei, mean, mask=first)
                tl.store(bn_invstd + ei, invstd, mask=first)
            if STATS_ARE_RUNNING:
                mq = tl.zeros([JP], dtype=ACC)
            else:
                mq = tl.load(qmean + tl.arange(0, JP))
            weff, beff = _bn_affine(pw, gamma, beta, mean, invstd, mq, E, J, JP, BLOCK_E)
        else:
            weff = tl.full([JP], 1.0, ACC)
            mq = tl.zeros([JP], dtype=ACC)
            beff = 0.0
        h = _hidden(pu + n * C, px + n * C, w1, w1i, weff, mq, beff, C, R, R_TOT, DZ, MODE, JP, FOLD_M, FOLD_ROWS,
                    OC, PAD, ACC, BLOCK_K, BLOCK_R)
        ii = tl.arange(0, BLOCK_R)
        tl.store(hidden + n * R_TOT + ii, h, mask=(ii < R_TOT) & (chunk == 0))
        c_lo = chunk * CPP
        c_hi = tl.minimum(c_lo + CPP, C)
        pp = tl.arange(0, BLOCK_P)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            c = c0 + cc
            cm = c < c_hi
            w = tl.load(w2 + c[:, None] * R_TOT + ii[None, :], mask=cm[:, None] & (ii < R_TOT)[None, :], other=0.0)
            s = 1.0 / (1.0 + tl.exp(-tl.sum(w * h[None, :], axis=1)))
            tl.store(gate + n * C + c, s, mask=cm)
            for p0 in range(0, P, BLOCK_P):
                p = p0 + pp
                m = cm[:, None] & (p < P)[None, :]
                uu = tl.load(u_row + c[:, None] * su_c + _sp(p, W, su_h, su_w, FLAT_U)[None, :], mask=m, other=0.0)
                xx = tl.load(x_row + c[:, None] * sx_c + _sp(p, W, sx_h, sx_w, FLAT_X)[None, :], mask=m, other=0.0)
                out = s[:, None] * uu.to(ACC) + xx.to(ACC)
                tl.store(y_row + c[:, None] * sy_c + _sp(p, W, sy_h, sy_w, FLAT_Y)[None, :],
                         out.to(y.dtype.element_ty), mask=m)

    @triton.jit
    def _grad_gate_kernel(dy, u, gate, dg, hidden, w1, w1i, w2, dhp, dz, pu, px, mom, C, P, W, CPP, R, R_TOT, DZ, DZO,
                          sd_n, sd_c, sd_h, sd_w, su_n, su_c, su_h, su_w,
                          MODE: tl.constexpr, JP: tl.constexpr, FOLD_M: tl.constexpr, FOLD_ROWS: tl.constexpr,
                          OC: tl.constexpr, PAD: tl.constexpr, SMALL: tl.constexpr,
                          FLAT_D: tl.constexpr, FLAT_U: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CS: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
        """Grid (N, chunks): ``dg = sum_p(dY * U) * s * (1 - s)``; SMALL (chunks == 1): then the
        sample's MLP backward and (pair modes) moments, saving the ``_mlp_backward_kernel`` launch."""
        n = tl.program_id(0)
        c_lo = tl.program_id(1) * CPP
        c_hi = tl.minimum(c_lo + CPP, C)
        d_row = dy + n.to(tl.int64) * sd_n
        u_row = u + n.to(tl.int64) * su_n
        pp = tl.arange(0, BLOCK_P)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < c_hi
            acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
            for p0 in range(0, P, BLOCK_P):
                p = p0 + pp
                m = cm[:, None] & (p < P)[None, :]
                dd = tl.load(d_row + c[:, None] * sd_c + _sp(p, W, sd_h, sd_w, FLAT_D)[None, :], mask=m, other=0.0)
                uu = tl.load(u_row + c[:, None] * su_c + _sp(p, W, su_h, su_w, FLAT_U)[None, :], mask=m, other=0.0)
                acc += dd.to(ACC) * uu.to(ACC)
            s = tl.load(gate + n * C + c, mask=cm, other=0.0)
            tl.store(dg + n * C + c, tl.sum(acc, axis=1) * s * (1.0 - s), mask=cm)
        if SMALL:
            tl.debug_barrier()  # dg of this sample was written by other threads of this program
            _small_backward_sample(n, dg, hidden, w1, w1i, w2, dhp, dz, pu, px, mom, C, R, R_TOT, DZ, DZO, MODE, JP,
                                   FOLD_M, FOLD_ROWS, OC, PAD, MODE >= 2, ACC, BLOCK_CS, BLOCK_K, BLOCK_R, BLOCK_M)

    @triton.jit
    def _input_grad_kernel(dy, gate, dpool, du_out, dx_out, C, P, W, DPS, CPP,
                           sd_n, sd_c, sd_h, sd_w, so_n, so_c, so_h, so_w, HAS_DX: tl.constexpr,
                           FLAT_D: tl.constexpr, FLAT_O: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """Grid (N, chunks): ``dU = s*dY + du/P``, ``dX = dY + dx/P`` from the pool gradients
        ``dpool[n] = [du (C); dx (C)]`` (row stride DPS; se: no dx). grad_u and grad_x share
        strides: both follow U."""
        n = tl.program_id(0)
        c_lo = tl.program_id(1) * CPP
        c_hi = tl.minimum(c_lo + CPP, C)
        d_row = dy + n.to(tl.int64) * sd_n
        o_off = n.to(tl.int64) * so_n
        pp = tl.arange(0, BLOCK_P)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < c_hi
            s = tl.load(gate + n * C + c, mask=cm, other=0.0)
            du = tl.load(dpool + n * DPS + c, mask=cm, other=0.0)
            if HAS_DX:
                dx = tl.load(dpool + n * DPS + C + c, mask=cm, other=0.0)
            else:
                dx = tl.zeros([BLOCK_C], dtype=ACC)
            du = du / P
            dx = dx / P
            for p0 in range(0, P, BLOCK_P):
                p = p0 + pp
                m = cm[:, None] & (p < P)[None, :]
                dd = tl.load(d_row + c[:, None] * sd_c + _sp(p, W, sd_h, sd_w, FLAT_D)[None, :],
                             mask=m, other=0.0).to(ACC)
                o = o_off + c[:, None] * so_c + _sp(p, W, so_h, so_w, FLAT_O)[None, :]
                tl.store(du_out + o, (s[:, None] * dd + du[:, None]).to(du_out.dtype.element_ty), mask=m)
                tl.store(dx_out + o, (dd + dx[:, None]).to(dx_out.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------

def _np2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


@functools.lru_cache(maxsize=64)
def _split(v: float) -> tuple[float, float]:
    """(fp32 hi, fp32 lo) with hi + lo == v to ~1e-16: kernels see Python floats as fp32."""
    hi = struct.unpack("f", struct.pack("f", float(v)))[0]
    return hi, struct.unpack("f", struct.pack("f", float(v) - hi))[0]


def _strides(t: torch.Tensor):
    """``(s_n, s_c, s_h, s_w, flat)``; flat: offset of position p is ``p * s_w``."""
    _, _, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if h == 1:
        return sn, sc, 0, sw, True
    if w == 1:
        return sn, sc, 0, sh, True
    return sn, sc, sh, sw, sh == w * sw


class _Geometry:
    """Sizes and compile-time constants of one call (SPEC section 1 notation)."""

    def __init__(self, u, fc1_weight, fc2_weight, pair_weight, mode, fold_width, padding):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
        if u.dim() != 4:
            raise ValueError(f"U must be N x C x H x W, got shape {tuple(u.shape)}")
        self.mode = MODES[mode]
        self.N, self.C, self.H, self.W = u.shape
        self.P = self.H * self.W
        c = self.C
        self.J = _TAPS[self.mode]
        self.JP = _np2(self.J)
        self.FOLD_M, self.FOLD_ROWS, self.OC, self.PAD = 1, 1, 1, 0
        if self.mode == 4:
            if fold_width <= 0 or c % fold_width:
                raise ValueError(f"fold_width {fold_width} must divide C = {c}")
            pad = int(padding)
            rows, cols = 2 * (c // fold_width) - 2 + 2 * pad, fold_width - 2 + 2 * pad
            if rows < 1 or cols < 1:
                raise ValueError(f"folded_3x3: the fold {2 * (c // fold_width)} x {fold_width} is too small for a "
                                 f"3x3 filter with padding {pad}")
            self.FOLD_M, self.FOLD_ROWS, self.OC, self.PAD = fold_width, 2 * (c // fold_width), cols, pad
            self.DM = rows * cols
        else:
            self.DM = {2: c, 3: 2 * c}.get(self.mode, 0)
        self.DZ = self.DM if self.mode in (3, 4) else c
        self.R, self.R_TOT = fc1_weight.shape[0], fc2_weight.shape[1]
        if fc1_weight.shape[1] != self.DZ or fc2_weight.shape[0] != c:
            raise ValueError(f"{mode}: fc1_weight {tuple(fc1_weight.shape)} / fc2_weight {tuple(fc2_weight.shape)} "
                             f"do not match C = {c}, relation length {self.DZ}")
        self.E = pair_weight.shape[0] if self.mode >= 2 else 0
        if self.mode >= 2 and pair_weight[0].numel() != self.J:
            raise ValueError(f"{mode}: pair_weight has shape {tuple(pair_weight.shape)}")
        self.MS = 2 * self.JP + 1 + self.JP * self.JP

    def constexprs(self):
        return {"MODE": self.mode, "JP": self.JP, "FOLD_M": self.FOLD_M, "FOLD_ROWS": self.FOLD_ROWS,
                "OC": self.OC, "PAD": self.PAD}


def _acc(dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(t: torch.Tensor) -> int:
    return _sm_count(t.device.index or 0) if t.is_cuda else 1


def _stream_config(u, geo, block_c, block_p, chunks):
    """Tile of the streaming kernels and channels per program. Channel-fastest layouts get a tall
    tile (coalesced along C), NCHW a wide one; ~2K elements per tile keeps registers modest."""
    elems = 1024 if u.dtype == torch.float64 else 2048
    channel_fastest = u.stride(1) == 1 and geo.C > 1
    if block_p is None:
        block_p = min(_np2(geo.P), 16 if channel_fastest else 128)
    if block_c is None:
        block_c = max(1, min(_np2(geo.C), elems // block_p, 4096 // _np2(geo.R_TOT)))
    if chunks is None:
        # enough programs for two waves when the batch alone does not fill the device
        chunks = 1 if not u.is_cuda else -(-2 * _sms(u) // geo.N)
    cpp = -(-geo.C // max(1, min(int(chunks), -(-geo.C // block_c))))
    cpp = -(-cpp // block_c) * block_c
    return block_c, block_p, cpp, -(-geo.C // cpp)


def _small_blocks(geo, block_k):
    block_r = _np2(geo.R_TOT)
    if block_k is None:
        # fc1 tile [BLOCK_R, BLOCK_K] and patch tile [BLOCK_K, JP] both around 2K / 512 elements
        block_k = max(16, min(256, 2048 // block_r, 512 // geo.JP if geo.JP > 2 else 256))
    block_k = min(block_k, _np2(max(geo.DZ, 2 * geo.C if geo.mode == 1 else geo.DZ)))
    block_m = 16 if geo.JP > 4 else 256
    return block_r, block_k, block_m, _np2(max(geo.E, 1))


def _guard(u: torch.Tensor):
    if not u.is_cuda and not INTERPRETED:
        raise RuntimeError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                           f"imported, for CPU tensors); got a {u.device.type} tensor")
    return torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext()


def _contig(*ts):
    return [None if t is None else t.contiguous() for t in ts]


#: launch plans by (shapes, strides, dtype, device, mode, fold, tuning): the geometry, tiles, grid
#: and strides of a call are functions of these alone, so a repeated shape computes none of them again
_LAUNCH_PLANS: dict = {}
_MAX_LAUNCH_PLANS = 256


def _launch_plan(u, v, fc1_weight, fc2_weight, pair_weight, mode, fold_width, padding, tuning):
    """``(geometry, (single_launch, block_c, block_p, cpp, nch, block_r, block_k, block_m, block_e,
    constexprs), strides of u, of v, of an empty_like(u) output)`` for a call with full-size
    tensors ``u`` and ``v`` (x in the forward, grad_y in the backward)."""
    key = (u.shape, u.stride(), v.stride(), u.dtype, u.device, fc1_weight.shape, fc2_weight.shape,
           None if pair_weight is None else pair_weight.shape, mode, fold_width, padding, tuning)
    hit = _LAUNCH_PLANS.get(key)
    if hit is not None:
        return hit
    geo = _Geometry(u, fc1_weight, fc2_weight, pair_weight, mode, fold_width, padding)
    kind, single_launch, chunks, block_c, block_p, block_k = tuning
    if kind == "fwd" and single_launch is None:
        single_launch = not u.is_cuda or geo.N >= _sms(u)
    if kind == "fwd" and single_launch:
        chunks = 1
    block_c, block_p, cpp, nch = _stream_config(u, geo, block_c, block_p, chunks) if geo.N and geo.C else (1,) * 4
    launch = (single_launch, block_c, block_p, cpp, nch, *_small_blocks(geo, block_k), geo.constexprs())
    hit = (geo, launch, _strides(u), _strides(v), _strides(torch.empty_like(u)))
    if len(_LAUNCH_PLANS) >= _MAX_LAUNCH_PLANS:
        _LAUNCH_PLANS.clear()
    _LAUNCH_PLANS[key] = hit
    return hit


def forward(u, x, fc1_weight, fc1_identity_weight, fc2_weight, pair_weight, bn_weight, bn_bias,
            running_mean, running_var, mode, training, momentum, eps, fold_width, padding, *,
            single_launch=None, chunks=None, block_c=None, block_p=None, block_k=None, num_warps=4):
    """``cmpe_se::triton_forward``: ``(y, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd)``.

    Tuning (keyword only, for benchmark sweeps): ``single_launch`` (one program per sample does
    squeeze + gate + rescale; default when the batch fills the device), ``chunks`` (programs per
    sample otherwise), ``block_c`` x ``block_p`` (streaming tile), ``block_k`` (fc1 tile width),
    ``num_warps``."""
    with _guard(u):
        return _forward(u, x, *_contig(fc1_weight, fc1_identity_weight, fc2_weight, pair_weight, bn_weight, bn_bias),
                        running_mean, running_var, mode, training, momentum, eps, fold_width, padding,
                        single_launch, chunks, block_c, block_p, block_k, num_warps)


def _forward(u, x, fc1_weight, fc1_identity_weight, fc2_weight, pair_weight, bn_weight, bn_bias, running_mean,
             running_var, mode, training, momentum, eps, fold_width, padding, single_launch, chunks, block_c,
             block_p, block_k, num_warps):
    if x.shape != u.shape or x.dtype != u.dtype or x.device != u.device:
        raise ValueError("U and X must have the same shape, dtype and device")
    tuning = ("fwd", single_launch, chunks, block_c, block_p, block_k)
    geo, launch, su, sx, sy = _launch_plan(u, x, fc1_weight, fc2_weight, pair_weight, mode, fold_width, padding, tuning)
    acc, ACC = _acc(u.dtype)
    N, C = geo.N, geo.C
    pair, train_bn = geo.mode >= 2, geo.mode >= 2 and training
    if train_bn and N * geo.DM <= 1:
        raise ValueError(f"pair_bn: expected more than 1 value per filter in training mode, got {N * geo.DM}")
    y = torch.empty_like(u)
    pool_u, pool_x = u.new_empty((N, C), dtype=acc), u.new_empty((N, C), dtype=acc)
    gate, hidden = u.new_empty((N, C), dtype=acc), u.new_empty((N, geo.R_TOT), dtype=acc)
    bn_mean, bn_invstd = u.new_empty((geo.E,), dtype=acc), u.new_empty((geo.E,), dtype=acc)
    dummy = fc1_weight  # pointer for absent tensors; never dereferenced
    w1i = fc1_identity_weight if geo.mode == 1 else dummy
    pw, gamma, beta = (pair_weight, bn_weight, bn_bias) if pair else (dummy, dummy, dummy)
    if N == 0 or C == 0:
        return y, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd
    single_launch, block_c, block_p, cpp, nch, block_r, block_k, block_m, block_e, cx = launch
    eps_hi, eps_lo = _split(eps)
    mom = None
    if train_bn or not single_launch:
        moments = train_bn and nch == 1
        mom = u.new_empty((N, geo.MS), dtype=acc) if train_bn else dummy
        _squeeze_kernel[(N, nch)](u, x, pool_u, pool_x, mom, C, geo.P, geo.W, cpp, *su[:4], *sx[:4], **cx,
                                  DM=max(geo.DM, 1), MOMENTS=moments, FLAT_U=su[4], FLAT_X=sx[4], ACC=ACC,
                                  BLOCK_C=block_c, BLOCK_P=block_p, BLOCK_M=block_m, num_warps=num_warps)
        if train_bn and not moments:
            _moments_kernel[(N,)](pool_u, pool_x, mom, C, **cx, DM=geo.DM, ACC=ACC, BLOCK_M=block_m)
    if train_bn:
        mom_hi, mom_lo = _split(momentum)
        qmean = u.new_empty((geo.JP,), dtype=acc)
        _bn_stats_kernel[(1,)](mom, pw, bn_mean, bn_invstd, qmean, running_mean, running_var, N, geo.DM, geo.E,
                               eps_hi, eps_lo, mom_hi, mom_lo, ACC=ACC, J=geo.J, JP=geo.JP, BLOCK_E=block_e)
        stat_mean, stat_var = bn_mean, bn_invstd
    elif pair:
        stat_mean, stat_var, qmean = running_mean, running_var, dummy
    else:
        stat_mean = stat_var = qmean = dummy
    squeeze_here = mom is None
    _excite_kernel[(N, nch)](u, x, y, pool_u, pool_x, gate, hidden, fc1_weight, w1i, fc2_weight, pw, gamma, beta,
                             stat_mean, stat_var, bn_mean, bn_invstd, qmean, C, geo.P, geo.W, geo.R, geo.R_TOT, geo.DZ,
                             geo.E, cpp, eps_hi, eps_lo, *su[:4], *sx[:4], *sy[:4], **cx, J=geo.J,
                             SQUEEZE=squeeze_here, STATS_ARE_RUNNING=pair and not train_bn,
                             FLAT_U=su[4], FLAT_X=sx[4], FLAT_Y=sy[4], ACC=ACC, BLOCK_C=block_c, BLOCK_P=block_p,
                             BLOCK_K=block_k, BLOCK_R=block_r, BLOCK_E=block_e, num_warps=num_warps)
    return y, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd


def backward(grad_y, u, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd, fc1_weight, fc1_identity_weight,
             fc2_weight, pair_weight, bn_weight, bn_bias, mode, training, fold_width, padding, *,
             chunks=None, block_c=None, block_p=None, block_k=None, num_warps=4):
    """``cmpe_se::triton_backward``: ``(grad_u, grad_x, grad_fc1_weight, grad_fc1_identity_weight,
    grad_fc2_weight, grad_pair_weight, grad_bn_weight, grad_bn_bias)`` (absent weights: ``[0]``).

    Tuning keywords as in :func:`forward` (``chunks``: programs per sample of the two streaming
    kernels)."""
    with _guard(u):
        return _backward(grad_y, u, *_contig(pool_u, pool_x, gate, hidden, bn_mean, bn_invstd, fc1_weight,
                                             fc1_identity_weight, fc2_weight, pair_weight, bn_weight, bn_bias),
                         mode, training, fold_width, padding, chunks, block_c, block_p, block_k, num_warps)


def _backward(grad_y, u, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd, fc1_weight, fc1_identity_weight,
              fc2_weight, pair_weight, bn_weight, bn_bias, mode, training, fold_width, padding, chunks, block_c,
              block_p, block_k, num_warps):
    tuning = ("bwd", False, chunks, block_c, block_p, block_k)
    geo, launch, su, sd, so = _launch_plan(u, grad_y, fc1_weight, fc2_weight, pair_weight, mode, fold_width, padding,
                                           tuning)
    acc, ACC = _acc(u.dtype)
    N, C = geo.N, geo.C
    pair = geo.mode >= 2
    empty = lambda: gate.new_empty(0)
    grad_u, grad_x = torch.empty_like(u), torch.empty_like(u)
    # contiguous; every element is written by a kernel below (no memset launches)
    new = lambda t: t.new_empty(t.shape)
    dw1, dw2 = new(fc1_weight), new(fc2_weight)
    # absent weights: a distinct [0] tensor each (outputs must not alias one another)
    dw1i = new(fc1_identity_weight) if geo.mode == 1 else empty()
    dpw, dgamma, dbeta = (new(pair_weight), new(bn_weight), new(bn_weight)) if pair else (empty(), empty(), empty())
    if N == 0 or C == 0:
        for t in (grad_u, grad_x, dw1, dw1i, dw2, dpw, dgamma, dbeta):
            t.zero_()
        return grad_u, grad_x, dw1, dw1i, dw2, dpw, dgamma, dbeta
    dummy = fc1_weight
    w1i = fc1_identity_weight if geo.mode == 1 else dummy
    pw, gamma, beta = (pair_weight, bn_weight, bn_bias) if pair else (dummy, dummy, dummy)
    smean, sinv = (bn_mean, bn_invstd) if pair else (dummy, dummy)
    _, block_c, block_p, cpp, nch, block_r, block_k, block_m, block_e, cx = launch
    dzo = 2 * C if geo.mode == 1 else geo.DZ
    dg = u.new_empty((N, C), dtype=acc)
    dhp = u.new_empty((N, geo.R_TOT), dtype=acc)
    dz = u.new_empty((N, dzo), dtype=acc)
    mom = u.new_empty((N, geo.MS), dtype=acc) if pair else dummy
    coef = u.new_empty((3 * geo.JP + geo.JP * geo.JP,), dtype=acc) if pair else dummy
    block_cs = max(1, min(_np2(C), 2048 // block_r))
    small_here = nch == 1
    _grad_gate_kernel[(N, nch)](grad_y, u, gate, dg, hidden, fc1_weight, w1i, fc2_weight, dhp, dz, pool_u, pool_x,
                                mom, C, geo.P, geo.W, cpp, geo.R, geo.R_TOT, geo.DZ, dzo, *sd[:4], *su[:4], **cx,
                                SMALL=small_here, FLAT_D=sd[4], FLAT_U=su[4], ACC=ACC, BLOCK_C=block_c,
                                BLOCK_P=block_p, BLOCK_CS=block_cs, BLOCK_K=block_k, BLOCK_R=block_r,
                                BLOCK_M=block_m, num_warps=num_warps)
    if not small_here:
        _mlp_backward_kernel[(N,)](dg, hidden, fc1_weight, w1i, fc2_weight, dhp, dz, pool_u, pool_x, mom, C, geo.R,
                                   geo.R_TOT, geo.DZ, dzo, **cx, MOMENTS=pair, ACC=ACC, BLOCK_C=block_cs,
                                   BLOCK_K=block_k, BLOCK_R=block_r, BLOCK_M=block_m)
    if pair:
        _pair_backward_stats_kernel[(1,)](mom, pw, gamma, smean, sinv, dpw, dgamma, dbeta, coef, N, geo.DM, geo.E,
                                          TRAINING=bool(training), ACC=ACC, J=geo.J, JP=geo.JP, BLOCK_E=block_e)
        dpool = u.new_empty((N, 2 * C), dtype=acc)
    else:
        dpool = dz  # se: [du], double_fc: [du; dx]
    nb_w2 = -(-C // block_cs)
    nb_w = nb_w2 + -(-geo.DZ // block_k)
    _weight_grad_kernel[(nb_w + (N if pair else 0),)](
        dg, hidden, dhp, pool_u, pool_x, pw, gamma, beta, smean, sinv, dw1, dw1i if geo.mode == 1 else dummy,
        dw2, dz, coef, dpool, N, C, geo.R, geo.R_TOT, geo.DZ, geo.E, nb_w2, nb_w, **cx, J=geo.J,
        TRAINING=bool(training), ACC=ACC, BLOCK_C=block_cs, BLOCK_K=block_k, BLOCK_R=block_r, BLOCK_E=block_e,
        BLOCK_CP=max(1, min(_np2(C), 64, 512 // geo.JP)))
    _input_grad_kernel[(N, nch)](grad_y, gate, dpool, grad_u, grad_x, C, geo.P, geo.W, dpool.shape[1], cpp,
                                 *sd[:4], *so[:4], HAS_DX=geo.mode != 0, FLAT_D=sd[4], FLAT_O=so[4], ACC=ACC,
                                 BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps)
    return grad_u, grad_x, dw1, dw1i, dw2, dpw, dgamma, dbeta


def sweep_configs(u: torch.Tensor) -> list[tuple[str, dict, dict]]:
    """Tuning variants worth timing beside the defaults on input ``u`` (GPU.md: every run a sweep):
    ``[(name, forward_kwargs, backward_kwargs)]``; the first entry is the default."""
    channel_fastest = u.stride(1) == 1 and u.shape[1] > 1
    p = _np2(u.shape[2] * u.shape[3])
    tiles = ([(128, 16), (64, 32), (256, 8)] if channel_fastest
             else [(max(1, 2048 // min(p, 128)), min(p, 128)), (max(1, 1024 // min(p, 64)), min(p, 64)),
                   (max(1, 4096 // min(p, 256)), min(p, 256))])
    out = [("default", {}, {})]
    for chunks in (1, 2, 4, 8):
        single = chunks == 1
        out.append((f"chunks{chunks}", {"single_launch": single, "chunks": chunks}, {"chunks": chunks}))
    out.append(("chunks1_w8", {"single_launch": True, "num_warps": 8}, {"chunks": 1, "num_warps": 8}))
    out.append(("chunks4_w8", {"single_launch": False, "chunks": 4, "num_warps": 8}, {"chunks": 4, "num_warps": 8}))
    for bc, bp in tiles[1:]:
        tile = {"block_c": bc, "block_p": bp}
        out.append((f"tile{bc}x{bp}", dict(tile), dict(tile)))
    return out
