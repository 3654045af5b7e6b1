"""The run: copy bandwidth first, then phases in priority order, each case timed for every pass.

Phases: ``core`` (eager and the package's backends), ``e2e`` (training steps), ``compile``,
``variants`` (launch-config sweeps), ``compile-max``. With a time budget each phase has a
deadline (a share of the budget, cumulative): a run cut short still has its most important rows,
and rows it could not reach are recorded as skipped with the reason. ``bench.json`` is rewritten
after every case, so even a killed run leaves its rows behind.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

import torch

from . import children, envinfo, metrics, report, stability
from .config import DTYPES, Case, Preset, limit_reason
from .console import Progress, _log
from .e2e import NETS, derive_e2e, e2e_configs, missing_packages, run_e2e
from .providers import (
    COMPILE_PROVIDERS,
    TOLERANCE,
    Inputs,
    Pass,
    build,
    error_vs,
    launch_context,
    provider_reasons,
    reference_module,
)
from .timing import copy_bandwidth, peak_memory_mb, rotation_copies, synchronize, time_cuda_graph, time_fn
from .variants import is_env_variant

PHASE_DEADLINE = {"core": 0.55, "e2e": 0.65, "compile": 0.85, "variants": 0.95, "compile-max": 1.0}
#: seconds a phase's next item may need (a compile, an autotune): it is not started closer to the deadline
START_MARGIN = {"core": 0.0, "e2e": 2.0, "compile": 8.0, "variants": 2.0, "compile-max": 30.0}


@dataclass
class Options:
    preset: Preset
    device: torch.device
    cases: list
    passes: tuple
    providers: tuple
    out: str
    e2e: bool = False
    e2e_modes: tuple = ()
    e2e_dtypes: tuple = ()
    e2e_batch: int = 8
    e2e_batches: tuple = ()             # given: every e2e net at these batches (over the preset's e2e_batches)
    graphs: bool = True
    graph_threshold_us: float = 200.0
    budget_s: float | None = None
    quick_timing: bool = False
    plot: bool = True
    compare: dict | None = None
    compare_path: str | None = None
    threshold: float = 0.10
    compile_all: bool = False
    copy_bytes: int | None = None
    cpu_min_time: float | None = None   # blocked_autorange min_run_time (default 0.1 s quick, 0.3 s otherwise)
    as_variant: str | None = None       # child process of an environment variant: label rows with this name
    copy_gbps: float | None = None      # the parent's copy bandwidth (child processes do not measure it)
    repeats: int = stability.REPEATS    # rounds per row, providers interleaved (bench.stability)
    e2e_asked: bool = False             # --e2e given: nets whose packages are missing stay, as skipped rows
    argv: list = field(default_factory=list)


class Stop(BaseException):
    """SIGTERM (``timeout``): finish the outputs with what was measured. A BaseException, like
    KeyboardInterrupt, so the ``except Exception`` that turns a failing provider into an error row
    does not swallow it."""


class Runner:
    def __init__(self, opts: Options):
        self.o = opts
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.written: list[str] = []  # the files of the last complete write
        self.plot_note: str | None = None
        self.result: dict = {}
        self.gbps = 0.0
        self._by_key: dict = {}   # row key -> layer row (a provider timed again in a later phase)
        self._windows: dict = {}  # id(row) -> the (t0, t1) of its rounds, for the load monitor
        self.monitor = stability.LoadMonitor(torch.get_num_threads() if opts.device.type == "cpu" else 1)

    # -- budget -----------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def deadline(self, phase: str) -> float | None:
        """Seconds from the start at which ``phase`` must stop starting work (None: no budget)."""
        if self.o.budget_s is None:
            return None
        return self.o.budget_s * (1.0 if self.o.as_variant else PHASE_DEADLINE[phase])

    def budget_reason(self, phase: str) -> str | None:
        d = self.deadline(phase)
        if d is None or self.elapsed() < d - START_MARGIN[phase]:
            return None
        return (f"time budget: phase {phase} ends at {d:.0f}s of --budget-s {self.o.budget_s:.0f} "
                f"(nothing new starts in its last {START_MARGIN[phase]:.0f}s)")

    # -- one case ---------------------------------------------------------------------------
    def run_case(self, case: Case, providers, phase: str, progress: Progress):
        """Build and check every provider of ``case``, then time them pass by pass, interleaved
        (``measure``). A provider measured in an earlier phase (eager, beside compile) is timed
        again in this phase's rounds: its row gathers the rounds of both."""
        o, dev = self.o, self.o.device
        s = case.shape
        fmt = torch.channels_last if case.layout == "cl" else torch.contiguous_format
        sample = torch.empty((s.n, s.c, s.h, s.w), device=dev, dtype=DTYPES[case.dtype], memory_format=fmt)
        inputs = ref_y = state = None
        live = {}
        for prov in providers:
            rows = {ps: self._layer_row(case, ps, prov) for ps in o.passes}
            again = all(r["status"] == "ok" for r in rows.values()) and bool(rows)
            if not again:
                progress.advance(f"{prov} {s.label} {case.mode} {case.dtype} {case.layout} {case.phase}")
            if not again and any(r["status"] != "skipped" or r["reason"] for r in rows.values()):
                continue  # measured before, and skipped or failed there: not retried
            why = None if o.compile_all or again else limit_reason(o.preset, o.as_variant or prov, case)
            why = why or "; ".join(provider_reasons(prov, sample)) or self.budget_reason(phase)
            if why:
                for r in rows.values():
                    r["reason"] = r["reason"] if again else why
                continue
            try:
                if inputs is None:
                    state = reference_module(case).state_dict()
                    inputs = Inputs(case, rotation_copies(3 * sample.numel() * sample.element_size(), dev), dev)
                    ref_y = self._forward_once("eager", case, state, inputs)
                live[prov] = (self.check(prov, case, state, inputs, ref_y, rows, again), rows)
            except Exception as exc:  # noqa: BLE001 - a provider that fails is a row, not the end of the run
                for r in rows.values():
                    if r["status"] != "ok":
                        r.update(status="error", reason=_exc_text(exc))
        if live:
            self.measure(case, live, inputs)
        del inputs, ref_y, sample

    def _layer_row(self, case, ps, prov):
        """The row of (case, pass, provider): the one already in the run, else a new one."""
        row = metrics.layer_row(case, ps, prov, self.gbps)
        key = metrics.row_key(row)
        if key not in self._by_key:
            self._by_key[key] = row
            self.rows.append(row)
        return self._by_key[key]

    def _forward_once(self, prov, case, state, inputs):
        module, _ = build(prov, case, state, self.o.device)
        with launch_context(prov), torch.set_grad_enabled(case.training):
            return module(inputs.u[0], inputs.x[0]).detach()

    def check(self, prov, case, state, inputs, ref_y, rows, again=False):
        """The provider's module, built, and its output checked against eager's (not again when
        ``again``: the rows hold the check)."""
        module, params = build(prov, case, state, self.o.device)
        with launch_context(prov), torch.set_grad_enabled(case.training):  # the graph the fwd pass uses
            y = module(inputs.u[0], inputs.x[0])
        if again:
            return module, params
        err = None if prov == "eager" else error_vs(y, ref_y)
        check = None if err is None else ("ok" if err <= TOLERANCE[case.dtype] else "MISMATCH")
        if check == "MISMATCH":
            self.notes.append(f"MISMATCH {prov} {case.shape.label} {case.mode} {case.dtype} {case.layout} "
                              f"{case.phase}: max error {err:.3g} of max |Y| vs eager")
        for row in rows.values():
            row.update(err_vs_eager=err, check=check)
        return module, params

    def measure(self, case, live, inputs):
        """Per pass: ``repeats`` rounds, each timing every live provider once, the order rotated
        from round to round; then spread, load and flags per row (``stability``)."""
        o, dev = self.o, self.o.device
        share = 1.0 / o.repeats
        for ps in o.passes:
            passes, rounds = {}, {}
            for prov, ((module, params), rows) in live.items():
                p = Pass(ps, module, params, inputs, case.training)
                try:
                    with launch_context(prov):
                        p.prepare()
                    passes[prov], rounds[prov] = p, []
                except Exception as exc:  # noqa: BLE001
                    rows[ps].update(status="error", reason=_exc_text(exc))
            for k in range(o.repeats):
                for prov in stability.rotated(list(passes), k):
                    row = live[prov][1][ps]
                    if row["status"] == "error":
                        continue
                    try:
                        t0 = time.perf_counter()
                        with launch_context(prov):
                            t = time_fn(passes[prov], inputs.n, dev, quick=o.quick_timing, cpu_min_time=o.cpu_min_time,
                                        share=share)
                        self._windows.setdefault(id(row), []).append((t0, time.perf_counter()))
                        stability.record(row, t.median_us)
                        rounds[prov].append(t.median_us)
                        row.update(status="ok", reps=int((row["reps"] or 0) + t.reps),
                                   iqr_us=None if t.iqr_us is None else float(t.iqr_us))
                    except Exception as exc:  # noqa: BLE001
                        row.update(status="error", reason=_exc_text(exc))
            for prov, p in passes.items():
                self._after_rounds(prov, p, live[prov][1][ps], inputs)
            stability.flag_flips([(live[p][1][ps], rounds[p]) for p in passes if live[p][1][ps]["status"] == "ok"])

    def _after_rounds(self, prov, p, row, inputs):
        o, dev = self.o, self.o.device
        try:
            if row["status"] == "ok":
                windows = self._windows.get(id(row), [])
                stability.finish_row(row, self.monitor.other_in(windows), self.monitor.limit)
                row["at_s"] = round(windows[0][0] - self.t0, 3) if windows else None
                with launch_context(prov):
                    if p.name == "fwdbwd":
                        row["peak_mem_mb"] = peak_memory_mb(p, dev)
                    p.release()
                    if dev.type == "cuda" and o.graphs and row["median_us"] < o.graph_threshold_us:
                        self._graph(p, inputs, row)
        except Exception as exc:  # noqa: BLE001
            row.update(status="error", reason=_exc_text(exc))
        finally:
            p.release()
            synchronize(dev)

    def _graph(self, p: Pass, inputs, row):
        try:
            g = time_cuda_graph(p, inputs.n, prepare=p.prepare)
            row["graph_us"] = float(g.median_us)
        except Exception as exc:  # noqa: BLE001 - capture is best effort; the event timing stands
            row["graph_note"] = f"CUDA-graph capture failed, event timing only: {_exc_text(exc)}"

    # -- the run ----------------------------------------------------------------------------
    def phases(self):
        provs = self.o.providers
        core = tuple(p for p in provs if p not in COMPILE_PROVIDERS and "@" not in p)
        out = [("core", core)]
        if self.o.e2e and not self.o.as_variant:
            out.append(("e2e", None))
        out += [("compile", tuple(p for p in provs if p == "compile")),
                ("variants", tuple(p for p in provs if "@" in p)),
                ("compile-max", tuple(p for p in provs if p == "compile-max"))]
        return [(name, ps) for name, ps in out if ps is None or ps]

    def e2e_plan(self):
        """[(net, batches)]: the preset's nets (default all), each at the batches given in the
        options, else the preset's for that net, else ``e2e_batch``. Unless ``--e2e`` asked for
        them, nets that need a package that is not installed are left out (``e2e_left_out``)."""
        o = self.o
        nets = o.preset.e2e_nets or tuple(NETS)
        if not o.e2e_asked:
            nets = tuple(n for n in nets if n not in self.e2e_left_out())
        return [(net, o.e2e_batches or o.preset.e2e_batches.get(net) or (o.e2e_batch,)) for net in nets]

    def e2e_left_out(self) -> dict:
        """net -> the packages it needs and lacks, for the preset's e2e nets (nothing with --e2e)."""
        if self.o.e2e_asked or not self.o.e2e:
            return {}
        return {n: m for n in (self.o.preset.e2e_nets or tuple(NETS)) if (m := missing_packages(n))}

    def e2e_providers(self):
        return tuple(p for p in self.o.providers if p not in COMPILE_PROVIDERS and "@" not in p)

    def run(self) -> dict:
        o = self.o
        os.makedirs(o.out, exist_ok=True)
        meta = envinfo.collect(o.device)
        meta.update(preset=o.preset.name, argv=o.argv, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    passes=list(o.passes), providers=list(o.providers), budget_s=o.budget_s)
        self.result = {"schema": report.SCHEMA_VERSION, "meta": meta, "rows": self.rows, "notes": self.notes}
        if o.device.type == "cpu" and hasattr(os, "getloadavg"):
            load = os.getloadavg()[0]
            meta["loadavg"] = round(load, 2)
            if load > (os.cpu_count() or 1) - 0.5:
                self.notes.append(f"CPU busy when the run started (load average {load:.1f} on {os.cpu_count()} "
                                  f"cores): CPU times are inflated, compare ratios only")
                if torch.get_num_threads() > 1:
                    _log(f"[bench] warning: load average {load:.1f} on {os.cpu_count()} cores; OpenMP barriers stall "
                         "on a busy machine, consider --threads 1")
        meta["copy_bandwidth"] = {"bytes": 0, "median_us": 0.0, "GBps": 0.0, "method": "not measured"}
        meta["interrupted"] = False
        meta["started_epoch"] = time.time() - self.elapsed()  # rows' at_s count from here
        meta["repeats"] = o.repeats
        old_handler = signal.signal(signal.SIGTERM, _raise_stop)
        self._progress = None
        self.monitor.start()
        try:
            self._measure(meta)
        except (Stop, KeyboardInterrupt):
            meta["interrupted"] = True
            self.notes.append(f"run interrupted at {self.elapsed():.0f}s; rows not reached are missing")
            _log("[bench] interrupted: writing what was measured")
        finally:
            self.monitor.stop()
            if self._progress is not None:
                self._progress.close()
            signal.signal(signal.SIGTERM, old_handler)
        return self.finish()

    def companions(self, phase: str, provs) -> tuple:
        """Providers timed again beside a later phase's, in the same rounds: eager beside compile,
        a backend's default launch beside its launch variants (their ratios are same-round ratios)."""
        if phase == "core" or self.o.as_variant:
            return ()
        want = ("eager",) if phase.startswith("compile") else tuple(dict.fromkeys(p.partition("@")[0] for p in provs))
        return tuple(p for p in want if p in self.o.providers and p not in provs)

    def _measure(self, meta):
        o = self.o
        if o.copy_gbps:
            meta["copy_bandwidth"] = {"bytes": 0, "median_us": 0.0, "GBps": o.copy_gbps,
                                      "method": "given by the parent run"}
        else:
            _log(f"[bench] {meta['device']['name']}: measuring copy bandwidth")
            meta["copy_bandwidth"] = copy_bandwidth(o.device, o.copy_bytes)
        self.gbps = meta["copy_bandwidth"]["GBps"]
        _log(f"[bench] copy bandwidth {self.gbps:.1f} GB/s; {len(o.cases)} cases x {len(o.passes)} passes, "
             f"providers {', '.join(o.providers)}")
        plan = self.phases()
        for net, why in self.e2e_left_out().items():
            self.notes.append(f"end-to-end rows of {net} left out: {why}; add them with --e2e")
            _log(f"[bench] end-to-end rows of {net} left out: {why}; add them with --e2e")
        n_e2e = sum(len(b) * len(o.e2e_dtypes) * len(e2e_configs(net, o.e2e_modes, self.e2e_providers()))
                    for net, b in self.e2e_plan())
        progress = self._progress = Progress(sum(len(o.cases) * len(ps) if ps is not None else n_e2e
                                                 for _, ps in plan))
        for name, provs in plan:
            _log(f"[bench] phase {name} at {self.elapsed():.0f}s")
            if provs is None:
                for net, batches in self.e2e_plan():
                    run_e2e([net], o.e2e_modes, o.e2e_dtypes, ("nchw",), self.e2e_providers(), o.device,
                            batches, on_row=lambda r: (self.rows.append(r), progress.advance(
                                f"e2e {r['net']} {r['se_mode']} {r['provider']}")),
                            should_skip=lambda: self.budget_reason("e2e"), monitor=self.monitor, repeats=o.repeats)
                    self.write(partial=True)
                continue
            in_process = tuple(p for p in provs if not (is_env_variant(p) and not o.as_variant))
            timed = self.companions(name, in_process) + in_process if in_process else ()
            for case in o.cases if timed else ():
                self.run_case(case, timed, name, progress)
                self.write(partial=True)
            for prov in provs:
                if prov not in in_process:
                    self.run_env_variant(prov, name, progress)
                    self.write(partial=True)

    def run_env_variant(self, prov: str, phase: str, progress: Progress):
        """Time ``prov`` (a ``cuda@...`` variant) in a child process with its environment (bench.children)."""
        children.run_env_variant(self, prov, phase, progress)

    def finish(self) -> dict:
        if self.o.as_variant:
            for r in self.rows:
                r["provider"] = self.o.as_variant
        metrics.derive(self.rows)
        derive_e2e(self.rows)
        meta = self.result["meta"]
        meta["load"] = self.monitor.summary()
        if hasattr(os, "getloadavg"):
            meta["loadavg_end"] = round(os.getloadavg()[0], 2)
        trust = self.result["trust"] = stability.verdict(self.rows, meta["load"])
        if trust["statement"]:
            _log(f"[bench] {trust['statement']}")
        if self.o.compare is not None:
            cmp_ = metrics.compare(self.rows, self.o.compare.get("rows", []), self.o.threshold)
            cmp_["old_file"] = self.o.compare_path
            old_meta = self.o.compare.get("meta", {})
            cmp_["old_commit"] = old_meta.get("git", {}).get("short")
            old_dev, new_dev = old_meta.get("device", {}).get("name"), self.result["meta"]["device"]["name"]
            if old_dev != new_dev:
                cmp_["warning"] = f"different devices: {old_dev} then, {new_dev} now; times do not compare"
            if old_meta.get("kernel_hash") == self.result["meta"].get("kernel_hash"):
                cmp_["same_kernels"] = True
            self.result["compare"] = cmp_
        self.write(partial=False)
        return self.result

    def write(self, partial: bool):
        o = self.o
        self.result["meta"]["duration_s"] = round(self.elapsed(), 1)
        self.result["meta"]["complete"] = not partial
        if partial:
            report.write_json(self.result, os.path.join(o.out, "bench.json"))
            return
        self.plot_note = None
        if o.plot:
            self.plot_note = report.write_plot(self.result, os.path.join(o.out, "bench.png"))
            if self.plot_note:
                self.notes.append(self.plot_note)
        report.write_json(self.result, os.path.join(o.out, "bench.json"))
        report.write_markdown(self.result, os.path.join(o.out, "bench.md"))
        self.written = ["bench.json", "bench.md"] + (["bench.png"] if o.plot and not self.plot_note else [])


def _raise_stop(signum, frame):
    raise Stop(f"signal {signum}")


def _exc_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"
