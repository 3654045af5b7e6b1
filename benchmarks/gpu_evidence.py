"""GPU-free evidence for the GPU kernels (issue 17): what the CPU can say about the CUDA kernels,
as numbers a GPU run can check.

    python benchmarks/gpu_evidence.py                 # every table; exit 1 when a budget is broken
    python benchmarks/gpu_evidence.py --quick         # the CI subset (tests/test_gpu_evidence.py)
    python benchmarks/gpu_evidence.py --write-docs    # also regenerate docs/CUDA.md's tables
    python benchmarks/gpu_evidence.py --measured DIR  # model vs measured (a gpu_check results folder)

1. bytes   global bytes of the full-size tensors per launch, traced in the emulator (tests/emulator)
           on the planner's launches, per path x mode x train/eval x pass, as multiples of T; budgets
           of SPEC section 3 (forward 3T resident / 5T two-pass, backward 4T resident / 5T two-pass)
   small   the small tensors' bytes (pools, gate, hidden, BN moments, weights, running stats, weight
           gradients, workspace) per path x mode x train/eval x pass, counted in the emulator's
           "small" build (ThreadSanitizer instrumentation, the hooks supplied by the emulator), in
           bytes and as multiples of one sample's T and of T; no budget (reported)
2. sectors 32-byte sectors each warp-level access touches vs the minimum for its bytes, per kernel
           phase, NCHW and channels_last, at the WRN-28-10 and ResNet-164 stage shapes (N scaled to 1);
           budget: >= 95% in the streaming phases (squeeze, apply, resident load)
3. occupancy  blocks per SM and bytes in flight per SM of each streaming loop from the built
           extension's registers (cuobjdump) and the devices' public limits (csrc/cuda/launch_plan.cuh),
           against Little's law (copy bandwidth x DRAM latency / SMs); budget: every main kernel meets it
4. model   a stated model of each path's time at the targets' shapes on an H200, calibrated on the
           committed H200 run (benchmarks/results/2026-11-26-h200-66dc6c6); a model, not a measurement
5. triton  the Triton kernels' bytes, counted in Triton's interpreter (benchmarks/triton_traffic.py,
           in a subprocess with TRITON_INTERPRET=1): every tl.load / tl.store, mask-aware, per launch
           and per pass, full-size tensors in T and small tensors (pools, gate, hidden, weights,
           running stats, workspace) in bytes; budget: the documented 5T forward and 5T backward
           (cmpe_se_fused/triton/streaming.py), every full-size tensor covered once per pass
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

MODES = ("se", "double_fc", "pair_2x1", "pair_1x1", "folded_3x3")
PATHS = ("persistent", "per_sample", "resident")
# SPEC section 3: full-size bytes per pass as multiples of T
BUDGET = {("fwd", "two-pass"): 5.0, ("fwd", "resident"): 3.0, ("bwd", "two-pass"): 5.0, ("bwd", "resident"): 4.0}
STREAMING = ("squeeze", "apply (load)", "apply (store)", "load")
MIN_EFFICIENCY = 0.95
H200_RUN = os.path.join(ROOT, "benchmarks", "results", "2026-11-26-h200-66dc6c6")
STAGES = [  # (net, stage, C, H): WRN-28-10 and ResNet-164 (bench presets), N scaled to 1
    ("wrn28-10", "s1", 160, 32), ("wrn28-10", "s2", 320, 16), ("wrn28-10", "s3", 640, 8),
    ("resnet164", "s1", 64, 32), ("resnet164", "s2", 128, 16), ("resnet164", "s3", 256, 8),
]


# ---- 1. bytes ---------------------------------------------------------------------------------

def kernel_kind(launch: dict) -> str:
    if launch["cluster"]:
        return f"resident(CL={launch['cluster']})"
    return "per_sample" if launch["per_sample"] else "persistent"


def bytes_rows(shape=(2, 32, 8, 8), dtype_name="float32", modes=MODES, paths=PATHS, layouts=("nchw",)):
    """One row per (path, mode, train/eval, pass, layout): the kernel the planner picked and its
    full-size traffic in T."""
    import torch

    import emulator as E

    dtype = getattr(torch, dtype_name)
    rows = []
    for path in paths:
        for mode in modes:
            for training in (True, False):
                for layout in layouts:
                    fl = E.plan(mode, shape, dtype, layout=layout, training=training, path=path)
                    bl = E.plan(mode, shape, dtype, layout=layout, training=training, path=path, backward=True)
                    fwd, bwd = E.measure(mode, dtype, shape, layout, training, fl, bl)
                    for name, launch, tr in (("fwd", fl, fwd), ("bwd", bl, bwd)):
                        kind = kernel_kind(launch)
                        budget = BUDGET[(name, "resident" if launch["cluster"] else "two-pass")]
                        rows.append({"path": path, "mode": mode, "phase": "train" if training else "eval",
                                     "pass": name, "layout": layout, "kernel": kind,
                                     "read_T": tr.read_T, "written_T": tr.written_T, "total_T": tr.total_T,
                                     "per_tensor": {k: round((tr.read[k] + tr.written[k]) / tr.tensor_bytes, 3)
                                                    for k in tr.read},
                                     "budget_T": budget, "ok": tr.total_T <= budget + 1e-9})
    return rows


def bytes_table(rows) -> str:
    out = ["| path | mode | train/eval | pass | kernel | read | written | total | budget | per tensor |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flag = "" if r["ok"] else " **OVER**"
        per = ", ".join(f"{k} {v:g}" for k, v in r["per_tensor"].items())
        out.append(f"| {r['path']} | {r['mode']} | {r['phase']} | {r['pass']} | {r['kernel']} | {r['read_T']:.2f}T | "
                   f"{r['written_T']:.2f}T | {r['total_T']:.2f}T{flag} | {r['budget_T']:g}T | {per} |")
    return "\n".join(out)


# ---- 1b. the small tensors' bytes (the emulator's "small" build) --------------------------------

SMALL_GROUPS = {  # report columns: the registered small tensors and workspace areas of a pass
    "weights": ("fc1", "fc1_identity", "fc2", "pair_weight", "bn_weight", "bn_bias"),
    "vectors": ("pool_u", "pool_x", "gate", "hidden", "bn_mean", "bn_invstd"),
    "running": ("running_mean", "running_var"),
    "wgrads": ("d_fc1", "d_fc1_identity", "d_fc2", "d_pair_weight", "d_bn_weight", "d_bn_bias"),
}
# the CUDA targets' late stages for the small-tensor table (reduction 16 as the bench presets, N=2)
SMALL_TARGETS = [("wrn28-10", "s3", 640, 8), ("resnet164", "s3", 256, 8)]


def _group_of(name: str) -> str:
    if name == "ws_header":
        return "counters"
    if name.startswith("ws_"):
        return "workspace"
    for grp, names in SMALL_GROUPS.items():
        if name in names:
            return grp
    raise KeyError(name)


def small_summary(counts: dict, tensor_bytes: int, n: int) -> dict:
    """Bytes per group of one pass's small-tensor counts. ``total`` excludes the counters' reads
    (the grid barrier's spin loop: how often a block polls depends on the emulator's scheduling,
    not on the kernel); their writes (the barrier's atomics) are in it."""
    groups = {g: 0 for g in (*SMALL_GROUPS, "workspace", "counters")}
    for name, c in counts.items():
        groups[_group_of(name)] += c["read"] + c["written"]
    hdr = counts.get("ws_header", {"read": 0, "written": 0})
    total = sum(v for k, v in groups.items() if k != "counters") + hdr["written"]
    per_tensor = {k: c["read"] + c["written"] for k, c in counts.items() if c["read"] + c["written"]}
    return {"groups": groups, "total": total, "per_tensor": per_tensor, "counter_writes": hdr["written"],
            "counter_reads": hdr["read"], "per_sample_T": total / (tensor_bytes / n), "T": total / tensor_bytes,
            "distinct": sum(c["distinct_read"] + c["distinct_written"] for k, c in counts.items() if k != "ws_header")}


def small_rows(shape=(2, 32, 8, 8), dtype_name="float32", modes=MODES, paths=PATHS, reduction=4, device=None,
               net=None):
    """One row per (path, mode, train/eval, pass): the small tensors' bytes of the planner's launch,
    counted in the emulator's "small" build (every access of the compiled kernels to a small
    tensor or workspace area, per GPU thread: a warp-wide broadcast counts once per lane)."""
    import torch

    import emulator as E

    dtype = getattr(torch, dtype_name)
    dev = device or E.TINY
    rows = []
    for path in paths:
        for mode in modes:
            for training in (True, False):
                fl = E.plan(mode, shape, dtype, training=training, path=path, reduction=reduction, device=dev)
                bl = E.plan(mode, shape, dtype, training=training, path=path, backward=True, reduction=reduction,
                            device=dev)
                fwd, bwd, tb = E.measure_small(mode, dtype, shape, "nchw", training, fl, bl, reduction=reduction)
                for name, launch, counts in (("fwd", fl, fwd), ("bwd", bl, bwd)):
                    rows.append({"shape": net or f"N={shape[0]} C={shape[1]} {shape[2]}x{shape[3]}", "path": path,
                                 "mode": mode, "phase": "train" if training else "eval", "pass": name,
                                 "kernel": kernel_kind(launch), "blocks": launch["blocks"], "T_bytes": tb,
                                 "N": shape[0], "counts": counts, **small_summary(counts, tb, shape[0])})
    return rows


def small_target_rows(targets=SMALL_TARGETS, paths=("persistent", "resident")):
    """se, training, at the targets' late stages (N=2, reduction 16), on the emulated device of the
    coalescing table (H100 shared memory, 8 SMs)."""
    import emulator as E

    dev = E.EmuDevice(sms=8, smem_optin=232448, smem_per_sm=233472, max_threads_per_sm=256)
    rows = []
    for net, stage, c, h in targets:
        rows += [r for r in small_rows(shape=(2, c, h, h), modes=("se",), paths=paths, reduction=16, device=dev,
                                       net=f"{net}/{stage} C={c} {h}x{h} N=2")
                 if r["phase"] == "train"]
    return rows


def small_table(rows, with_shape=False) -> str:
    head = "| shape " if with_shape else ""
    out = [head + "| path | mode | train/eval | pass | kernel | weights | vectors | running | weight grads | workspace | "
           "counters (atomics / spin reads) | total | per-sample T | T | largest |",
           ("|---" if with_shape else "") + "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["groups"]
        ranked = sorted(((k, v) for k, v in r["per_tensor"].items() if k != "ws_header"), key=lambda kv: -kv[1])
        big = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in ranked[:3])
        cell = (lambda v: _fmt_bytes(v) if v else "-")  # noqa: E731
        out.append((f"| {r['shape']} " if with_shape else "") +
                   f"| {r['path']} | {r['mode']} | {r['phase']} | {r['pass']} | {r['kernel']} | {cell(g['weights'])} | "
                   f"{cell(g['vectors'])} | {cell(g['running'])} | {cell(g['wgrads'])} | {cell(g['workspace'])} | "
                   f"{r['counter_writes']} B / {r['counter_reads']} B | {_fmt_bytes(r['total'])} | "
                   f"{r['per_sample_T']:.2f} | {r['T']:.3f} | {big} |")
    return "\n".join(out)


# ---- 2. coalescing ----------------------------------------------------------------------------

def coalescing_rows(stages=STAGES, layouts=("nchw", "channels_last"), dtype_name="float32",
                    paths=("persistent", "resident")):
    import torch

    import emulator as E

    dtype = getattr(torch, dtype_name)
    # the planner on an emulated device with H100 shared memory (the resident slices at full
    # sample size) and 8 SMs of 2 blocks: enough for a cluster of 16 (WRN-28-10 stage 1 fp32)
    dev = E.EmuDevice(sms=8, smem_optin=232448, smem_per_sm=233472, max_threads_per_sm=256)
    rows = []
    for net, stage, c, h in stages:
        shape = (1, c, h, h)
        for layout in layouts:
            for path in paths:
                fl = E.plan("se", shape, dtype, layout=layout, training=True, path=path, device=dev)
                bl = E.plan("se", shape, dtype, layout=layout, training=True, path=path, backward=True, device=dev)
                fwd, bwd = E.measure("se", dtype, shape, layout, True, fl, bl)
                for name, launch, tr in (("fwd", fl, fwd), ("bwd", bl, bwd)):
                    for ph, v in sorted(tr.phases.items()):
                        eff = v["min_sectors"] / v["sectors"] if v["sectors"] else 1.0
                        streaming = ph in STREAMING
                        rows.append({"shape": f"{net}/{stage} C={c} {h}x{h}", "layout": layout,
                                     "kernel": kernel_kind(launch), "pass": name, "phase": ph,
                                     "requests": v["requests"], "sectors": v["sectors"],
                                     "min_sectors": v["min_sectors"], "efficiency": eff, "streaming": streaming,
                                     "ok": (not streaming) or eff >= MIN_EFFICIENCY})
    return rows


def coalescing_table(rows) -> str:
    out = ["| shape | layout | kernel | pass | phase | warp requests | sectors | minimum | efficiency |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flag = "" if r["ok"] else " **LOW**"
        out.append(f"| {r['shape']} | {r['layout']} | {r['kernel']} | {r['pass']} | {r['phase']} | {r['requests']} | "
                   f"{r['sectors']} | {r['min_sectors']} | {100 * r['efficiency']:.1f}%{flag} |")
    return "\n".join(out)


# ---- 3. occupancy and bytes in flight ---------------------------------------------------------

DEVICE_LINE = re.compile(r'inline constexpr DeviceLimits kDevice(\w+)\{"([^"]+)", (\d+), (\d+), (\d+), (\d+), (\d+), '
                         r'(\d+), (\d+), (\d+), (\d+), ([\d.]+), ([\d.]+)\};')
KUNROLL = 4  # csrc/kernels/stream.cuh kUnroll: 16-byte loads of each tensor in flight per thread


def device_limits() -> dict:
    """The devices' public limits, from csrc/cuda/launch_plan.cuh (one source of truth)."""
    with open(os.path.join(ROOT, "csrc", "cuda", "launch_plan.cuh")) as fh:
        text = fh.read()
    out = {}
    for m in DEVICE_LINE.finditer(text):
        g = m.groups()
        out[g[1]] = {"cc": int(g[2]), "sms": int(g[4]), "smem_optin": int(g[5]), "smem_per_sm": int(g[6]),
                     "smem_reserved": int(g[7]), "regs_per_sm": int(g[8]), "max_threads_per_sm": int(g[9]),
                     "max_blocks_per_sm": int(g[10]), "copy_gbps": float(g[11]), "latency_ns": float(g[12])}
    return out


def blocks_per_sm(d: dict, regs: int, threads: int, smem: int) -> int:
    """The occupancy model of launch_plan.cuh (model_blocks_per_sm)."""
    warps = (threads + 31) // 32
    regs_warp = (regs * 32 + 255) // 256 * 256
    b = min(d["max_blocks_per_sm"], d["max_threads_per_sm"] // (warps * 32))
    if regs_warp:
        b = min(b, (d["regs_per_sm"] // regs_warp) // warps)
    if smem > d["smem_optin"]:
        return 0
    return max(0, min(b, d["smem_per_sm"] // (smem + d["smem_reserved"])))


def _smem_persistent(c, rh, backward, threads, vec, acc=4, channels_last=False):
    """SmemPlan.total of csrc/cmpe_se.h for se mode (the streaming kernels' dynamic shared memory)."""
    up = lambda b: (b + 15) // 16 * 16  # noqa: E731
    mom = up(8 * 32 * 10)
    su = up(mom + 8 * 100)
    sx = up(su + acc * c)
    sdg = up(sx)
    sz = up(sdg + (acc * c if backward else 0))
    sh = up(sz)
    filt = up(sh + acc * rh)
    small = up(filt)
    stream = (1 if backward else 2) * threads * vec * acc if channels_last else 0
    return max(small, stream)


def _smem_resident(c, p, rh, backward, threads, vec, cl, elem, acc=4):
    up = lambda b: (b + 15) // 16 * 16  # noqa: E731
    base = up(_smem_persistent(c, rh, backward, threads, vec, acc))
    pu = base
    px = up(pu + acc * c)
    gate = up(px + acc * c)
    per = (c + cl - 1) // cl
    sl = per * p
    u = up(gate + acc * c)
    x = up(u + elem * sl)
    return up(x + elem * sl)


def occupancy_rows(resources: dict | None, archs=("sm_90", "sm_80"), threads=256):
    """Blocks per SM and bytes in flight per SM of the streaming loops, per main kernel, on each
    device of each architecture (sm_90: H100, H200; sm_80: A100, when the build has sm_80 code),
    against Little's law."""
    rows = []
    for arch in archs:
        if arch != "sm_90" and arch not in (resources or {}):
            continue
        rows += _occupancy_arch(resources, arch, threads)
    return rows


def _occupancy_arch(resources, arch, threads):
    rows = []
    devs = {k: v for k, v in device_limits().items() if v["cc"] == int(arch[3])}
    kernels = (resources or {}).get(arch, {})

    def regs_of(prefix, vec_tag):
        for k, v in kernels.items():
            if k.startswith(prefix + "<float, " + vec_tag + ">"):
                static = v.get("SHARED", 0)
                if arch.startswith("sm_9") and static >= 1024:
                    static -= 1024  # sm_90 builds report the system's 1 KB reserve (the model adds it)
                return v["REG"], static
        return None, None

    # (kernel, phase, tensors loaded per unrolled step, C, H, backward, resident)
    shape_c, shape_h = 160, 32  # WRN-28-10 stage 1, fp32 (the targets' big shape)
    loops = [("cmpe_se_forward_kernel", "squeeze (U, X)", 2, False, False),
             ("cmpe_se_forward_kernel", "apply (U, X)", 2, False, False),
             ("cmpe_se_backward_kernel", "squeeze (dY, U)", 2, True, False),
             ("cmpe_se_backward_kernel", "apply (dY)", 1, True, False),
             ("cmpe_se_forward_resident_kernel", "load (U, X)", 2, False, True),
             ("cmpe_se_backward_resident_kernel", "load (dY, U)", 2, True, True)]
    for dname, d in devs.items():
        need = d["copy_gbps"] * 1e9 * d["latency_ns"] * 1e-9 / d["sms"]  # bytes in flight per SM (Little)
        for kname, phase, tensors, backward, resident in loops:
            if resident and d["cc"] < 9:
                continue  # without clusters a WRN stage-1 sample does not fit one block: persistent
            regs, static = regs_of(kname, "4")
            if regs is None:
                rows.append({"device": dname, "kernel": kname + "<float, 4>", "phase": phase, "regs": None,
                             "smem": None, "blocks_per_sm": None, "inflight": None, "need": need, "ok": None})
                continue
            rh = shape_c // 16
            if resident:
                cl = 1
                while cl <= 16:  # the planner's heuristic on this device (two blocks per SM first)
                    sm = _smem_resident(shape_c, shape_h * shape_h, rh, backward, threads, 4, cl, 4)
                    if sm + 1024 <= d["smem_optin"] // 2:
                        break
                    cl *= 2
                smem = sm
            else:
                smem = _smem_persistent(shape_c, rh, backward, threads, 4)
            bps = blocks_per_sm(d, regs, threads, smem + static)
            inflight = bps * threads * KUNROLL * tensors * 16
            rows.append({"device": dname, "kernel": kname + "<float, 4>", "phase": phase, "regs": regs,
                         "smem": smem + static, "blocks_per_sm": bps, "inflight": inflight, "need": need,
                         "ok": inflight >= need})
    return rows


def occupancy_table(rows) -> str:
    out = ["| device | kernel | streaming loop | registers | smem/block | blocks/SM | bytes in flight/SM | "
           "Little's law needs | |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["regs"] is None:
            out.append(f"| {r['device']} | `{r['kernel']}` | {r['phase']} | ? | ? | ? | ? | {r['need'] / 1024:.1f} KB | "
                       "no build |")
            continue
        out.append(f"| {r['device']} | `{r['kernel']}` | {r['phase']} | {r['regs']} | {r['smem'] / 1024:.1f} KB | "
                   f"{r['blocks_per_sm']} | {r['inflight'] / 1024:.0f} KB | {r['need'] / 1024:.1f} KB | "
                   f"{'ok' if r['ok'] else '**SHORT**'} |")
    return "\n".join(out)


# ---- 4. a stated model, calibrated on the committed H200 run ----------------------------------

def _h200_rows(run_dir=H200_RUN):
    path = os.path.join(run_dir, "bench.json")
    if not os.path.exists(path):
        return [], None
    with open(path) as fh:
        d = json.load(fh)
    bw = d["meta"].get("copy_bandwidth", {}).get("GBps")
    rows = [r for r in d["rows"] if r.get("kind") == "layer" and r.get("status") == "ok"]
    return rows, bw


def _excite_macs(c, rh, n, mode):
    """Multiply-adds of the small per-sample network for the whole batch (fc1 + fc2)."""
    return n * 2 * c * rh


def calibrate(run_dir=H200_RUN, pass_="fwd"):
    """Least squares on the run's times of the persistent cuda kernel (se, NCHW, fp32 and bf16, one
    pass; the CUDA-graph time where the run has one, else the median): t = a + 5 T / BW + b x
    small-network MACs. a: launch + grid barriers; b: time per MAC of the small network spread over
    the grid. Returns (a_us, b_us_per_mac, bw_GBps, n_rows) or None."""
    rows, bw = _h200_rows(run_dir)
    pts = [r for r in rows if r["provider"] == "cuda" and r["pass"] == pass_ and r["mode"] == "se"
           and r["layout"] == "nchw" and (r.get("graph_us") or r.get("median_us"))]
    if not pts or not bw:
        return None
    xs, ys = [], []
    for r in pts:
        bytes_us = 5 * r["T_bytes"] / (bw * 1e3)
        rh = max(1, r["C"] // 16)
        xs.append(_excite_macs(r["C"], rh, r["N"], "se"))
        ys.append((r.get("graph_us") or r["median_us"]) - bytes_us)
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    vx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / vx if vx else 0.0
    b = max(b, 0.0)
    a = my - b * mx
    return a, b, bw, n


def model_rows(run_dir=H200_RUN, measured_dir=None):
    """Model of each path at the targets' shapes (N=128, fp32 and bf16, NCHW, se) on an H200."""
    cal = {p: calibrate(run_dir, p) for p in ("fwd", "bwd")}
    if cal["fwd"] is None or cal["bwd"] is None:
        return [], None
    measured = {}
    if measured_dir:
        mrows, _ = _h200_rows(measured_dir)
        for r in mrows:
            if r["layout"] == "nchw" and r["mode"] == "se" and r["phase"] == "train":
                measured[(r["net"], r["stage"], r["dtype"], r["pass"], r["provider"])] = r.get("graph_us") or \
                    r["median_us"]
    rows = []
    for net, stage, c, h in (("wrn28-10", "s1", 160, 32), ("resnet164", "s3", 256, 8)):
        for dt, elem in (("fp32", 4), ("bf16", 2)):
            T = 128 * c * h * h * elem
            for pas in ("fwd", "bwd"):
                for prov, mult in (("cuda", 5), ("cuda@resident", 3 if pas == "fwd" else 4)):
                    rows.append({"shape": f"{net}/{stage} N=128 C={c} {h}x{h}", "dtype": dt, "pass": pas,
                                 "provider": prov, "bytes_T": mult, "model_us": _model_us(cal, pas, prov, T, c, 128),
                                 "measured_us": measured.get((net, stage, dt, pas, prov))})
    return rows, cal


def _model_us(cal, pas, provider, T, c, n):
    """The model of one pass (fwd, bwd, or fwdbwd = fwd + bwd) of a cuda provider, or None."""
    if pas == "fwdbwd":
        f, b = _model_us(cal, "fwd", provider, T, c, n), _model_us(cal, "bwd", provider, T, c, n)
        return None if f is None or b is None else f + b
    base, _, variant = provider.partition("@")
    if base != "cuda" or cal.get(pas) is None:
        return None
    a, b, bw, _ = cal[pas]
    resident = variant.startswith("resident")
    mult = (3 if pas == "fwd" else 4) if resident else 5
    # resident: no grid barrier; its fixed cost is taken as a third of the persistent one (a launch
    # instead of a launch + barriers): an assumption, not a fit
    fixed = a / 3 if resident else a
    return fixed + mult * T / (bw * 1e3) + b * _excite_macs(c, max(1, c // 16), n, "se")


def bench_model_rows(measured_dir, run_dir=H200_RUN):
    """The model next to every cuda row (se, NCHW) of a results folder's bench.json, at the row's
    own shape, dtype and pass."""
    cal = {p: calibrate(run_dir, p) for p in ("fwd", "bwd")}
    if cal["fwd"] is None or cal["bwd"] is None:
        return []
    mrows, _ = _h200_rows(measured_dir)
    rows = []
    for r in mrows:
        if r["mode"] != "se" or r["layout"] != "nchw" or not r["provider"].startswith("cuda"):
            continue
        model = _model_us(cal, r["pass"], r["provider"], r["T_bytes"], r["C"], r["N"])
        meas = r.get("graph_us") or r.get("median_us")
        if model is None or not meas:
            continue
        rows.append({"shape": f"{r['net']}/{r['stage']} N={r['N']} C={r['C']} {r['H']}x{r['W']}", "dtype": r["dtype"],
                     "phase": r["phase"], "pass": r["pass"], "provider": r["provider"], "model_us": model,
                     "measured_us": meas, "graph": bool(r.get("graph_us")), "ratio": meas / model})
    return rows


BENCH_BEGIN = "<!-- gpu_evidence:model:begin -->"
BENCH_END = "<!-- gpu_evidence:model:end -->"


def bench_model_section(rows, device=None) -> str:
    out = [BENCH_BEGIN, "## Model vs measured (cuda, se, NCHW)", "",
           "MODEL (not a measurement) of an H200 (`benchmarks/gpu_evidence.py`, calibrated on the committed run "
           "benchmarks/results/2026-11-26-h200-66dc6c6; two-pass 5T, resident 3T forward / 4T backward with a "
           "third of the fixed cost, an assumption)" + (f"; this run's device: {device}" if device else "") +
           ". Measured: this run's CUDA-graph time where it has one (g), else the median.", "",
           "| shape | dtype | train/eval | pass | provider | measured | model | measured / model |",
           "|---|---|---|---|---|---|---|---|"]
    if not rows:
        out.append("| (no cuda se NCHW row in this run, or no calibration run) | | | | | | | |")
    for r in rows:
        out.append(f"| {r['shape']} | {r['dtype']} | {r['phase']} | {r['pass']} | {r['provider']} | "
                   f"{r['measured_us']:.1f} us{' (g)' if r['graph'] else ''} | {r['model_us']:.1f} us | "
                   f"{r['ratio']:.2f} |")
    out.append(BENCH_END)
    return "\n".join(out)


def annotate_bench_md(measured_dir) -> str | None:
    """Write the model next to the measured cuda rows into ``measured_dir/bench.md`` (between
    markers: rerunning replaces the section). Returns the path written, or None without a bench.md."""
    path = os.path.join(measured_dir, "bench.md")
    if not os.path.exists(path):
        return None
    device = None
    try:
        with open(os.path.join(measured_dir, "bench.json")) as fh:
            dev = json.load(fh)["meta"].get("device")
        device = dev.get("name") if isinstance(dev, dict) else dev
    except (OSError, ValueError, KeyError):
        pass
    section = bench_model_section(bench_model_rows(measured_dir), device)
    with open(path) as fh:
        doc = fh.read()
    m = re.search(re.escape(BENCH_BEGIN) + ".*?" + re.escape(BENCH_END), doc, flags=re.S)
    doc = doc[:m.start()] + section + doc[m.end():] if m else doc.rstrip() + "\n\n" + section + "\n"
    with open(path, "w") as fh:
        fh.write(doc)
    return path


def model_table(rows, cal) -> str:
    if not rows:
        return "(no committed H200 run to calibrate on)"
    head = []
    for pas, (a, b, bw, n) in cal.items():
        head.append(f"{pas}: fixed {a:.1f} us + {b * 1e6:.3f} ps per small-network MAC, fitted on {n} rows")
    out = [f"MODEL (not a measurement): t = fixed + full-size bytes / {cal['fwd'][2]:.0f} GB/s + c x small-network "
           "MACs, fitted per pass on the committed H200 run's persistent cuda times (se, NCHW, fp32/bf16; CUDA-graph "
           "time where the run has one, else the median): " + "; ".join(head) + ". The resident rows reuse the "
           "fit with a third of the fixed cost (no grid barrier): an assumption for the next GPU run to check. "
           "The committed run has no CUDA-graph time for the backward: its medians (about 210-260 us at every size) "
           "are dominated by host overhead, so the backward fit describes that overhead, not the kernel.", "",
           "| shape | dtype | pass | provider | full-size bytes | model us | measured us |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        meas = f"{r['measured_us']:.1f}" if r["measured_us"] else "-"
        out.append(f"| {r['shape']} | {r['dtype']} | {r['pass']} | {r['provider']} | {r['bytes_T']}T | "
                   f"{r['model_us']:.1f} | {meas} |")
    return "\n".join(out)


# ---- 5. the Triton kernels' bytes, in Triton's interpreter --------------------------------------

TRITON_SHAPE = (2, 32, 8, 8)
# documented traffic (cmpe_se_fused/triton/streaming.py module docstring), per tensor in T: forward 5T
# (the squeeze reads U, X; the rescale re-reads them and writes Y), backward 5T (grad-gate reads dY,
# U: 2T; input-grad reads dY, writes dU, dX: 3T)
TRITON_DOCUMENTED = {"fwd": {"U": 2, "X": 2, "Y": 1}, "bwd": {"dY": 2, "U": 1, "dU": 1, "dX": 1}}
TRITON_BUDGET_T = {"fwd": 5.0, "bwd": 5.0}
# late stages of the targets (N scaled to 2, reduction 16 as the bench presets): the small network's
# weights are read once per program, so their bytes grow with N x programs per sample
TRITON_TARGETS = [("wrn28-10", "s3", 640, 8), ("resnet164", "s3", 256, 8)]


def triton_rows(modes=MODES, layouts=("nchw", "channels_last"), configs=("single", "split"), shape=TRITON_SHAPE,
                phases=("train", "eval"), reduction=4, dtype="float32", timeout=1800) -> list[dict]:
    """Rows of benchmarks/triton_traffic.py, run in a subprocess: the interpreter must be on before
    triton is first imported, which this process cannot promise."""
    import subprocess

    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "triton_traffic.py"), "--json",
           "--modes", ",".join(modes), "--layouts", ",".join(layouts), "--configs", ",".join(configs),
           "--shape", ",".join(map(str, shape)), "--phases", ",".join(phases), "--reduction", str(reduction),
           "--dtype", dtype]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout, check=False)
    if res.returncode == 2 or not res.stdout.strip():
        raise RuntimeError(f"triton_traffic.py failed (rc {res.returncode}): {res.stderr[-2000:]}")
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    for r in rows:
        r["ok"] = triton_row_ok(r)
    return rows


def triton_row_ok(r: dict) -> bool:
    """Within the documented budget, no byte outside the launch's tensors, and every full-size
    tensor covered exactly once (no element skipped)."""
    covered = all(abs(v - 1.0) < 1e-9 for v in r["coverage"].values())
    return r["total_T"] <= r["budget_T"] + 1e-9 and r["unknown_bytes"] == 0 and covered


def _short(kernel: str) -> str:
    return kernel.strip("_").replace("_kernel", "")


def _fmt_bytes(b: int) -> str:
    return f"{b} B" if b < 10240 else f"{b / 1024:.1f} KiB"


def triton_table(rows) -> str:
    out = ["| launch config | layout | mode | train/eval | pass | launches (full-size T each) | read | written | "
           "total | budget | per tensor (re-read factor) | small tensors | small distinct |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flag = "" if r["ok"] else " **OVER**"
        lns = "; ".join(f"{_short(ln['kernel'])}{tuple(ln['grid']) if isinstance(ln['grid'], list) else ''} "
                        f"{ln['read_T'] + ln['written_T']:g}T" for ln in r["launches"])
        per = ", ".join(f"{k} {v:g}" + (f" (x{r['reread'][k]:g})" if r["reread"].get(k, 0) > 1 else "")
                        for k, v in r["per_tensor"].items())
        out.append(f"| {r['config']} | {r['layout']} | {r['mode']} | {r['phase']} | {r['pass']} | {lns} | "
                   f"{r['read_T']:.2f}T | {r['written_T']:.2f}T | {r['total_T']:.2f}T{flag} | {r['budget_T']:g}T | "
                   f"{per} | {r['small_bytes']} B | {r['small_distinct']} B |")
    return "\n".join(out)


def triton_launch_table(rows, modes=("se", "folded_3x3"), phase="train", layout="nchw") -> str:
    out = ["| launch config | mode | pass | launch | grid | full-size per tensor | small tensors (bytes) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["mode"] not in modes or r["phase"] != phase or r["layout"] != layout:
            continue
        for ln in r["launches"]:
            per = ", ".join(f"{k} {v:g}T" for k, v in ln["per_tensor"].items()) or "-"
            small = ", ".join(f"{k} {v}" for k, v in sorted(ln["small"].items(), key=lambda kv: -kv[1]))
            out.append(f"| {r['config']} | {r['mode']} | {r['pass']} | `{ln['kernel']}` | {tuple(ln['grid'])} | "
                       f"{per} | {ln['small_bytes']}: {small} |")
    return "\n".join(out)


def triton_target_rows(targets=TRITON_TARGETS, configs=("single", "split3")) -> list[dict]:
    rows = []
    for net, stage, c, h in targets:
        for r in triton_rows(modes=("se",), layouts=("nchw",), configs=configs, shape=(2, c, h, h),
                             phases=("train",), reduction=16):
            r["net"] = f"{net}/{stage} C={c} {h}x{h}"
            rows.append(r)
    return rows


def triton_target_table(rows) -> str:
    out = ["| shape (N=2) | launch config | pass | full-size total | small tensors per sample | "
           "as a fraction of one sample's T | largest |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r["shape"][0]
        per_sample = r["small_bytes"] / n
        biggest = sorted(r["small"].items(), key=lambda kv: -kv[1])[:3]
        big = ", ".join(f"{k} {_fmt_bytes(v // n)}" for k, v in biggest)
        out.append(f"| {r['net']} | {r['config']} | {r['pass']} | {r['total_T']:.2f}T | "
                   f"{_fmt_bytes(int(per_sample))} | {per_sample / (r['T_bytes'] / n):.2f} | {big} |")
    return "\n".join(out)


# ---- main -------------------------------------------------------------------------------------

DOC_BEGIN = "<!-- gpu_evidence:begin -->"
DOC_END = "<!-- gpu_evidence:end -->"


SECTIONS = ("bytes", "small", "sectors", "occupancy", "model", "triton")
HEADINGS = {"bytes": "### Bytes moved per pass", "small": "### Small tensors", "sectors": "### Coalescing",
            "occupancy": "### Occupancy", "model": "### A stated model", "triton": "### Triton kernels"}


def _doc_sections(block: str) -> dict:
    """The current docs block split into its sections (by their headings)."""
    out = {}
    parts = re.split(r"(?m)^(?=### )", block)
    for part in parts:
        for name, head in HEADINGS.items():
            if part.startswith(head):
                out[name] = part.strip()
    return out


def write_docs(sections: dict, path=os.path.join(ROOT, "docs", "CUDA.md")):
    """Regenerate the block between the markers: the sections given (name -> text) replace theirs;
    a section this run skipped keeps its text from the current block."""
    with open(path) as fh:
        doc = fh.read()
    old = {}
    m = re.search(re.escape(DOC_BEGIN) + "(.*?)" + re.escape(DOC_END), doc, flags=re.S)
    if m:
        old = _doc_sections(m.group(1))
    texts = [sections.get(name) or old.get(name) for name in SECTIONS]
    block = f"{DOC_BEGIN}\n" + "\n\n".join(t.strip() for t in texts if t) + f"\n{DOC_END}"
    if m:
        doc = doc[:m.start()] + block + doc[m.end():]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as fh:
        fh.write(doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the CI subset: se and folded_3x3, two stage shapes")
    ap.add_argument("--write-docs", action="store_true", help="regenerate the tables in docs/CUDA.md")
    ap.add_argument("--measured", default=None, help="a gpu_check results folder: model vs measured")
    ap.add_argument("--bench-md", action="store_true",
                    help="with --measured: also write the model next to the run's cuda rows into its bench.md")
    ap.add_argument("--modes", default=None,
                    help="comma list of modes for the bytes and Triton tables (default: all)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: bytes,small,sectors,occupancy,model,triton "
                    "(--write-docs keeps a skipped section's current text)")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    failures = []
    parts = {}
    if "bytes" not in skip:
        modes = tuple(args.modes.split(",")) if args.modes else ("se", "folded_3x3") if args.quick else MODES
        rows = bytes_rows(modes=modes)
        parts["bytes"] = (
            "### Bytes moved per pass (emulator, planner's launches, N=2 C=32 8x8 fp32 NCHW)\n\n"
            "Global bytes of the full-size tensors (U, X, Y; dY, U, dU, dX), traced through the kernels' "
            "vector load/store helpers, in multiples of T; budgets from SPEC section 3. Small tensors "
            "(pools, gate, weights, workspace: O(N*C)): the next table.\n\n"
            + bytes_table(rows))
        failures += [f"bytes: {r['path']}/{r['mode']}/{r['phase']}/{r['pass']} {r['total_T']:.2f}T > {r['budget_T']}T"
                     for r in rows if not r["ok"]]
    if "small" not in skip:
        modes = tuple(args.modes.split(",")) if args.modes else ("se", "folded_3x3") if args.quick else MODES
        rows = small_rows(modes=modes)
        text = (
            "### Small tensors: bytes per pass (emulator, \"small\" build, planner's launches, N=2 C=32 8x8 fp32 "
            "NCHW, reduction 4)\n\n"
            "Every access of the compiled kernels to a small tensor, counted per GPU thread: the emulator compiled "
            "with GCC's ThreadSanitizer instrumentation (a hook before every load and store), linked without "
            "libtsan; its hooks count the bytes whose address lies in a registered small tensor or workspace area, "
            "only while a GPU thread runs (`tests/emulator`, `measure_small`). Full-size tensors are the table "
            "above; shared memory and registers are not global memory and are not counted. A value every lane of "
            "a warp reads (the gate in the apply, a broadcast) counts once per lane: these are bytes requested "
            "by threads, an upper bound of what reaches L1/L2. Groups: weights (fc1, fc1_identity, fc2, "
            "pair_weight, bn weight/bias), vectors (pool_u, pool_x, gate, hidden, bn_mean, bn_invstd), running "
            "mean/var, weight grads (d_*), workspace (partial sums, moments, backward scratch); counters: the "
            "grid barrier's header, atomics (exact) / spin reads (emulator scheduling, excluded from the total). "
            "Per-sample T = T / N.\n\n" + small_table(rows))
        if not args.quick and not args.modes:
            trows = small_target_rows()
            text += ("\n\nAt the targets' late stages (se, training, fp32 NCHW, reduction 16, N=2, the planner on the "
                     "coalescing table's device): the weights are read once per sample by the block that owns it "
                     "(fc1 and fc2 in the forward, both again in the backward), so their bytes per sample do not "
                     "shrink with N; the weight gradients are written once per pass:\n\n"
                     + small_table(trows, with_shape=True))
        parts["small"] = text
    if "sectors" not in skip:
        stages = [STAGES[0], STAGES[5]] if args.quick else STAGES
        rows = coalescing_rows(stages=stages)
        parts["sectors"] = (
            "### Coalescing (emulator, se, fp32, N=1, training)\n\n"
            "Per warp-level access (call site x the k-th time each lane reached it): 32-byte sectors touched "
            f"vs the minimum for the bytes used; streaming phases must stay >= {100 * MIN_EFFICIENCY:.0f}%.\n\n"
            + coalescing_table(rows))
        failures += [f"sectors: {r['shape']} {r['layout']} {r['kernel']} {r['pass']} {r['phase']} "
                     f"{100 * r['efficiency']:.1f}%" for r in rows if not r["ok"]]
    if "occupancy" not in skip:
        from emulator.resources import read_resources

        res, why = read_resources()
        rows = occupancy_rows(res if not why else None)
        note = f" (registers unavailable: {why})" if why else ""
        parts["occupancy"] = (
            "### Occupancy and bytes in flight (WRN-28-10 stage 1, fp32, 256 threads)" + note + "\n\n"
            "Blocks per SM from the built extension's registers (cuobjdump, sm_90 and sm_80) and the public limits "
            "in `csrc/cuda/launch_plan.cuh`; bytes in flight per SM = blocks x threads x kUnroll (4) x "
            "tensors x 16 B; Little's law: copy bandwidth x DRAM latency / SMs.\n\n" + occupancy_table(rows))
        failures += [f"occupancy: {r['device']} {r['kernel']} {r['phase']} {r['inflight']} < {r['need']:.0f} B"
                     for r in rows if r["ok"] is False]
    if "model" not in skip:
        rows, cal = model_rows(measured_dir=args.measured)
        parts["model"] = "### A stated model of the targets (H200)\n\n" + model_table(rows, cal)
        if args.measured and args.bench_md:
            path = annotate_bench_md(args.measured)
            print(f"model vs measured written into {path}" if path else f"no bench.md in {args.measured}",
                  file=sys.stderr)
    if "triton" not in skip:
        modes = tuple(args.modes.split(",")) if args.modes else ("se", "folded_3x3") if args.quick else MODES
        layouts = ("nchw",) if args.quick else ("nchw", "channels_last")
        try:
            rows = triton_rows(modes=modes, layouts=layouts)
        except (RuntimeError, OSError) as exc:  # no triton here: say so, keep the docs' section
            print(f"### Triton kernels: not run ({exc})\n")
            rows = None
    if "triton" not in skip and rows is not None:
        n, c, h, w = TRITON_SHAPE
        text = (f"### Triton kernels: bytes moved per launch and per pass (interpreter, N={n} C={c} {h}x{w} fp32)\n\n"
                "Every `tl.load` / `tl.store` of every launch, counted in Triton's interpreter "
                "(`benchmarks/triton_traffic.py`): bytes of the active lanes only (masked-off lanes move nothing), "
                "element size from the pointer type, each address classified into the launch's tensor arguments by "
                "their storage ranges. Full-size tensors (U, X, Y; dY, U, dU, dX) in T, with the re-read factor "
                "(bytes read / distinct bytes read) where above 1; small tensors (pools, gate, hidden, weights, "
                "running stats, moments, workspace) in bytes (total accessed, and distinct). Launch configs: "
                "`single` (one program per sample; the default when N >= SMs, and on the CPU), `split` (2 programs "
                "per sample, 8-channel tiles: the N < SMs default's structure, squeeze and excite separate). Budget: "
                "the documented 5T forward (the squeeze reads U, X; the rescale re-reads them: the two-pass design "
                "of SPEC section 3, above its 3T floor) and 5T backward (`cmpe_se_fused/triton/streaming.py`), every "
                "full-size tensor covered exactly once.\n\n" + triton_table(rows))
        text += ("\n\nPer launch (training, NCHW; `small tensors`: total bytes, then per kernel argument):\n\n"
                 + triton_launch_table(rows, modes=tuple(m for m in ("se", "folded_3x3") if m in modes)))
        failures += [f"triton: {r['config']}/{r['layout']}/{r['mode']}/{r['phase']}/{r['pass']} {r['total_T']:.2f}T "
                     f"(budget {r['budget_T']}T, coverage {r['coverage']}, unknown {r['unknown_bytes']} B)"
                     for r in rows if not r["ok"]]
        if not args.quick and not args.modes:
            trows = triton_target_rows()
            text += ("\n\nSmall-tensor bytes at the targets' late stages (se, training, NCHW fp32, reduction 16, N=2; "
                     "`split3`: 3 programs per sample, the GPU default at N=128 on an H200; per sample = the pass's "
                     "small bytes / N). Every program reads the small network's weights: the forward reads fc1 and "
                     "fc2 once per sample, and fc1 again in every chunk of a split launch (each chunk recomputes "
                     "the hidden layer); the backward reads both once per sample (grad-gate or mlp-backward). "
                     "These reads grow with N and the programs per sample, so they stay at this fraction of T at "
                     "N=128 (the weight gradients dw1, dw2 are written once per pass: their share per sample "
                     "shrinks with N). On a GPU they are L2 hits (the weights are < 1 MB), not DRAM traffic, "
                     "but each program waits on them:\n\n" + triton_target_table(trows))
            failures += [f"triton: {r['net']} {r['config']} {r['pass']} {r['total_T']:.2f}T" for r in trows
                         if not r["ok"]]
        parts["triton"] = text
    text = "\n\n".join(parts[k] for k in SECTIONS if k in parts)
    print(text)
    if args.write_docs:
        write_docs(parts)
    if failures:
        print("\nBUDGETS BROKEN:\n" + "\n".join("  " + f for f in failures))
        return 1
    print("\nall budgets hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
