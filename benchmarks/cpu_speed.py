"""CPU speed of the fused op against the eager reference and torch.compile of the reference.

    python benchmarks/cpu_speed.py                       # all shapes, se + folded_3x3, train + eval
    python benchmarks/cpu_speed.py --no-compile --stages wrn1,r164-3 --modes se

Shapes (batch 32, fp32, contiguous NCHW by default): WRN-16-8 stages C = 128, 256, 512 at 32, 16, 8
pixels (fold width: the divisor of C nearest C/10, as ``models.networks.wrn_fold_width``: 16, 32, 64)
and pre-act ResNet-164 stages C = 64, 128, 256 at 32, 16, 8 (fold width 16); pair filters e = C/16,
reduction 16. Phases: ``fwd`` (the forward op) and ``fwd+bwd`` (forward then backward: the fused
ops called directly; the reference through PyTorch autograd with u, x and every weight requiring
grad). Times are ``torch.utils.benchmark`` medians (the smallest of ``--repeat`` interleaved ones). ``floor`` is the SPEC section 3 time floor:
minimum bytes (fwd 3T, fwd+bwd 7T) over the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import platform

import cmpe_se_fused._C  # noqa: F401  (torch.ops.cmpe_se.forward / backward on CPU)
import torch
from torch.utils import benchmark

from cmpe_se_fused.reference import cmpe_se_reference, relation_dim

STAGES = {  # name: (C, H=W, fold_width)
    "wrn1": (128, 32, 16), "wrn2": (256, 16, 32), "wrn3": (512, 8, 64),
    "r164-1": (64, 32, 16), "r164-2": (128, 16, 16), "r164-3": (256, 8, 16),
}


def make_case(mode, stage, training, batch=32, dtype=torch.float32, channels_last=False, seed=0):
    c, h, fold = STAGES[stage]
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)
    r = e = max(1, c // 16)
    dz = relation_dim(mode, c, fold, 0)
    u, x = rnd(batch, c, h, h).to(dtype), rnd(batch, c, h, h).to(dtype)
    if channels_last:
        u, x = u.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    w = {"fc1_weight": rnd(r, dz) / dz ** 0.5, "fc2_weight": rnd(c, r) / r ** 0.5}
    pair = mode != "se"
    if pair:
        w.update(pair_weight=rnd(e, 1, 3, 3) / 3, bn_weight=1 + 0.1 * rnd(e), bn_bias=0.1 * rnd(e))
    stats = (torch.zeros(e), torch.ones(e)) if pair else (torch.zeros(0), torch.zeros(0))
    kw = {"mode": mode, "training": training, "momentum": 0.1, "eps": 1e-5, "fold_width": fold, "padding": 0}
    gy = rnd(batch, c, h, h).to(dtype).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return u, x, w, stats, kw, gy


def fused_fns(u, x, w, stats, kw, gy):
    args = (u, x, w["fc1_weight"], None, w["fc2_weight"], w.get("pair_weight"), w.get("bn_weight"),
            w.get("bn_bias"), stats[0], stats[1], kw["mode"], kw["training"], kw["momentum"], kw["eps"],
            kw["fold_width"], kw["padding"])

    def fwd():
        return torch.ops.cmpe_se.forward(*args)

    def fwd_bwd():
        out = torch.ops.cmpe_se.forward(*args)
        return torch.ops.cmpe_se.backward(gy, u, *out[1:7], args[2], None, args[4], args[5], args[6], args[7],
                                          kw["mode"], kw["training"], kw["fold_width"], kw["padding"])
    return fwd, fwd_bwd


def reference_fns(u, x, w, stats, kw, gy, compiled=False):
    fn = cmpe_se_reference
    if compiled:
        # one compiled graph per case and grad mode: reset so that dynamo's recompile limit (8 per
        # code object) never sends a later case back to eager
        torch._dynamo.reset()
        fn = torch.compile(cmpe_se_reference, dynamic=False)
    leaves = [t.detach().clone().requires_grad_(True) for t in (u, x, *w.values())]

    def call(tensors):
        ui, xi, *ws = tensors
        named = dict(zip(w.keys(), ws))
        return fn(ui, xi, named["fc1_weight"], named["fc2_weight"], None, named.get("pair_weight"),
                  named.get("bn_weight"), named.get("bn_bias"), stats[0], stats[1], **kw)

    def fwd():
        with torch.no_grad():
            return call([u, x, *w.values()])

    def fwd_bwd():
        y = call(leaves)
        y.backward(gy)
        return y
    return fwd, fwd_bwd


def median(fn, min_run_time):
    fn()  # warm-up (and compilation)
    # torch.utils.benchmark.Timer runs with ONE thread unless told otherwise
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def medians(fns, min_run_time, repeat):
    """The smallest of ``repeat`` medians per function, the functions measured in turn (interleaved),
    so that a burst of load from other processes on a shared machine hits one median, not the result."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            if fn is not None:
                best[i] = min(best[i], median(fn, min_run_time))
    return best


def copy_bandwidth(nbytes=64 << 20):
    a = torch.empty(nbytes // 4)
    a.normal_()
    b = torch.empty_like(a)
    t = median(lambda: b.copy_(a), 0.5)
    return 2 * nbytes / t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="se,folded_3x3")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--phases", default="fwd,fwd+bwd")
    ap.add_argument("--train", default="1,0", help="1 = training, 0 = eval (comma list)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on CPU)")
    ap.add_argument("--min-run-time", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (default: torch's default)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved medians per case; the smallest is kept")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, fp32, batch {args.batch}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}; copy bandwidth {bw / 1e9:.1f} GB/s")
    print(f"# times: min of {args.repeat} interleaved medians, ms; 'vs eager' / 'vs compile' = baseline time / "
          "fused time; 'floor' = fused time / (minimum bytes / copy bandwidth)")
    hdr = f"{'mode':10s} {'stage':7s} {'train':5s} {'phase':8s} {'fused':>8s} {'eager':>8s} {'compile':>8s} " \
          f"{'vs eager':>8s} {'vs comp':>8s} {'floor':>6s}"
    print(hdr)
    for mode in args.modes.split(","):
        for stage in args.stages.split(","):
            for training in [bool(int(t)) for t in args.train.split(",")]:
                case = make_case(mode, stage, training, args.batch, channels_last=args.channels_last)
                fused = dict(zip(("fwd", "fwd+bwd"), fused_fns(*case)))
                eager = dict(zip(("fwd", "fwd+bwd"), reference_fns(*case)))
                comp = None if args.no_compile else dict(zip(("fwd", "fwd+bwd"), reference_fns(*case, compiled=True)))
                tbytes = case[0].numel() * case[0].element_size()
                for phase in args.phases.split(","):
                    tf, te, tc = medians([fused[phase], eager[phase], comp[phase] if comp else None],
                                         args.min_run_time, args.repeat)
                    tc = float("nan") if comp is None else tc
                    floor = (3 if phase == "fwd" else 7) * tbytes / bw
                    print(f"{mode:10s} {stage:7s} {int(training):5d} {phase:8s} {tf * 1e3:8.3f} {te * 1e3:8.3f} "
                          f"{tc * 1e3:8.3f} {te / tf:8.2f} {tc / tf:8.2f} {tf / floor:6.2f}", flush=True)


if __name__ == "__main__":
    main()
