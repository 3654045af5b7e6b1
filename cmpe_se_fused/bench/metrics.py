"""Row bookkeeping: the bandwidth floors of SPEC.md section 3, derived metrics, row keys, the
JSON row schema and the ``--compare`` regression check.

``T = N*C*H*W*itemsize`` is one activation tensor. Minimum bytes: fwd 3T (read U, X; write Y),
bwd 4T (read dY, U; write dU, dX), fwdbwd 7T. A two-pass kernel (pool, then rescale) moves 5T in
each direction (fwdbwd 10T). Time floor = bytes / copy bandwidth measured in the same run.
"""
from __future__ import annotations

import math
import statistics

from .config import DTYPES

FLOOR_T = {"fwd": 3, "bwd": 4, "fwdbwd": 7}
TWO_PASS_T = {"fwd": 5, "bwd": 5, "fwdbwd": 10}
BASELINE = "eager"
COMPILE_NAMES = ("compile", "compile-max")

LAYER_KEY = ("kind", "net", "stage", "N", "C", "H", "W", "mode", "dtype", "layout", "phase", "pass", "provider")
E2E_KEY = ("kind", "net", "N", "se_mode", "dtype", "layout", "provider")

#: field -> allowed types, for every row (tests check the written JSON against it)
ROW_SCHEMA = {
    "kind": (str,), "provider": (str,), "status": (str,), "reason": (str, type(None)),
    "net": (str,), "N": (int,), "dtype": (str,), "layout": (str,),
    "median_us": (float, type(None)), "reps": (int, type(None)), "iqr_us": (float, type(None)),
    "speedup_vs_eager": (float, type(None)), "peak_mem_mb": (float, type(None)),
    "mem_vs_eager": (float, type(None)),
}
LAYER_SCHEMA = {
    "stage": (str,), "C": (int,), "H": (int,), "W": (int,), "fold_width": (int,), "pair_filters": (int,),
    "mode": (str,), "phase": (str,), "pass": (str,), "T_bytes": (int,), "floor_bytes": (int,),
    "two_pass_bytes": (int,), "floor_us": (float,), "two_pass_floor_us": (float,),
    "frac_floor": (float, type(None)), "frac_two_pass_floor": (float, type(None)), "GBps": (float, type(None)),
    "speedup_vs_compile": (float, type(None)), "compile_baseline": (str, type(None)),
    "graph_us": (float, type(None)), "graph_frac_floor": (float, type(None)), "graph_note": (str, type(None)),
    "err_vs_eager": (float, type(None)),
    "check": (str, type(None)), "speedup_vs_default": (float, type(None)),
    # bench.stability: the rounds, their spread, the other processes' load, the flags
    "rep_us": (list,), "spread": (float, type(None)), "other_load": (float, type(None)), "flags": (list,),
    "at_s": (float, type(None)),
}
E2E_SCHEMA = {"se_mode": (str,), "images_per_s": (float, type(None)), "overhead_vs_plain": (float, type(None))}
STATUSES = ("ok", "skipped", "error")


def activation_bytes(n: int, c: int, h: int, w: int, dtype: str) -> int:
    """T: bytes of one ``N x C x H x W`` tensor of ``dtype`` (``fp32``/``bf16``/``fp16``)."""
    return n * c * h * w * DTYPES[dtype].itemsize


def floor_bytes(pass_: str, t_bytes: int) -> int:
    """Minimum bytes of a pass: fwd 3T, bwd 4T, fwdbwd 7T."""
    return FLOOR_T[pass_] * t_bytes


def two_pass_bytes(pass_: str, t_bytes: int) -> int:
    """Bytes of a two-pass kernel: fwd 5T, bwd 5T, fwdbwd 10T."""
    return TWO_PASS_T[pass_] * t_bytes


def layer_row(case, pass_: str, provider: str, copy_gbps: float) -> dict:
    """A layer row with its identity and floors filled in; timing fields None until measured."""
    s = case.shape
    t = activation_bytes(s.n, s.c, s.h, s.w, case.dtype)
    fb, tb = floor_bytes(pass_, t), two_pass_bytes(pass_, t)
    return {"kind": "layer", "net": s.net, "stage": s.stage, "N": s.n, "C": s.c, "H": s.h, "W": s.w,
            "fold_width": s.fold_width, "pair_filters": s.pair_filters, "mode": case.mode, "dtype": case.dtype,
            "layout": case.layout, "phase": case.phase, "pass": pass_, "provider": provider,
            "status": "skipped", "reason": None, "T_bytes": t, "floor_bytes": fb, "two_pass_bytes": tb,
            "floor_us": fb / (copy_gbps * 1e3), "two_pass_floor_us": tb / (copy_gbps * 1e3),
            "median_us": None, "reps": None, "iqr_us": None, "frac_floor": None, "frac_two_pass_floor": None,
            "GBps": None, "speedup_vs_eager": None, "speedup_vs_compile": None, "compile_baseline": None,
            "graph_us": None, "graph_frac_floor": None, "graph_note": None, "peak_mem_mb": None,
            "mem_vs_eager": None,
            "err_vs_eager": None, "check": None, "speedup_vs_default": None,
            "rep_us": [], "spread": None, "other_load": None, "flags": [], "at_s": None}


def row_key(row: dict) -> str:
    fields = LAYER_KEY if row.get("kind") == "layer" else E2E_KEY
    return "|".join(str(row.get(f)) for f in fields)


def _ratio(a, b):
    return None if a is None or b is None or b <= 0 else float(a) / float(b)


def derive(rows: list[dict]) -> list[dict]:
    """Fill in the metrics that compare rows: fraction of floor, GB/s, speedups vs eager and vs
    the fastest torch.compile variant of the same key, memory vs eager, graph fraction of floor."""
    def peer(row, provider):
        return by_key.get(row_key(dict(row, provider=provider)))

    by_key = {row_key(r): r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        t = r["median_us"]
        base = peer(r, BASELINE)
        r["speedup_vs_eager"] = _ratio(base and base["median_us"], t)
        r["mem_vs_eager"] = _ratio(r.get("peak_mem_mb"), base and base.get("peak_mem_mb"))
        if r["kind"] != "layer":
            continue
        r["frac_floor"] = _ratio(r["floor_us"], t)
        r["frac_two_pass_floor"] = _ratio(r["two_pass_floor_us"], t)
        r["GBps"] = r["floor_bytes"] / (t * 1e3) if t else None
        r["graph_frac_floor"] = _ratio(r["floor_us"], r.get("graph_us"))
        if "@" in r["provider"]:  # a launch variant against its backend's default launch
            default = peer(r, r["provider"].partition("@")[0])
            r["speedup_vs_default"] = _ratio(default and default["median_us"], t)
        compiled = [c for c in (peer(r, n) for n in COMPILE_NAMES) if c is not None]
        if compiled:
            best = min(compiled, key=lambda c: c["median_us"])
            r["speedup_vs_compile"], r["compile_baseline"] = _ratio(best["median_us"], t), best["provider"]
    return rows


def geomean(values) -> float | None:
    vals = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def median(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def check_row(row: dict) -> list[str]:
    """Schema problems of one row (empty: valid)."""
    schema = dict(ROW_SCHEMA)
    schema.update(LAYER_SCHEMA if row.get("kind") == "layer" else E2E_SCHEMA)
    problems = [f"missing field {k!r}" for k in schema if k not in row]
    problems += [f"{k}={row[k]!r} is not {'/'.join(t.__name__ for t in ts)}" for k, ts in schema.items()
                 if k in row and not isinstance(row[k], ts)]
    if row.get("status") not in STATUSES:
        problems.append(f"status {row.get('status')!r} not in {STATUSES}")
    if row.get("status") == "ok" and row.get("median_us") is None:
        problems.append("status ok without median_us")
    if (row.get("kind") == "layer" and row.get("pass") in FLOOR_T and isinstance(row.get("T_bytes"), int)
            and row.get("floor_bytes") != FLOOR_T[row["pass"]] * row["T_bytes"]):
        problems.append("floor_bytes != FLOOR_T[pass] * T_bytes")
    return problems


def compare(new_rows: list[dict], old_rows: list[dict], threshold: float = 0.10) -> dict:
    """Rows of the same key in both runs: ``regressions`` (new time > (1+threshold) x old),
    ``improvements`` (new < old / (1+threshold)), counts of matched and unmatched keys."""
    old = {row_key(r): r for r in old_rows if r.get("status") == "ok" and r.get("median_us")}
    regressions, improvements, matched = [], [], 0
    for r in new_rows:
        o = old.get(row_key(r))
        if r.get("status") != "ok" or o is None:
            continue
        matched += 1
        ratio = r["median_us"] / o["median_us"]
        item = {"key": row_key(r), "old_us": o["median_us"], "new_us": r["median_us"], "ratio": ratio}
        if ratio > 1 + threshold:
            regressions.append(item)
        elif ratio < 1 / (1 + threshold):
            improvements.append(item)
    regressions.sort(key=lambda i: -i["ratio"])
    improvements.sort(key=lambda i: i["ratio"])
    new_keys = {row_key(r) for r in new_rows if r.get("status") == "ok"}
    return {"threshold": threshold, "matched": matched, "regressions": regressions, "improvements": improvements,
            "only_in_old": len(set(old) - new_keys), "only_in_new": len(new_keys - set(old))}
