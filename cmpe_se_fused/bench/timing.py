"""Timers. Every timer takes ``fn(i)``, a call on input copy ``i``, and rotates the copies so that
the working set of repeated calls exceeds the last-level cache (GPU L2, CPU L3): a kernel that
streams 3T bytes must not be timed on data left in cache by the previous call.

* GPU: ``triton.testing.do_bench``-style medians (a CUDA event pair around every call, warm-up
  first); for microsecond kernels also CUDA-graph replays, which remove the launch overhead.
* CPU: medians of calibrated blocks of calls (``blocked_autorange``-style), on every intra-op thread.
"""
from __future__ import annotations

import gc
import glob
import itertools
import math
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_us: float
    reps: int
    iqr_us: float | None = None


def cache_bytes(device: torch.device) -> int:
    """Bytes of the last-level cache that rotation must defeat (GPU L2, CPU L3)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 << 20)
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 << 20)


def rotation_copies(bytes_per_copy: int, device: torch.device, max_copies: int = 64) -> int:
    """How many input copies make the rotated working set (U, X, dY) at least three times the GPU
    L2 (twice the CPU last-level cache), and at least 2."""
    target = max(3 * cache_bytes(device), (128 << 20)) if device.type == "cuda" else max(2 * cache_bytes(device),
                                                                                          64 << 20)
    return int(min(max_copies, max(2, math.ceil(target / max(1, bytes_per_copy)))))


def _iqr(xs):
    if len(xs) < 4:
        return None
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def time_cuda(fn, n_copies: int, warmup_ms: float = 10.0, rep_ms: float = 40.0, min_reps: int = 10,
              max_reps: int = 1000) -> Timing:
    """Median of per-call CUDA-event times (microseconds), do_bench style."""
    def ev():
        return torch.cuda.Event(enable_timing=True)

    fn(0)
    torch.cuda.synchronize()
    start, end = ev(), ev()
    start.record()
    for i in range(5):
        fn(i % n_copies)
    end.record()
    torch.cuda.synchronize()
    est_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for i in range(max(1, int(warmup_ms / est_ms))):
        fn(i % n_copies)
    reps = int(min(max_reps, max(min_reps, rep_ms / est_ms)))
    starts, ends = [ev() for _ in range(reps)], [ev() for _ in range(reps)]
    for j in range(reps):
        starts[j].record()
        fn(j % n_copies)
        ends[j].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    return Timing(statistics.median(times), reps, _iqr(times))


def time_cuda_graph(fn, n_copies: int, prepare=None, replays: int = 20) -> Timing:
    """Per-call time of a CUDA graph that holds one call per input copy, replayed ``replays``
    times (median over replays, divided by ``n_copies``). ``prepare()`` runs on the capture
    stream first (the bwd pass builds its autograd graphs there, so the backward is captured).
    Raises when capture is not possible; the caller records the reason."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream):
            if prepare is not None:
                prepare()
            for _ in range(2):
                for i in range(n_copies):
                    fn(i)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for i in range(n_copies):
                fn(i)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(replays)]
        for s, e in pairs:
            s.record()
            graph.replay()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) * 1e3 / n_copies for s, e in pairs]
        return Timing(statistics.median(times), replays * n_copies, _iqr(times))
    finally:
        del graph
        torch.cuda.synchronize()


def time_cpu(fn, n_copies: int, min_run_time: float = 0.2, block_s: float = 2e-3) -> Timing:
    """Median per-call time (microseconds) of blocks of calls on all intra-op threads, in the
    manner of ``torch.utils.benchmark``'s ``blocked_autorange``: the calls per block are calibrated
    (doubling, which also warms up) until a block takes ``block_s``, then blocks run until
    ``min_run_time`` has passed and at least 3 were timed. Its own loop, not torch's Timer: that
    one re-calibrates on every call (costly in interleaved rounds), and importing
    ``torch.utils.benchmark`` logs torch's CUDA_HOME guess on machines with nvcc and no GPU."""
    counter = itertools.count()

    def block(number):
        t0 = time.perf_counter()
        for _ in range(number):
            fn(next(counter) % n_copies)
        return time.perf_counter() - t0

    block(1)
    number = 1
    while (dt := block(number)) < block_s and number < (1 << 20):
        number = max(2 * number, int(number * block_s / max(dt, 1e-9)))
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_run_time:
        times.append(block(number) / number * 1e6)
    return Timing(statistics.median(times), len(times) * number, _iqr(times))


def time_fn(fn, n_copies: int, device: torch.device, quick: bool = False, cpu_min_time: float | None = None,
            share: float = 1.0) -> Timing:
    """One timing of ``fn``; ``share`` of the usual repetition time (a row's round: the runner times
    every provider in several interleaved rounds, which together take the usual time)."""
    if device.type == "cuda":
        return time_cuda(fn, n_copies, warmup_ms=5.0 if quick else 10.0, rep_ms=(20.0 if quick else 40.0) * share)
    return time_cpu(fn, n_copies, min_run_time=(cpu_min_time or (0.1 if quick else 0.3)) * share)


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> dict:
    """Bytes read + written per second of a large device-to-device copy (GPU) or memcpy (CPU,
    ``Tensor.copy_`` on every intra-op thread): the denominator of every floor in the run."""
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (256 << 20))
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bufs = [src, dst]

    def fn(_i):
        bufs[1].copy_(bufs[0])

    t = time_cuda(fn, 1, rep_ms=100.0) if device.type == "cuda" else time_cpu(fn, 1, min_run_time=0.5)
    bufs.clear()
    return {"bytes": nbytes, "median_us": t.median_us, "GBps": 2 * nbytes / (t.median_us * 1e-6) / 1e9,
            "method": "cuda device-to-device copy_" if device.type == "cuda"
            else f"Tensor.copy_ on {torch.get_num_threads()} threads"}


def peak_memory_mb(fn, device: torch.device) -> float | None:
    """Peak bytes allocated by one ``fn(0)`` beyond what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(0)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
