"""Output: ``bench.json`` (every row + where it came from), ``bench.md``, a console table (rich if
installed, else plain text) and ``bench.png`` (matplotlib if installed).

Tables pivot the layer rows: one line per (shape, mode, dtype, layout, phase, pass), one column per
provider holding ``time  speedup-vs-eager  fraction-of-floor``.
"""
from __future__ import annotations

import json
import os

from .config import ALL_MODES, DTYPES, LAYOUTS, PASSES, PHASES
from .metrics import BASELINE, FLOOR_T, geomean, median

SCHEMA_VERSION = "cmpe_se_fused.bench/1"


def fmt_us(us) -> str:
    if us is None:
        return "-"
    if us >= 1e5:
        return f"{us / 1e3:.0f}ms"
    if us >= 1e4:
        return f"{us / 1e3:.1f}ms"
    return f"{us:.3g}us" if us < 100 else f"{us:.0f}us"


def fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def fmt_pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def providers_of(rows, kind="layer") -> list[str]:
    seen = []
    for r in rows:
        if r["kind"] == kind and r["provider"] not in seen:
            seen.append(r["provider"])
    return sorted(seen, key=lambda p: (p != BASELINE, p != "plain", not p.startswith("compile"), p))


def fmt_spread(r) -> str | None:
    """``+-N%``: half the range of the row's rounds over their median (None: one round)."""
    reps = r.get("rep_us") or []
    if len(reps) < 2 or not r.get("median_us"):
        return None
    return f"\u00b1{50 * (max(reps) - min(reps)) / r['median_us']:.0f}%"


def fmt_flags(r) -> str | None:
    """``[busy,unstable,flip]``: the row's flags (None: none)."""
    return "[" + ",".join(r["flags"]) + "]" if r.get("flags") else None


def _cell(r) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return "skip" if r["status"] == "skipped" else "ERROR"
    parts = [fmt_us(r["median_us"]), fmt_spread(r)]
    if r.get("graph_us") is not None:
        parts.append(f"(graph {fmt_us(r['graph_us'])})")
    if r["provider"] != BASELINE:
        parts.append(fmt_x(r["speedup_vs_eager"]))
    parts.append(fmt_pct(r.get("frac_floor")))
    if r.get("err_vs_eager") is not None and r.get("check") == "MISMATCH":
        parts.append("MISMATCH")
    parts.append(fmt_flags(r))
    return " ".join(p for p in parts if p)


def layer_table(rows) -> tuple[list[str], list[list[str]]]:
    """Header and lines of the pivoted layer table."""
    layer = [r for r in rows if r["kind"] == "layer"]
    provs = [p for p in providers_of(layer) if any(r["provider"] == p and r["status"] == "ok" for r in layer)]
    groups: dict[tuple, dict] = {}
    for r in layer:
        g = (f"{r['net']}/{r['stage']}", f"{r['N']}x{r['C']}x{r['H']}x{r['W']}", r["mode"], r["dtype"], r["layout"],
             r["phase"], r["pass"])
        groups.setdefault(g, {"floor": r["floor_us"]})[r["provider"]] = r
    header = ["shape", "NxCxHxW", "mode", "dtype", "layout", "phase", "pass", "floor"] + provs
    lines = []
    for g, cells in sorted(groups.items(), key=lambda kv: _group_order(kv[1])):
        if not any(isinstance(c, dict) and c.get("status") == "ok" for c in cells.values()):
            continue
        lines.append(list(g) + [fmt_us(cells["floor"])] + [_cell(cells.get(p)) for p in provs])
    return header, lines


def _group_order(cells):
    r = next(c for c in cells.values() if isinstance(c, dict))

    def idx(seq, v):
        return list(seq).index(v) if v in seq else len(seq)

    return (r["net"], r["N"], r["stage"], idx(ALL_MODES, r["mode"]), idx(list(DTYPES), r["dtype"]),
            idx(LAYOUTS, r["layout"]), idx(PHASES, r["phase"]), idx(PASSES, r["pass"]))


def e2e_table(rows) -> tuple[list[str], list[list[str]]]:
    """One line per e2e row; the peak-memory column only where memory was measured (GPU)."""
    e2e = [r for r in rows if r["kind"] == "e2e" and r["status"] != "skipped"]
    with_mem = any(r.get("peak_mem_mb") is not None for r in e2e)
    header = ["net", "N", "se_mode", "dtype", "layout", "provider", "step", "img/s", "vs plain", "vs eager"]
    header += ["peak MB"] if with_mem else []
    lines = []
    for r in e2e:
        ok = r["status"] == "ok"
        step = " ".join(p for p in (fmt_us(r["median_us"]), fmt_spread(r), fmt_flags(r)) if p) if ok else "ERROR"
        lines.append([r["net"], str(r["N"]), r["se_mode"], r["dtype"], r["layout"], r["provider"], step,
                      f"{r['images_per_s']:.3g}" if ok else "-",
                      "-" if r.get("overhead_vs_plain") is None else f"{100 * r['overhead_vs_plain']:+.1f}%",
                      fmt_x(r.get("speedup_vs_eager"))]
                     + (["-" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}"] if with_mem else []))
    return header, lines


def summary_table(rows) -> tuple[list[str], list[list[str]]]:
    """Per provider and pass: geomean speedups, median fraction of floor, rows measured and rows
    flagged (bench.stability). The memory column only where memory was measured (GPU)."""
    layer = [r for r in rows if r["kind"] == "layer" and r["status"] == "ok"]
    with_mem = any(r.get("mem_vs_eager") is not None for r in layer)
    header = ["provider", "pass", "rows", "flagged", "geomean vs eager", "geomean vs compile", "median % floor",
              "best % floor"] + (["median mem vs eager"] if with_mem else [])
    lines = []
    for p in providers_of(layer):
        for ps in FLOOR_T:
            sel = [r for r in layer if r["provider"] == p and r["pass"] == ps]
            if not sel:
                continue
            fr = [r["frac_floor"] for r in sel if r["frac_floor"] is not None]
            lines.append([p, ps, str(len(sel)), str(sum(bool(r.get("flags")) for r in sel)),
                          fmt_x(geomean(r["speedup_vs_eager"] for r in sel)),
                          fmt_x(geomean(r["speedup_vs_compile"] for r in sel)), fmt_pct(median(fr)),
                          fmt_pct(max(fr) if fr else None)]
                         + ([fmt_x(median(r["mem_vs_eager"] for r in sel))] if with_mem else []))
    return header, lines


def trust_lines(result) -> list[str]:
    """The run's trust statement and how the load was watched: the first thing bench.md says."""
    trust, load = result.get("trust") or {}, result["meta"].get("load") or {}
    out = [f"**{trust['statement']}**"] if trust.get("statement") else []
    if load.get("monitored"):
        out.append(f"Load watched throughout ({load['samples']} samples): other runnable tasks mean "
                   f"{load['mean_other']}, max {load['max_other']} on {load['cores']} cores with "
                   f"{load['threads']} bench threads; rows with more than {load['limit']} on average are "
                   f"flagged busy. Each row: {result['meta'].get('repeats')} interleaved rounds.")
    return out


def variants_table(rows) -> tuple[list[str], list[list[str]]]:
    """Launch variants against their backend's default launch, per pass: geomean of
    default time / variant time (> 1: the variant is faster), and its range."""
    header = ["variant", "pass", "rows", "geomean vs default", "min", "max"]
    layer = [r for r in rows if r["kind"] == "layer" and r["status"] == "ok" and r.get("speedup_vs_default")]
    lines = []
    for p in providers_of(layer):
        for ps in FLOOR_T:
            v = [r["speedup_vs_default"] for r in layer if r["provider"] == p and r["pass"] == ps]
            if v:
                lines.append([p, ps, str(len(v)), fmt_x(geomean(v)), fmt_x(min(v)), fmt_x(max(v))])
    return header, lines


def skipped_lines(rows) -> list[str]:
    """One line per distinct (provider, reason) of skipped or failed rows, with a count."""
    counts: dict[tuple, int] = {}
    for r in rows:
        if r["status"] != "ok":
            k = (r["kind"], r["provider"], r["status"], r.get("reason") or "")
            counts[k] = counts.get(k, 0) + 1
    return [f"{kind} {prov} {status} x{n}: {reason}" for (kind, prov, status, reason), n in sorted(counts.items())]


def markdown_table(header, lines) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in lines]
    return "\n".join(out)


def _header_text(result) -> list[str]:
    m = result["meta"]
    dev, ver, git, bw = m["device"], m["versions"], m["git"], m["copy_bandwidth"]
    return [f"device: {dev['name']} ({dev['type']})",
            f"torch {ver['torch']}, triton {ver['triton']}, CUDA {ver['cuda']}, python {ver['python']}",
            (f"commit {git['short']}{' (dirty)' if git.get('dirty') else ''}, kernel hash "
            f"{(m['kernel_hash'] or 'n/a')[:16]}"),
            (f"preset {m['preset']}, copy bandwidth {bw['GBps']:.1f} GB/s ({bw['method']}, "
            f"{bw['bytes'] >> 20} MiB), run took {m.get('duration_s', 0):.0f} s")]


def write_markdown(result, path):
    trust = trust_lines(result)
    parts = ["# cmpe_se_fused benchmark", "", *[t + "\n" for t in trust],
             *[f"- {t}" for t in _header_text(result)], "",
             ("Cells: median time over the row's rounds, \u00b1 half their range, CUDA-graph replay time per "
              "call where measured, speedup over eager (same run), fraction of the bandwidth floor (fwd 3T, "
              "bwd 4T, fwd+bwd 7T at the measured copy bandwidth), flags: [busy] the machine was busy, "
              "[unstable] the rounds disagree, [flip] the order against another provider flips between "
              "rounds. `floor` is that time."), ""]
    h, lines = summary_table(result["rows"])
    if lines:
        parts += ["## Summary", "", markdown_table(h, lines), ""]
    h, lines = layer_table(result["rows"])
    parts += ["## Layer", "", markdown_table(h, lines), ""]
    h, lines = variants_table(result["rows"])
    if lines:
        parts += ["## Launch variants (vs the backend's default launch, same rows)", "", markdown_table(h, lines), ""]
    h, lines = e2e_table(result["rows"])
    if lines:
        parts += ["## End to end (one SGD training step)", "", markdown_table(h, lines), ""]
    cmp_ = result.get("compare")
    if cmp_:
        parts += compare_lines(cmp_, md=True) + [""]
    skipped = skipped_lines(result["rows"])
    if skipped:
        parts += ["## Skipped and failed", "", *[f"- {s}" for s in skipped], ""]
    if result.get("notes"):
        parts += ["## Notes", "", *[f"- {n}" for n in result["notes"]], ""]
    with open(path, "w") as f:
        f.write("\n".join(parts))


def compare_lines(cmp_, md=False, limit=40) -> list[str]:
    head = (f"compare vs {cmp_.get('old_file')}: {cmp_['matched']} rows matched, "
            f"{len(cmp_['regressions'])} regressions (> {100 * cmp_['threshold']:.0f}% slower), "
            f"{len(cmp_['improvements'])} improvements")
    if cmp_.get("warning"):
        head += f" -- WARNING: {cmp_['warning']}"
    if cmp_.get("same_kernels"):
        head += " (same kernel hash: differences are noise or non-kernel changes)"
    out = (["## Compare", "", head, ""] if md else [head])
    for item in cmp_["regressions"][:limit]:
        out.append(f"{'- ' if md else '  '}REGRESSION {item['key']}: {fmt_us(item['old_us'])} -> "
                   f"{fmt_us(item['new_us'])} ({item['ratio']:.2f}x)")
    return out


def write_json(result, path):
    """Everything but the rows indented; one row per line (thousands of rows in the gpu preset:
    compact and diff-friendly). Written to a temporary file and renamed: never half a file."""
    head = [f" {json.dumps(k)}: {json.dumps(v, indent=1, default=str)}" for k, v in result.items() if k != "rows"]
    rows = ",\n".join(f"  {json.dumps(r, default=str)}" for r in result.get("rows", []))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("{\n" + ",\n".join([*head, f' "rows": [\n{rows}\n ]']) + "\n}\n")
    os.replace(tmp, path)


def print_console(result, file=None):
    """The tables on the console: rich if installed, plain text otherwise."""
    tables = [("Summary", summary_table(result["rows"])), ("Layer", layer_table(result["rows"])),
              ("Launch variants", variants_table(result["rows"])), ("End to end", e2e_table(result["rows"]))]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is not None:
        console = Console(file=file, width=max(160, Console().width))
        for line in trust_lines(result) + _header_text(result):
            console.print(line.strip("*"), highlight=False, markup=False)
        for title, (h, lines) in tables:
            if not lines:
                continue
            t = Table(title=title, show_lines=False, header_style="bold")
            for c in h:
                t.add_column(c, justify="right" if c not in ("shape", "mode", "provider", "net") else "left")
            for line in lines:
                t.add_row(*line)
            console.print(t)
    else:
        for line in trust_lines(result) + _header_text(result):
            print(line.strip("*"), file=file)
        for title, (h, lines) in tables:
            if lines:
                print(f"\n{title}", file=file)
                print(plain_table(h, lines), file=file)
    for line in ([*compare_lines(result["compare"])] if result.get("compare") else []) + \
            [f"skipped: {s}" for s in skipped_lines(result["rows"])]:
        print(line, file=file)


def plain_table(header, lines) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]

    def fmt(cells):
        return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def write_plot(result, path) -> str | None:
    """Per shape: geomean speedup over eager and median fraction of floor, one bar per provider.
    Returns a note when it cannot plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed"
    layer = [r for r in result["rows"] if r["kind"] == "layer" and r["status"] == "ok"]
    if not layer:
        return "no plot: no layer rows"
    shapes = list(dict.fromkeys(f"{r['net']}/{r['stage']}\n{r['N']}x{r['C']}x{r['H']}x{r['W']}" for r in layer))
    provs = providers_of(layer)
    width_in = min(18.0, max(6.0, 0.3 * len(shapes) * len(provs) + 3))
    fig, axes = plt.subplots(2, 1, figsize=(width_in, 7), sharex=True)
    width = 0.8 / len(provs)
    for k, p in enumerate(provs):
        spd, frac = [], []
        for s in shapes:
            sel = [r for r in layer if r["provider"] == p and
                   f"{r['net']}/{r['stage']}\n{r['N']}x{r['C']}x{r['H']}x{r['W']}" == s]
            spd.append(geomean(r["speedup_vs_eager"] for r in sel) or 0)
            frac.append(median(r["frac_floor"] for r in sel) or 0)
        xs = [i + (k - (len(provs) - 1) / 2) * width for i in range(len(shapes))]
        axes[0].bar(xs, spd, width, label=p)
        axes[1].bar(xs, frac, width, label=p)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set_ylabel("speedup over eager\n(geomean over modes, dtypes, passes)")
    axes[1].set_ylabel("fraction of bandwidth floor\n(median)")
    from matplotlib.ticker import PercentFormatter
    axes[1].yaxis.set_major_formatter(PercentFormatter(1.0))
    axes[1].set_xticks(range(len(shapes)), shapes, fontsize=8)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    m = result["meta"]
    axes[0].set_title(f"cmpe_se_fused on {m['device']['name']} (copy {m['copy_bandwidth']['GBps']:.0f} GB/s, "
                      f"commit {m['git']['short']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
