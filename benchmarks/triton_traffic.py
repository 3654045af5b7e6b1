"""Bytes moved by the Triton kernels, counted in Triton's interpreter (issue 17, item 2).

Every ``tl.load`` / ``tl.store`` of an interpreted launch reaches the interpreter's builder
(``InterpreterBuilder.create_masked_load`` / ``create_masked_store``; the unmasked forms call
them) with the block of addresses and the mask. The counter wraps both and the launch itself
(``GridExecutor.__call__``): per launch, the bytes of the active lanes only (masked-off lanes
move nothing), element size from the pointer's element type, each address classified into the
launch's tensor arguments by their storage ranges (``data_ptr`` spans). The full-size tensors
(one activation each: U, X, Y in the forward; dY, U, dU, dX in the backward) are registered by
the caller or recognised as the kernels' output arguments (``y``, ``du_out``, ``dx_out``); every
other argument (pools, gate, hidden, weights, running stats, workspace) is "small" and reported
in bytes. Distinct bytes per tensor are kept too, so a re-read shows as read > distinct.

The interpreter must be on before triton is first imported (Triton decides at decoration time
whether a kernel is compiled or interpreted): this module sets ``TRITON_INTERPRET=1`` when it is
imported before triton, and refuses to count otherwise. ``benchmarks/gpu_evidence.py`` runs it in
a subprocess:

    TRITON_INTERPRET=1 python benchmarks/triton_traffic.py --json   # every case, JSON rows
    python benchmarks/triton_traffic.py --modes se --layouts nchw    # a table
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

MODES = ("se", "double_fc", "pair_2x1", "pair_1x1", "folded_3x3")
# the kernels' full-size output arguments (cmpe_se_fused/triton/streaming.py)
OUTPUT_NAMES = {"y": "Y", "du_out": "dU", "dx_out": "dX"}
# launch configurations of the streaming kernels (cmpe_se_fused.triton.streaming._forward / _backward):
#   single: one program per sample, the forward in one launch (the default when the batch fills
#           the device, N >= SMs, and always on the CPU)
#   split:  several programs per sample (N < SMs on a GPU: chunks = ceil(2 SMs / N), e.g. 3 at the
#           targets' N=128 on an H200): squeeze and excite are separate launches
CONFIGS = {"single": ({"single_launch": True, "chunks": 1}, {"chunks": 1}),
           "split": ({"single_launch": False, "chunks": 2, "block_c": 8}, {"chunks": 2, "block_c": 8}),
           # the GPU default at the targets' N=128 on an H200 (132 SMs): 3 programs per sample, default tiles
           "split3": ({"single_launch": False, "chunks": 3}, {"chunks": 3})}
# the documented traffic per tensor and the budgets: benchmarks/gpu_evidence.py (TRITON_DOCUMENTED)
from gpu_evidence import TRITON_BUDGET_T as BUDGET_T  # noqa: E402
from gpu_evidence import TRITON_DOCUMENTED as DOCUMENTED  # noqa: E402


def interpreter_ready() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
        from triton.runtime import interpreter  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"triton cannot be imported: {exc}"
    import cmpe_se_fused.triton.streaming as tk

    if not tk.INTERPRETED:
        return False, "triton was imported before TRITON_INTERPRET=1 was set: kernels are compiled, not interpreted"
    return True, ""


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[begin, end) bytes of the memory a tensor can address through its strides."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


class _Launch:
    def __init__(self, kernel, grid, ranges):
        self.kernel, self.grid = kernel, grid
        ranges = sorted(ranges)  # (begin, end, label, full); identical spans: the first label wins
        self.begins = np.array([r[0] for r in ranges], dtype=np.int64)
        self.ends = np.array([r[1] for r in ranges], dtype=np.int64)
        self.labels = [r[2] for r in ranges]
        self.full = {r[2]: r[3] for r in ranges}
        self.bytes = collections.defaultdict(lambda: [0, 0])  # label -> [read, written]
        self.addrs = collections.defaultdict(lambda: ([], []))  # label -> (read addr lists, written)

    def account(self, addr: np.ndarray, esz: int, store: bool):
        if addr.size == 0:
            return
        idx = np.searchsorted(self.begins, addr, side="right") - 1
        inside = (idx >= 0) & (addr < self.ends[np.maximum(idx, 0)])
        if not inside.all():
            self.bytes["unknown"][int(store)] += int((~inside).sum()) * esz
            self.full.setdefault("unknown", False)
        idx = idx[inside]
        addr = addr[inside]
        for i in np.unique(idx):
            a = addr[idx == i]
            lab = self.labels[i]
            self.bytes[lab][int(store)] += int(a.size) * esz
            self.addrs[lab][int(store)].append((a, esz))


def _distinct(chunks) -> int:
    """Distinct bytes of a list of (addresses, element size)."""
    if not chunks:
        return 0
    by_size = collections.defaultdict(list)
    for a, esz in chunks:
        by_size[esz].append(a)
    return sum(np.unique(np.concatenate(v)).size * esz for esz, v in by_size.items())


class ByteCounter:
    """Context manager: counts the global bytes of every interpreted launch while active.

    ``full``: name -> tensor, the full-size tensors (their bytes are reported per name); the
    kernels' full-size outputs are added by argument name (``OUTPUT_NAMES``); any other tensor
    argument of exactly one full-size tensor's bytes is counted as full-size too (named after the
    argument), so nothing full-size can hide among the small tensors."""

    def __init__(self, full: dict, tensor_bytes: int | None = None, output_names=None):
        self.full = {name: _span(t) for name, t in full.items()}
        first = next(iter(full.values()), None)
        self.T = tensor_bytes if tensor_bytes is not None else first.numel() * first.element_size()
        self.output_names = OUTPUT_NAMES if output_names is None else output_names
        self.launches: list[_Launch] = []
        self._active: _Launch | None = None
        self._saved = []

    # ---- hooks ----
    def __enter__(self):
        from triton.runtime import interpreter as I

        ok, why = interpreter_ready()
        if not ok:
            raise RuntimeError(why)
        counter = self
        orig_call = I.GridExecutor.__call__
        orig_load = I.InterpreterBuilder.create_masked_load
        orig_store = I.InterpreterBuilder.create_masked_store

        def call(ge, *args, **kwargs):
            named = list(zip(ge.arg_names, args)) + list(kwargs.items())
            ranges = []
            for name, val in named:
                if not isinstance(val, torch.Tensor):
                    continue
                b, e = _span(val)
                if e == b:
                    continue
                label, full = None, False
                for fname, (fb, fe) in counter.full.items():
                    if (fb, fe) == (b, e):
                        label, full = fname, True
                        break
                if label is None and name in counter.output_names and e - b == counter.T:
                    label, full = counter.output_names[name], True
                elif label is None and e - b == counter.T:
                    label, full = name, True
                if label is None:
                    label = name
                # identical spans (an absent weight passed as a dummy): full-size first, then
                # the first argument
                ranges.append((b, e, label, full))
            ranges.sort(key=lambda r: (r[0], r[1], not r[3]))
            dedup = []
            for r in ranges:
                if dedup and (dedup[-1][0], dedup[-1][1]) == (r[0], r[1]):
                    continue
                dedup.append(r)
            grid = ge.grid if not callable(ge.grid) else "callable"
            launch = _Launch(ge.fn.__name__, tuple(grid) if isinstance(grid, (tuple, list)) else grid, dedup)
            prev, counter._active = counter._active, launch
            try:
                return orig_call(ge, *args, **kwargs)
            finally:
                counter._active = prev
                counter.launches.append(launch)

        def account(ptrs, mask, store):
            launch = counter._active
            if launch is None:
                return
            data = np.asarray(ptrs.data)
            m = np.broadcast_to(np.asarray(mask.data, dtype=bool), data.shape)
            bits = ptrs.get_element_ty().primitive_bitwidth
            launch.account(data[m].astype(np.int64).ravel(), max(1, (bits + 7) // 8), store)

        def load(builder, ptrs, mask, other, *a, **k):
            account(ptrs, mask, False)
            return orig_load(builder, ptrs, mask, other, *a, **k)

        def store(builder, ptrs, value, mask, *a, **k):
            account(ptrs, mask, True)
            return orig_store(builder, ptrs, value, mask, *a, **k)

        self._saved = [(I.GridExecutor, "__call__", orig_call), (I.InterpreterBuilder, "create_masked_load", orig_load),
                       (I.InterpreterBuilder, "create_masked_store", orig_store)]
        I.GridExecutor.__call__ = call
        I.InterpreterBuilder.create_masked_load = load
        I.InterpreterBuilder.create_masked_store = store
        return self

    def __exit__(self, *exc):
        for obj, name, fn in self._saved:
            setattr(obj, name, fn)
        self._saved = []
        return False

    # ---- results ----
    def launch_rows(self) -> list[dict]:
        """Per launch: kernel, grid, per tensor {read, written, distinct_read, distinct_written, full}."""
        out = []
        for ln in self.launches:
            tensors = {}
            for lab, (r, w) in ln.bytes.items():
                tensors[lab] = {"read": r, "written": w, "distinct_read": _distinct(ln.addrs[lab][0]),
                                "distinct_written": _distinct(ln.addrs[lab][1]), "full": ln.full.get(lab, False)}
            out.append({"kernel": ln.kernel, "grid": list(ln.grid) if isinstance(ln.grid, tuple) else ln.grid,
                        "tensors": tensors})
        return out

    def pass_summary(self) -> dict:
        """All launches together: per tensor bytes and distinct bytes (across launches)."""
        tot = collections.defaultdict(lambda: [0, 0])
        addrs = collections.defaultdict(lambda: ([], []))
        full = {}
        for ln in self.launches:
            for lab, (r, w) in ln.bytes.items():
                tot[lab][0] += r
                tot[lab][1] += w
                addrs[lab][0].extend(ln.addrs[lab][0])
                addrs[lab][1].extend(ln.addrs[lab][1])
                full[lab] = full.get(lab, False) or ln.full.get(lab, False)
        return {lab: {"read": r, "written": w, "distinct_read": _distinct(addrs[lab][0]),
                      "distinct_written": _distinct(addrs[lab][1]), "full": full[lab]}
                for lab, (r, w) in tot.items()}


# ---- the Triton backend's passes --------------------------------------------------------------

def _case(mode, shape, layout, training, dtype=torch.float32, seed=0, reduction=4):
    import emulator as E

    d, _, _, kw = E.make_case(mode, dtype, shape, layout, training, seed=seed, reduction=reduction)
    return d, kw


def _t(b: int, T: int) -> float:
    return round(b / T, 4)


def _summarise(counter: ByteCounter, pas: str) -> dict:
    T = counter.T
    summ = counter.pass_summary()
    full = {k: v for k, v in summ.items() if v["full"]}
    small = {k: v for k, v in summ.items() if not v["full"]}
    per = {k: _t(v["read"] + v["written"], T) for k, v in full.items()}
    reread = {k: _t(v["read"], v["distinct_read"]) if v["distinct_read"] else 0.0 for k, v in full.items()}
    launches = []
    for ln in counter.launch_rows():
        lf = {k: v for k, v in ln["tensors"].items() if v["full"]}
        ls = {k: v for k, v in ln["tensors"].items() if not v["full"]}
        launches.append({"kernel": ln["kernel"], "grid": ln["grid"],
                         "read_T": _t(sum(v["read"] for v in lf.values()), T),
                         "written_T": _t(sum(v["written"] for v in lf.values()), T),
                         "per_tensor": {k: _t(v["read"] + v["written"], T) for k, v in lf.items()},
                         "small_bytes": sum(v["read"] + v["written"] for v in ls.values()),
                         "small": {k: v["read"] + v["written"] for k, v in ls.items()}})
    read_T = _t(sum(v["read"] for v in full.values()), T)
    written_T = _t(sum(v["written"] for v in full.values()), T)
    doc = DOCUMENTED[pas]
    return {"T_bytes": T, "read_T": read_T, "written_T": written_T, "total_T": round(read_T + written_T, 4),
            "per_tensor": per, "reread": reread,
            "coverage": {k: _t(max(v["distinct_read"], v["distinct_written"]), T) for k, v in full.items()},
            "small_bytes": sum(v["read"] + v["written"] for v in small.values()),
            "small": {k: v["read"] + v["written"] for k, v in small.items()},
            "small_distinct": sum(max(v["distinct_read"], v["distinct_written"]) for v in small.values()),
            "launches": launches, "budget_T": BUDGET_T[pas], "documented": doc,
            "unknown_bytes": sum(v["read"] + v["written"] for k, v in summ.items() if k == "unknown")}


def measure(mode, training, layout="nchw", config="single", shape=(2, 32, 8, 8), dtype=torch.float32, seed=0,
            reduction=4):
    """Forward then backward of the Triton backend under the counter: {"fwd": ..., "bwd": ...}."""
    import cmpe_se_fused.triton.streaming as tk
    import emulator as E

    d, kw = _case(mode, shape, layout, training, dtype, seed, reduction)
    fkw, bkw = CONFIGS[config]
    with ByteCounter({"U": d["u"], "X": d["x"]}) as cf:
        out = tk.forward(*E.fwd_args(d, kw), **fkw)
    with ByteCounter({"dY": d["dy"], "U": d["u"]}) as cb:
        tk.backward(*E.bwd_args(d["dy"], d, out, kw), **bkw)
    res = {}
    for pas, c in (("fwd", cf), ("bwd", cb)):
        s = _summarise(c, pas)
        s.update({"mode": mode, "phase": "train" if training else "eval", "pass": pas, "layout": layout,
                  "config": config, "shape": list(shape), "reduction": reduction,
                  "dtype": str(dtype).replace("torch.", "")})
        s["ok"] = s["total_T"] <= s["budget_T"] + 1e-9 and s["unknown_bytes"] == 0
        res[pas] = s
    return res


def rows(modes=MODES, layouts=("nchw", "channels_last"), configs=("single", "split"), shape=(2, 32, 8, 8),
         phases=(True, False), reduction=4, dtype=torch.float32):
    out = []
    for config in configs:
        for layout in layouts:
            for mode in modes:
                for training in phases:
                    r = measure(mode, training, layout, config, shape, dtype=dtype, reduction=reduction)
                    out += [r["fwd"], r["bwd"]]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--layouts", default="nchw,channels_last")
    ap.add_argument("--configs", default="single,split")
    ap.add_argument("--shape", default="2,32,8,8")
    ap.add_argument("--phases", default="train,eval")
    ap.add_argument("--reduction", type=int, default=4, help="C / hidden units of the small network")
    ap.add_argument("--dtype", default="float32", help="float32, float16 or float64 (the interpreter has no bf16)")
    args = ap.parse_args(argv)
    ok, why = interpreter_ready()
    if not ok:
        print(why, file=sys.stderr)
        return 2
    rs = rows(tuple(args.modes.split(",")), tuple(args.layouts.split(",")), tuple(args.configs.split(",")),
              tuple(int(v) for v in args.shape.split(",")),
              tuple(p == "train" for p in args.phases.split(",")), args.reduction, getattr(torch, args.dtype))
    if args.json:
        print(json.dumps(rs))
    else:
        for r in rs:
            print(r["config"], r["layout"], r["mode"], r["phase"], r["pass"], f"{r['total_T']:.2f}T",
                  r["per_tensor"], "reread", r["reread"], "small", r["small_bytes"], "B",
                  [(ln["kernel"], ln["per_tensor"]) for ln in r["launches"]])
    return 0 if all(r["ok"] for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
