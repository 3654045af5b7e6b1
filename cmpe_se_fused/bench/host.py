"""Host cost of one CMPE-SE call at tiny shapes (``python -m cmpe_se_fused.bench --preset host``).

At the shapes CIFAR networks train at, the layer's kernels take microseconds and a call costs
what its Python and dispatcher path costs. This measures that path per call, beside
``nn.BatchNorm2d`` and a 1x1 ``nn.Conv2d`` (the layers it sits next to) and the three-op eager
expression ``torch.sigmoid(u) * u + x``, all in the same run: rows are interleaved (every round
times every row once, in a rotated order) and repeated; the ratios are formed within each round,
so the machine's noise cancels, and reported as the median over rounds with their spread.

Rows, per backend usable here (and per mode): module eval forward under ``no_grad`` and under
``inference_mode``, training forward, training forward+backward through the module and autograd,
the bare forward op (``torch.ops.cmpe_se.forward`` below autograd, eval: seven outputs) and, where the
install has it, the bare inference op (``torch.ops.cmpe_se.infer``: ``y`` alone, what an eval call
under ``no_grad`` replays). On a GPU the same rows
also get their CUDA-graph replay time (the device floor), so host and device time stand side by
side.

The measuring core uses only the public API (``CMPESE`` and ``torch.ops.cmpe_se.*``), so the same
file runs against an older install for a before/after table::

    python cmpe_se_fused/bench/host.py --out before/      # with that install's python
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

#: the tiny shape of issue 23 (N, C, H, W) and the modes measured
SHAPE = (2, 64, 4, 4)
MODES = {"se": {}, "folded_3x3": {"fold_width": 8}}
#: the ratios the issue sets targets for: (row, anchor row)
TARGETS = (("{b}/{m}/eval_nograd", "bn/eval_nograd"), ("{b}/{m}/train_fwdbwd", "bn/train_fwdbwd"),
           ("{b}/{m}/bare_op", "eager3/inference"), ("{b}/{m}/bare_infer", "eager3/inference"))


def _backends(device: torch.device) -> list[str]:
    """Backends that can run on ``device`` in this install (public API only)."""
    from cmpe_se_fused import dispatch
    out = []
    for name in ("cpu", "cuda", "triton", "reference"):
        be = dispatch.BACKENDS.get(name)
        if be is not None and not be.not_supported_reasons(torch.empty(1, 1, 1, 1, device=device)):
            out.append(name)
    return out


def _bare_op(layer, u, x, backend, infer=False):
    """``torch.ops.cmpe_se.<forward>`` with the layer's weights, called below autograd (eval); with
    ``infer``, ``torch.ops.cmpe_se.infer`` (the same call without the saved outputs)."""
    op = torch.ops.cmpe_se.triton_forward.default if backend == "triton" else torch.ops.cmpe_se.forward.default
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    w = lambda name: None if getattr(layer, name, None) is None else getattr(layer, name).weight.detach().to(acc)  # noqa: E731
    pair = layer.mode in ("pair_2x1", "pair_1x1", "folded_3x3")
    bn = layer.pair_bn if pair else None
    empty = u.new_empty(0, dtype=acc)
    args = (u, x, w("fc1"), w("fc1_identity") if layer.mode == "double_fc" else None, w("fc2"),
            w("pair_conv") if pair else None, bn.weight.detach() if pair else None,
            bn.bias.detach() if pair else None, bn.running_mean if pair else empty,
            bn.running_var if pair else empty, layer.mode, False, 0.1, float(bn.eps) if pair else 1e-5,
            int(layer.fold_width), int(layer.padding))
    if infer:
        op = torch.ops.cmpe_se.infer.default
        args = args[:8] + ((args[8], args[9]) if pair else (None, None)) + (layer.mode,) + args[13:]

    def run():
        with torch.inference_mode():
            return op(*args)
    return run


def _module_rows(prefix, module, inputs, grad):
    """``prefix/...`` rows of a module taking ``inputs`` (tuple): eval and training calls."""
    graded = tuple(t.detach().requires_grad_(True) for t in inputs)

    def eval_nograd():
        with torch.no_grad():
            return module(*inputs)

    def eval_inference():
        with torch.inference_mode():
            return module(*inputs)

    def train_fwd():
        return module(*graded)

    def train_fwdbwd():
        module(*graded).backward(grad)

    rows = {}
    for name, fn, train in (("eval_nograd", eval_nograd, False), ("eval_inference", eval_inference, False),
                            ("train_fwd", train_fwd, True), ("train_fwdbwd", train_fwdbwd, True)):
        rows[f"{prefix}/{name}"] = (fn, module, train)
    return rows


def build_rows(device: torch.device, dtype=torch.float32, backends=None) -> dict:
    """Row name -> (callable, module or None, training flag)."""
    from cmpe_se_fused import CMPESE
    torch.manual_seed(0)
    n, c, h, w = SHAPE
    u = torch.randn(SHAPE, device=device, dtype=dtype)
    x = torch.randn(SHAPE, device=device, dtype=dtype)
    g = torch.randn(SHAPE, device=device, dtype=dtype)
    rows = {}
    rows.update(_module_rows("bn", nn.BatchNorm2d(c).to(device, dtype), (u,), g))
    rows.update(_module_rows("conv1x1", nn.Conv2d(c, c, 1, bias=False).to(device, dtype), (u,), g))

    def eager3():
        with torch.no_grad():
            return torch.sigmoid(u) * u + x
    def eager3_inference():
        with torch.inference_mode():
            return torch.sigmoid(u) * u + x
    rows["eager3/nograd"] = (eager3, None, False)
    rows["eager3/inference"] = (eager3_inference, None, False)
    for backend in backends if backends is not None else _backends(device):
        for mode, kw in MODES.items():
            layer = CMPESE(c, mode=mode, backend=backend, **kw).to(device, dtype)
            rows.update(_module_rows(f"{backend}/{mode}", layer, (u, x), g))
            if backend != "reference":
                rows[f"{backend}/{mode}/bare_op"] = (_bare_op(layer, u, x, backend), None, False)
            if backend in ("cpu", "cuda") and hasattr(torch.ops.cmpe_se, "infer"):
                rows[f"{backend}/{mode}/bare_infer"] = (_bare_op(layer, u, x, backend, infer=True), None, False)
    return rows


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calibrate(fn, device, block_s):
    """Calls per timed block so that a block takes about ``block_s``."""
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        _sync(device)
        dt = time.perf_counter() - t0
        if dt >= block_s / 4 or number >= 1 << 16:
            return max(1, int(number * block_s / max(dt, 1e-9)))
        number *= 4


def _time_block(fn, device, number):
    """(wall, thread CPU) seconds per call over ``number`` calls. The thread's CPU time leaves out
    the time the scheduler gave other processes (a busy machine); with one intra-op thread on CPU
    it is the host cost itself."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(number):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / number, (time.thread_time() - c0) / number


def _graph_replay_us(fn, device, number=200):
    """Per-call device time of ``fn`` replayed as a CUDA graph (None when it cannot be captured)."""
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) * 1000.0 / number
    except Exception as exc:  # noqa: BLE001 - capture of a row that cannot be graphed: say why
        print(f"[host] CUDA graph of a row failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def measure(rows: dict, device: torch.device, rounds: int = 5, blocks: int = 30, block_s: float = 0.001) -> dict:
    """Interleaved, repeated per-call times. Returns row -> list of per-round (wall, CPU) times
    (seconds): the minimum over the round's blocks, the least disturbed estimate of the cost on a
    shared machine (other processes only ever add time)."""
    names = list(rows)
    numbers = {}
    for name in names:
        fn, module, train = rows[name]
        if module is not None:
            module.train(train)
        for _ in range(3):
            fn()
        numbers[name] = _calibrate(fn, device, block_s)
    per_round = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotated: no row is always first
        for name in order:
            fn, module, train = rows[name]
            if module is not None:
                module.train(train)
            times = [_time_block(fn, device, numbers[name]) for _ in range(blocks)]
            per_round[name].append((min(t[0] for t in times), min(t[1] for t in times)))
    return per_round


def summarize(per_round: dict, backends, graphs=None, clock=1) -> dict:
    """Per row: median/min/max over rounds of the per-call time on ``clock`` (0 wall, 1 thread CPU)
    and the wall median; ratios to the anchors formed within each round."""
    rows = []
    for name, times in per_round.items():
        us = [t[clock] * 1e6 for t in times]
        rows.append({"row": name, "median_us": statistics.median(us), "min_us": min(us), "max_us": max(us),
                     "spread": max(us) / min(us) - 1.0, "wall_median_us": statistics.median(t[0] * 1e6 for t in times),
                     "graph_us": (graphs or {}).get(name)})
    ratios = []
    for backend in backends:
        for mode in MODES:
            for row_t, anchor in TARGETS:
                row = row_t.format(b=backend, m=mode)
                if row not in per_round:
                    continue
                r = [a[clock] / b[clock] for a, b in zip(per_round[row], per_round[anchor])]
                ratios.append({"row": row, "anchor": anchor, "median": statistics.median(r), "min": min(r),
                               "max": max(r)})
    return {"rows": rows, "ratios": ratios}


def to_markdown(result: dict) -> str:
    env = result["env"]
    out = [f"# host cost per call, shape {tuple(env['shape'])} {env['dtype']}, {env['device']}, "
           f"{env['threads']} thread(s)", "",
           f"{env['rounds']} interleaved rounds x {env['blocks']} blocks (min per round, then median/min/max "
           f"over rounds); clock: {env['clock']}; load average before {env['load_before']}, after "
           f"{env['load_after']}; package {env['package']}", "",
           "| row | median us | min us | max us | spread | wall median us | CUDA-graph us |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        g = "-" if r["graph_us"] is None else f"{r['graph_us']:.1f}"
        out.append(f"| {r['row']} | {r['median_us']:.1f} | {r['min_us']:.1f} | {r['max_us']:.1f} | "
                   f"{100 * r['spread']:.0f}% | {r['wall_median_us']:.1f} | {g} |")
    out += ["", "| ratio | median | min | max | target |", "|---|---:|---:|---:|---:|"]
    for r in result["ratios"]:
        out.append(f"| {r['row']} / {r['anchor']} | {r['median']:.2f}x | {r['min']:.2f}x | {r['max']:.2f}x | 1.5x |")
    return "\n".join(out) + "\n"


def _loadavg():
    """The 1, 5 and 15 minute load averages as /proc/loadavg writes them (None where there is none)."""
    return [f"{v:.2f}" for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def run(device="cpu", threads=1, rounds=5, blocks=30, block_s=0.001, out=None, backends=None) -> dict:
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    import cmpe_se_fused
    rows = build_rows(device, backends=backends)
    used = sorted({name.split("/")[0] for name in rows} - {"bn", "conv1x1", "eager3"})
    load_before = _loadavg()
    per_round = measure(rows, device, rounds, blocks, block_s)
    load_after = _loadavg()
    graphs = None
    if device.type == "cuda":
        graphs = {}
        for name, (fn, module, train) in rows.items():
            if module is not None:
                module.train(train)
            graphs[name] = _graph_replay_us(fn, device)
    clock = 1 if device.type == "cpu" else 0  # on a GPU the host waits for the device: wall time
    result = summarize(per_round, used, graphs, clock)
    result["env"] = {"shape": list(SHAPE), "dtype": "float32", "device": str(device),
                     "threads": torch.get_num_threads(), "rounds": rounds, "blocks": blocks,
                     "clock": "thread CPU time" if clock else "wall (perf_counter, synchronized)",
                     "load_before": load_before, "load_after": load_after, "torch": torch.__version__,
                     "package": os.path.dirname(cmpe_se_fused.__file__), "backends": used}
    result["preset"] = "host"
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "host.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(out, "host.md"), "w") as f:
            f.write(to_markdown(result))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cmpe_se_fused.bench --preset host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="host", choices=["host"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--blocks", type=int, default=30)
    p.add_argument("--block-ms", type=float, default=1.0)
    p.add_argument("--providers", help="comma list of backends (default: every usable one)")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    backends = [b.strip() for b in args.providers.split(",")] if args.providers else None
    result = run(args.device, args.threads, args.rounds, args.blocks, args.block_ms / 1000, args.out, backends)
    print(to_markdown(result))
    print(f"[bench] wrote {args.out}/host.json, host.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
