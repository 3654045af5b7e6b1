"""``python -m cmpe_se_fused.bench``: time the CMPE-SE layer on every provider against the
bandwidth floor. See ``benchmarks/README.md``.

Examples::

    python -m cmpe_se_fused.bench                                 # quick preset, ~1 min on CPU
    python -m cmpe_se_fused.bench --preset gpu --out results/     # what gpu_check.sh runs
    python -m cmpe_se_fused.bench --preset wrn28-10 --modes all --dtypes bf16 --passes fwd
    python -m cmpe_se_fused.bench --compare old/bench.json        # flag rows > 10% slower
    python -m cmpe_se_fused.bench --preset host                   # host cost per call (bench/host.py)
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import variants
from .config import ALL_MODES, DTYPES, LAYOUTS, PASSES, PRESETS, make_cases, parse_list
from .providers import KNOWN_PROVIDERS, check_provider_name, default_providers
from .report import print_console
from .runner import Options, Runner


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _device(text: str) -> str:
    try:
        dev = torch.device(text)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:INDEX, got {text!r}")
    return text


def _json_file(path: str) -> str:
    """The path of a readable bench.json (read again, for real, by options_from_args); ``""``: none
    (child processes of variants get ``--compare=``)."""
    if not path:
        return path
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{path!r} is not a JSON file: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise argparse.ArgumentTypeError(f"{path!r} is not a bench.json written by this benchmark (no 'rows')")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cmpe_se_fused.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS) + ["host"],
                   help="shapes and default axes: " + "; ".join(f"{k}: {v.doc}" for k, v in PRESETS.items())
                   + "; host: the host cost per call at a tiny shape, its own options (--preset host --help)")
    p.add_argument("--modes", help=f"comma list of {list(ALL_MODES)} or 'all' (default se,folded_3x3)")
    p.add_argument("--dtypes", help=f"comma list of {list(DTYPES)} (default: the preset's for the device)")
    p.add_argument("--layouts", help="comma list of nchw,cl (channels_last)")
    p.add_argument("--train", action="store_true", help="training mode only (with --eval: both, the default)")
    p.add_argument("--eval", action="store_true", help="evaluation mode only")
    p.add_argument("--passes", help="comma list of fwd,bwd,fwdbwd (default all)")
    p.add_argument("--providers", help=f"comma list of {list(KNOWN_PROVIDERS)}, triton@VARIANT, cuda@VARIANT "
                   "or 'all' (default: all for the device, plus launch variants in the gpu preset)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                   help="add a launch variant provider, e.g. triton@bp64:block_p=64 or "
                   "cuda@s4:CMPE_SE_CUDA_SPLITS=4 (then name it in --providers, or use the gpu preset / 'all')")
    p.add_argument("--as-variant", help=argparse.SUPPRESS)
    p.add_argument("--copy-gbps", type=float, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=_positive_int, help="override N of every shape")
    p.add_argument("--device", type=_device, help="cpu or cuda (default cuda when available)")
    p.add_argument("--threads", type=_positive_int,
                   help="CPU intra-op threads (torch.set_num_threads; default torch's)")
    p.add_argument("--out", default="bench_out", help="output folder for bench.json, bench.md, bench.png")
    p.add_argument("--e2e", action="store_true", default=None, help="add the end-to-end training-step rows")
    p.add_argument("--no-e2e", dest="e2e", action="store_false", help="no end-to-end rows")
    p.add_argument("--e2e-batch", type=_positive_int, help="end-to-end batch of every net "
                   "(default: the preset's per net, else 128 on GPU, 8 on CPU)")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="no CUDA-graph replay timings")
    p.add_argument("--graph-threshold-us", type=float, default=200.0,
                   help="also time CUDA-graph replays for rows faster than this (default 200)")
    p.add_argument("--compile-all", action="store_true", help="run torch.compile on every case (presets limit it)")
    p.add_argument("--budget-s", type=float, help="soft time budget in seconds (default: the preset's)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="no bench.png")
    p.add_argument("--compare", metavar="OLD.json", type=_json_file,
                   help="flag rows more than --threshold slower than OLD.json (a bench.json)")
    p.add_argument("--threshold", type=float, default=0.10, help="regression threshold for --compare (0.10)")
    p.add_argument("--fail-on-regression", action="store_true", help="exit 3 when --compare finds regressions")
    p.add_argument("--repeats", type=_positive_int, default=3,
                   help="interleaved rounds per row: every provider of a row once per round, the order rotated; "
                   "rows whose rounds disagree or whose order flips are flagged (default 3)")
    p.add_argument("--list", action="store_true", help="print the cases and providers, run nothing")
    return p


def options_from_args(args, argv=None) -> Options:
    preset = PRESETS[args.preset]
    for spec in args.variant:
        variants.register(spec)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    modes = parse_list(args.modes, ALL_MODES, "modes", preset.modes)
    dtypes = parse_list(args.dtypes, tuple(DTYPES), "dtypes", preset.dtypes.get(device.type, ("fp32",)))
    layouts = parse_list(args.layouts, LAYOUTS, "layouts", preset.layouts)
    phases = ("train",) if args.train and not args.eval else ("eval",) if args.eval and not args.train \
        else preset.phases
    passes = parse_list(args.passes, PASSES, "passes", preset.passes)
    if args.providers is None and preset.providers and device.type == "cuda":
        providers = preset.providers
    elif args.providers in (None, "all"):
        providers = default_providers(device, with_variants=preset.name == "gpu" or args.providers == "all")
    else:
        providers = tuple(dict.fromkeys(t.strip() for t in args.providers.split(",") if t.strip()))
        for name in providers:
            check_provider_name(name)
    shapes = [s.with_batch(args.batch) if args.batch else s for s in preset.shapes]
    e2e = preset.e2e if args.e2e is None else args.e2e
    compare = None
    if args.compare:
        with open(args.compare) as f:
            compare = json.load(f)
    return Options(
        preset=preset, device=device, cases=make_cases(shapes, modes, dtypes, layouts, phases), passes=passes,
        providers=providers, out=args.out, e2e=e2e,
        e2e_modes=tuple(m for m in (preset.e2e_modes or modes) if m in ALL_MODES),
        e2e_dtypes=tuple(d for d in (preset.e2e_dtypes or dtypes) if device.type == "cuda" or d in dtypes),
        e2e_batch=args.e2e_batch or (128 if device.type == "cuda" else 8), graphs=args.graphs,
        e2e_batches=(args.e2e_batch,) if args.e2e_batch else (),
        graph_threshold_us=args.graph_threshold_us,
        budget_s=args.budget_s if args.budget_s is not None else preset.budget_s,
        quick_timing=preset.name in ("quick", "gpu", "targets"), plot=args.plot, compare=compare,
        compare_path=args.compare, threshold=args.threshold, compile_all=args.compile_all,
        argv=list(argv if argv is not None else sys.argv[1:]), as_variant=args.as_variant,
        copy_gbps=args.copy_gbps, e2e_asked=bool(args.e2e), repeats=args.repeats)


def _host_preset(argv) -> bool:
    return any(a == "--preset=host" or (a == "--preset" and nxt == "host") for a, nxt in zip(argv, argv[1:] + [""]))


def main(argv=None) -> int:
    argv_list = sys.argv[1:] if argv is None else list(argv)
    if _host_preset(argv_list):  # its own rows and options (bench/host.py)
        from . import host
        return host.main(argv_list)
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        opts = options_from_args(args, argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for c in opts.cases:
            print(f"{c.shape.label:16s} {c.shape.dims:18s} m={c.shape.fold_width:<3d} e={c.shape.pair_filters:<3d} "
                  f"{c.mode:11s} {c.dtype} {c.layout:4s} {c.phase}")
        plan = Runner(opts).e2e_plan() if opts.e2e else []
        print(f"{len(opts.cases)} cases x passes {','.join(opts.passes)}; providers {','.join(opts.providers)}; "
              f"e2e {'on: ' + ', '.join(n for n, _ in plan) if plan else 'off'}")
        for net, why in Runner(opts).e2e_left_out().items():
            print(f"e2e rows of {net} left out: {why}; add them with --e2e")
        return 0
    runner = Runner(opts)
    result = runner.run()
    print_console(result)
    print(f"[bench] wrote {opts.out}/" + ", ".join(runner.written), file=sys.stderr)
    if runner.plot_note:
        print(f"[bench] {runner.plot_note}", file=sys.stderr)
    if args.fail_on_regression and result.get("compare", {}).get("regressions"):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
