"""Run every CUDA kernel variant once, for compute-sanitizer (memcheck, racecheck, synccheck).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/cuda_sanitize.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck python benchmarks/cuda_sanitize.py

Covers: every mode, training and eval, forward and backward, all four dtypes, NCHW and
channels_last, the 16-byte vector path (C, P multiples of 8) and the scalar path (odd C, odd P),
H*W = 1, a batch of one, and several spatial splits (small N*C, large P).
Exits non-zero on any CUDA error; prints one line per case.
"""
from __future__ import annotations

import sys

import cmpe_se_fused._C
import cmpe_se_fused._C_cuda  # noqa: F401  (CUDA kernels)
import torch

MODES = ("se", "double_fc", "pair_2x1", "pair_1x1", "folded_3x3")
KSIZE = {"pair_2x1": (1, 2), "pair_1x1": (1, 1), "folded_3x3": (3, 3)}


def relation_dim(mode, c, m, pad):
    if mode in ("se", "double_fc", "pair_2x1"):
        return c
    if mode == "pair_1x1":
        return 2 * c
    return (2 * (c // m) - 2 + 2 * pad) * (m - 2 + 2 * pad)


def run(mode, dtype, shape, layout, training, fold_width=8, padding=0):
    c = shape[1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dev = "cuda"
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    u = torch.randn(shape, device=dev, dtype=dtype).contiguous(memory_format=fmt)
    x = torch.randn(shape, device=dev, dtype=dtype).contiguous(memory_format=fmt)
    r = max(1, c // 4)
    dz = relation_dim(mode, c, fold_width, padding)
    fc1 = torch.randn(r, dz, device=dev, dtype=acc) / dz ** 0.5
    fc2 = torch.randn(c, 2 * r if mode == "double_fc" else r, device=dev, dtype=acc) / r ** 0.5
    fc1_id = torch.randn(r, c, device=dev, dtype=acc) if mode == "double_fc" else None
    pair_w = bn_w = bn_b = None
    rm = rv = torch.zeros(0, device=dev)
    if mode in KSIZE:
        e = 3
        pair_w = torch.randn(e, 1, *KSIZE[mode], device=dev, dtype=acc)
        bn_w = torch.ones(e, device=dev, dtype=acc)
        bn_b = torch.zeros(e, device=dev, dtype=acc)
        rm = torch.zeros(e, device=dev)
        rv = torch.ones(e, device=dev)
    out = torch.ops.cmpe_se.forward(u, x, fc1, fc1_id, fc2, pair_w, bn_w, bn_b, rm, rv, mode, training, 0.1, 1e-5,
                                    fold_width, padding)
    dy = torch.randn_like(out[0])
    grads = torch.ops.cmpe_se.backward(dy, u, out[1], out[2], out[3], out[4], out[5], out[6], fc1, fc1_id, fc2,
                                       pair_w, bn_w, bn_b, mode, training, fold_width, padding)
    torch.cuda.synchronize()
    bad = [i for i, t in enumerate((*out, *grads)) if t.is_floating_point() and not torch.isfinite(t).all()]
    print(f"{mode:10s} {dtype!s:15s} {shape!s:18s} {layout:4s} {'train' if training else 'eval ':5s} "
          f"{'non-finite outputs ' + str(bad) if bad else 'ok'}", flush=True)
    return not bad


def main():
    """fp32 and fp16 on every shape (vector and scalar paths), bf16 and fp64 on one shape.
    ``--quick``: fp32 on two shapes only (racecheck is slow)."""
    quick = "--quick" in sys.argv
    shapes = [(4, 32, 8, 8), (2, 33, 7, 7), (3, 24, 1, 1), (1, 16, 40, 40)]
    plan = [(torch.float32, shapes[:2] if quick else shapes)]
    if not quick:
        plan += [(torch.float16, shapes), (torch.bfloat16, shapes[:1]), (torch.float64, shapes[1:2])]
    ok = True
    for mode in MODES:
        for dtype, dshapes in plan:
            for layout in ("nchw", "cl"):
                for training in (True, False):
                    for shape in dshapes:
                        fw = 3 if shape[1] % 8 else 8
                        ok &= run(mode, dtype, shape, layout, training, fold_width=fw,
                                  padding=1 if shape == (3, 24, 1, 1) else 0)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
