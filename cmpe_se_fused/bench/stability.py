"""Whether a run's numbers can be trusted: the machine's load watched throughout, repeats that
disagree, providers whose order flips between repeats.

Every row is timed in ``repeats`` rounds; in each round every provider of the row runs once, in an
order rotated from round to round (A B C, B C A, C A B), so a slow spell of the machine hits every
provider rather than one. A row keeps the median of its rounds (``median_us``), the rounds
themselves (``rep_us``), their spread (``spread``: max / min - 1), the other processes' demand for
the CPU while it ran (``other_load``), and its ``flags``:

* ``busy``: other runnable tasks averaged more than ``cores - threads + 0.5`` during the row: the
  run's threads did not each have a core (OpenMP barriers stall on a descheduled thread);
* ``unstable``: the rounds disagree by more than ``SPREAD_LIMIT``;
* ``flip``: against another provider of the same row, this one was faster by more than
  ``FLIP_MARGIN`` in one round and slower by more than that in another.

The load is sampled by a thread every ``SAMPLE_S`` seconds from ``/proc/stat``: ``procs_running``
(the instantaneous count behind the load average) minus the running threads of this process and of
the processes it started (torch.compile's compile workers are the run's own work), plus
the CPUs stolen by the hypervisor since the last sample; the one-minute load average lags a job
started mid-run by a minute, this does not. Without ``/proc``
(not Linux) the load is not monitored and the run says so.
"""
from __future__ import annotations

import os
import statistics
import threading
import time

REPEATS = 3
#: rounds whose max/min exceeds 1 + this disagree. Measured on an idle 2-core VM (the README main
#: command's quick preset, 2 threads, 78 round triples): spread median 0.15, p90 0.41, p95 0.49, max 0.75;
#: the stalls a busy machine causes (OpenMP barriers) are 3x and more. 1.0 (a round twice another) parts them.
SPREAD_LIMIT = 1.0
FLIP_MARGIN = 0.10
SAMPLE_S = 0.05
FLAGS = ("busy", "unstable", "flip")


def _read_stat() -> tuple[int, int]:
    """(procs_running, steal jiffies summed over the CPUs) from /proc/stat."""
    running = steal = None
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu "):
                fields = line.split()
                steal = int(fields[8]) if len(fields) > 8 else 0
            elif line.startswith("procs_running"):
                running = int(line.split()[1])
    if running is None or steal is None:
        raise OSError("no procs_running in /proc/stat")
    return running, steal


def _running_threads(pid) -> int:
    n = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0  # the process ended
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                n += f.read().rpartition(")")[2].split()[0] == "R"
        except (OSError, IndexError):
            continue  # a thread that ended between listdir and open
    return n


def _children(pid) -> list[int]:
    """Child processes of ``pid`` (``/proc/<pid>/task/<tid>/children``; a scan of ``/proc`` where the
    kernel lacks that file)."""
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(k) for k in f.read().split()]
        return kids
    except FileNotFoundError:
        pass
    except OSError:
        return kids
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return kids


def _own_running() -> int:
    """Running threads of this process and of every process it started (torch.compile's compile
    workers, a provider's child process): the run's own demand for the CPU, not another job's."""
    n, todo, seen = 0, [os.getpid()], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        n += _running_threads(pid)
        todo += _children(pid)
    return n


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LoadMonitor:
    """Samples the other processes' runnable tasks in a daemon thread; ``other(t0, t1)`` is their
    mean over the samples taken between two ``time.perf_counter()`` readings."""

    def __init__(self, threads: int, interval: float = SAMPLE_S):
        self.threads, self.interval, self.cores = threads, interval, cores()
        self.limit = self.cores - threads + 0.5
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = None
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        try:
            self._last = (time.perf_counter(), _read_stat()[1])
            _own_running()
            self.available = True
        except (OSError, ValueError):
            self.available = False

    def sample(self):
        """Other processes' runnable tasks now, plus the CPUs the hypervisor took since the last
        sample (steal time: a virtual machine's neighbours, invisible to procs_running)."""
        try:
            now, (running, steal) = time.perf_counter(), _read_stat()
            t_last, steal_last = self._last
            stolen = (steal - steal_last) / self._hz / max(now - t_last, 1e-3)
            self._last = (now, steal)
            self.samples.append((now, max(0, running - _own_running()) + max(0.0, stolen)))
        except (OSError, ValueError):
            pass

    def start(self):
        if self.available and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="bench-load-monitor", daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def other(self, t0: float, t1: float) -> float | None:
        vals = [v for t, v in self.samples if t0 <= t <= t1]
        return statistics.fmean(vals) if vals else None

    def other_in(self, windows) -> float | None:
        """Mean over the samples of several windows (a row's rounds)."""
        vals = [v for t, v in self.samples if any(t0 <= t <= t1 for t0, t1 in windows)]
        return statistics.fmean(vals) if vals else None

    def summary(self) -> dict:
        vals = [v for _, v in self.samples]
        if not self.available:
            return {"monitored": False, "why": "no /proc/stat (not Linux): the load was not monitored"}
        return {"monitored": True, "cores": self.cores, "threads": self.threads, "limit": self.limit,
                "samples": len(vals), "interval_s": self.interval,
                "mean_other": round(statistics.fmean(vals), 2) if vals else None,
                "max_other": None if not vals else round(max(vals), 2),
                "busy_fraction": round(sum(v > self.limit for v in vals) / len(vals), 3) if vals else None}


def record(row: dict, median_us: float):
    """One round of ``row``: its median time joins the others; the row's time is their median."""
    row["rep_us"].append(float(median_us))
    row["median_us"] = float(statistics.median(row["rep_us"]))


def finish_row(row: dict, other_load: float | None, limit: float):
    reps = row["rep_us"]
    row["spread"] = (max(reps) / min(reps) - 1.0) if reps and min(reps) > 0 else None
    row["other_load"] = None if other_load is None else round(float(other_load), 2)
    flags = set(row["flags"])
    if other_load is not None and other_load > limit:
        flags.add("busy")
    if row["spread"] is not None and row["spread"] > SPREAD_LIMIT:
        flags.add("unstable")
    row["flags"] = [f for f in FLAGS if f in flags]


def flag_flips(pairs: list[tuple[dict, list]]):
    """``flip`` on every two rows (providers of one row key) whose order flips between rounds.
    ``pairs``: (row, its times in this phase's rounds, round by round)."""
    pairs = [(r, ts) for r, ts in pairs if len(ts) > 1]
    for i, (a, ta) in enumerate(pairs):
        for b, tb in pairs[i + 1:]:
            ratios = [x / y for x, y in zip(ta, tb) if y > 0]
            if any(q < 1 - FLIP_MARGIN for q in ratios) and any(q > 1 + FLIP_MARGIN for q in ratios):
                for r in (a, b):
                    if "flip" not in r["flags"]:
                        r["flags"] = [f for f in FLAGS if f in {*r["flags"], "flip"}]


def rotated(items: list, k: int) -> list:
    """``items`` rotated left by ``k``: round k's order."""
    if not items:
        return []
    k %= len(items)
    return items[k:] + items[:k]


def verdict(rows: list[dict], load: dict) -> dict:
    """The run's trust statement: counts of flagged rows and one sentence for the top of bench.md
    (None when nothing was flagged and the load was monitored)."""
    measured = [r for r in rows if r.get("status") == "ok" and r.get("rep_us")]
    counts = {f: sum(f in (r.get("flags") or []) for r in measured) for f in FLAGS}
    flagged = sum(bool(r.get("flags")) for r in measured)
    out = {"rows": len(measured), "flagged": flagged, **counts, "trusted": True, "statement": None}
    if counts["busy"]:
        out["trusted"] = False
        out["statement"] = (f"This run cannot be trusted: the machine was busy during {counts['busy']} of "
                            f"{len(measured)} rows (other runnable tasks up to {load.get('max_other')} on "
                            f"{load.get('cores')} cores, {load.get('threads')} bench threads); rerun on an idle "
                            "machine or compare same-round ratios only.")
    elif flagged:
        out["trusted"] = flagged <= max(1, len(measured) // 10)
        out["statement"] = (f"{'This run cannot be trusted: ' if not out['trusted'] else ''}{flagged} of "
                            f"{len(measured)} rows have rounds that disagree (unstable {counts['unstable']}, "
                            f"order flips {counts['flip']}); their times are noise, see the flags in the tables.")
    elif not load.get("monitored", False):
        out["statement"] = f"Load not monitored ({load.get('why', 'disabled')}): a busy machine would go unnoticed."
    return out
