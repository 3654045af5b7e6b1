#!/usr/bin/env python
"""Mutation check of the kernel tests (a developer tool, not part of CI).

Applies each plausible one-line bug of ``mutants.py`` to a scratch copy of the repository, builds
what the bug touches, runs the fast tests that guard that code (``-x``: stop at the first
failure) and prints whether the suite caught it. See docs/TESTING.md.

    python tests/mutation/run.py                     # every mutant
    python tests/mutation/run.py --kind cpu          # cpu | emu | triton (repeatable)
    python tests/mutation/run.py --only cpu-eps-train-hardcoded,tri-dx-over-C
    python tests/mutation/run.py --list              # the mutants, and check each applies once
    python tests/mutation/run.py --before e9c45bc    # also run the tests of an older commit

The scratch copy (default ``build/mutation``, git-ignored) persists between runs: the first CPU
build takes minutes, then each CPU mutant recompiles only its translation unit(s) (ninja; ccache is
used when installed, which makes restoring the original sources nearly free). The copy is synced
from the working tree (tracked and untracked-but-not-ignored files) at every start.

Kinds (what a mutant of each kind rebuilds and runs):
  cpu     csrc/cpu/*, csrc/*.cpp rebuild _C in the scratch copy; tests/test_cpu_kernels.py, test_ops.py,
                                test_infer.py (-k "not compile and not baseline_isa")
  emu     csrc/kernels/*.cuh    nothing to prebuild; tests/test_cuda.py -k emulated (the emulator)
  triton  cmpe_se_fused/*triton* nothing; tests/test_triton.py under TRITON_INTERPRET=1

A mutant is CAUGHT when the tests fail (or crash, or hang past --timeout), MISSED when they pass, and
BUILD-ERROR when it does not compile (a stillborn mutant, not counted). Before any mutant, the
unmutated sources must pass the same tests (the baseline), else the tool stops.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from mutants import MUTANTS  # noqa: E402

KINDS = {
    # (not the torch.compile tests, nor the baseline-ISA rerun in a subprocess: slow, and they test the
    # op layer / the build, not the kernel arithmetic, which both ISA builds share)
    "cpu": {"tests": ["test_cpu_kernels.py", "test_ops.py", "test_infer.py"],
            "args": ["-k", "not compile and not baseline_isa"],
            "env": {}},
    "emu": {"tests": ["test_cuda.py"], "args": ["-k", "emulated"], "env": {}},
    # (the interpreter is slow: the arithmetic tests only, not opcheck / determinism / the tuning sweep)
    "triton": {"tests": ["test_triton.py"], "args": ["-m", "not slow", "-k", "not opcheck and not sweep_configs and "
                                                     "not deterministic"], "env": {"TRITON_INTERPRET": "1"}},
}
SKIP_PARTS = {".git", ".venv", "build", "__pycache__", ".pytest_cache"}


def log(msg):
    print(msg, flush=True)


def repo_files(repo):
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, check=True,
                         capture_output=True).stdout.decode()
    files = [f for f in out.split("\0") if f]
    return [f for f in files if not (set(f.split("/")) & SKIP_PARTS) and os.path.isfile(os.path.join(repo, f))]


def write_if_changed(path, data):
    """Write only when the bytes differ: unchanged files keep their mtime (ninja stays incremental);
    changed ones get a fresh mtime (never an older one, which ninja would not rebuild)."""
    if os.path.exists(path):
        with open(path, "rb") as fh:
            if fh.read() == data:
                return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    return True


def sync(repo, scratch, before_ref):
    """Mirror the working tree into scratch (plus tests_before/ from ``before_ref``)."""
    manifest_path = os.path.join(scratch, ".mutation-manifest.json")
    old = set()
    if os.path.exists(manifest_path):
        with open(manifest_path) as fh:
            old = set(json.load(fh))
    files = {}
    for f in repo_files(repo):
        with open(os.path.join(repo, f), "rb") as fh:
            files[f] = fh.read()
    if before_ref:
        names = subprocess.run(["git", "ls-tree", "-r", "--name-only", before_ref, "tests/"], cwd=repo, check=True,
                               capture_output=True, text=True).stdout.split()
        for f in names:
            if f.startswith("tests/mutation/"):
                continue
            files["tests_before/" + f[len("tests/"):]] = subprocess.run(
                ["git", "show", f"{before_ref}:{f}"], cwd=repo, check=True, capture_output=True).stdout
    changed = sum(write_if_changed(os.path.join(scratch, f), data) for f, data in files.items())
    for f in old - set(files):
        p = os.path.join(scratch, f)
        if os.path.exists(p):
            os.remove(p)
    with open(manifest_path, "w") as fh:
        json.dump(sorted(files), fh)
    return changed


def base_env(scratch, jobs):
    env = dict(os.environ)
    env["PYTHONPATH"] = scratch + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["CMPE_SE_BUILD_ONLY"] = "cpu"
    env["MAX_JOBS"] = str(jobs)
    env.pop("CMPE_SE_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    return env  # torch.utils.cpp_extension puts ccache in front of the compiler when it is installed


def build_cpu(scratch, env, logfile):
    """Incremental build of _C in place (ninja recompiles only the changed translation units)."""
    t0 = time.time()
    with open(logfile, "a") as fh:
        res = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=scratch, env=env,
                             stdout=fh, stderr=subprocess.STDOUT, check=False)
    ok = res.returncode == 0 and any(f.startswith("_C.") and f.endswith(".so")
                                     for f in os.listdir(os.path.join(scratch, "cmpe_se_fused")))
    with open(logfile) as fh:  # TolerantBuildExtension reports a failed extension without failing setup.py
        ok = ok and "skipping cmpe_se_fused._C" not in fh.read()[-20000:]
    return ok, time.time() - t0


def run_tests(scratch, kind, env, tests_dir, timeout):
    spec = KINDS[kind]
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--tb=line", "-W", "ignore",
           *[os.path.join(tests_dir, t) for t in spec["tests"]], *spec["args"]]
    t0 = time.time()
    try:
        res = subprocess.run(cmd, cwd=scratch, env={**env, **spec["env"]}, capture_output=True, text=True,
                             timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0, f"no result after {timeout} s"
    out = res.stdout + res.stderr
    first = next((ln.strip() for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))), "")
    # a crash (killed by a signal: a mutant writing out of bounds) is a failure the tests showed
    status = "fail" if res.returncode < 0 else {0: "pass", 1: "fail"}.get(res.returncode, f"error{res.returncode}")
    if res.returncode < 0:
        return status, time.time() - t0, f"crashed (signal {-res.returncode})"
    if status.startswith("error"):
        first = out.strip().splitlines()[-1] if out.strip() else ""
    return status, time.time() - t0, first or (out.strip().splitlines()[-1] if out.strip() else "")


def same_tests(scratch, kind):
    """Whether tests/ and tests_before/ hold the same test files (and conftest) for this kind."""
    for f in KINDS[kind]["tests"] + ["conftest.py"]:
        a, b = os.path.join(scratch, "tests", f), os.path.join(scratch, "tests_before", f)
        if not (os.path.exists(a) and os.path.exists(b)):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            if fa.read() != fb.read():
                return False
    return True


def apply(scratch, m, mutate):
    path = os.path.join(scratch, m.file)
    with open(path) as fh:
        text = fh.read()
    src, dst = (m.old, m.new) if mutate else (m.new, m.old)
    n = text.count(src)
    if n != 1:
        raise SystemExit(f"mutant {m.id}: expected the text once in {m.file}, found it {n} times:\n{src}")
    with open(path, "w") as fh:
        fh.write(text.replace(src, dst))


def check_applies(repo, mutants):
    bad = []
    for m in mutants:
        with open(os.path.join(repo, m.file)) as fh:
            n = fh.read().count(m.old)
        if n != 1:
            bad.append(f"{m.id}: found {n} times in {m.file}")
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", action="append", choices=sorted(KINDS), help="only mutants of this kind")
    ap.add_argument("--only", default="", help="comma-separated mutant ids")
    ap.add_argument("--list", action="store_true", help="list the mutants (checks that each applies) and exit")
    ap.add_argument("--scratch", default=os.path.join(REPO, "build", "mutation"))
    ap.add_argument("--before", metavar="GIT_REF", help="also run the tests of GIT_REF on every mutant (score before)")
    ap.add_argument("--jobs", type=int, default=2, help="compile jobs (MAX_JOBS)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per test run; a hang counts as caught")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--skip-baseline", action="store_true", help="do not first run the tests on the unmutated code")
    args = ap.parse_args()

    mutants = [m for m in MUTANTS if (not args.kind or m.kind in args.kind)
               and (not args.only or m.id in args.only.split(","))]
    if args.only:
        unknown = set(args.only.split(",")) - {m.id for m in MUTANTS}
        if unknown:
            raise SystemExit(f"unknown mutant ids: {sorted(unknown)}")
    bad = check_applies(REPO, mutants)
    if args.list:
        for m in mutants:
            log(f"{m.id:32s} {m.kind:7s} {m.file}: {m.why}")
        log(f"{len(mutants)} mutants" + ("" if not bad else "; NOT APPLICABLE:\n  " + "\n  ".join(bad)))
        return 1 if bad else 0
    if bad:
        raise SystemExit("mutants that do not apply to the current sources:\n  " + "\n  ".join(bad))

    scratch = os.path.abspath(args.scratch)
    os.makedirs(scratch, exist_ok=True)
    changed = sync(REPO, scratch, args.before)
    log(f"scratch copy {scratch}: {changed} files updated")
    env = base_env(scratch, args.jobs)
    buildlog = os.path.join(scratch, "mutation-build.log")
    open(buildlog, "w").close()
    kinds = [k for k in KINDS if any(m.kind == k for m in mutants)]
    suites = [("after", "tests")] + ([("before", "tests_before")] if args.before else [])

    if "cpu" in kinds:
        ok, dt = build_cpu(scratch, env, buildlog)
        if not ok:
            raise SystemExit(f"the unmutated CPU build failed; see {buildlog}")
        log(f"baseline CPU build: {dt:.0f} s")
        where = subprocess.run([sys.executable, "-c", "import cmpe_se_fused._C as C; print(C.__file__)"],
                               cwd=scratch, env=env, capture_output=True, text=True, check=False).stdout.strip()
        if not where.startswith(scratch):
            raise SystemExit(f"the tests would import cmpe_se_fused._C from {where!r}, not the scratch copy")
    for kind in kinds if not args.skip_baseline else []:
        for name, tdir in suites:
            if name == "before" and same_tests(scratch, kind):
                continue
            status, dt, info = run_tests(scratch, kind, env, tdir, args.timeout)
            log(f"baseline {kind} tests ({name}): {status} in {dt:.0f} s {info if status != 'pass' else ''}")
            if status != "pass":
                raise SystemExit("the unmutated sources must pass the tests first")

    results = []
    # cheapest rebuilds first: the torch-free kernel headers, then forward.cpp / backward.cpp
    cost = lambda m: (list(KINDS).index(m.kind), not m.file.endswith("_impl.h"), m.file)  # noqa: E731
    for m in sorted(mutants, key=cost):
        apply(scratch, m, True)
        row = {"id": m.id, "kind": m.kind, "file": m.file, "why": m.why}
        try:
            built = True
            if m.kind == "cpu":
                built, dt = build_cpu(scratch, env, buildlog)
                row["build_s"] = round(dt)
            for name, tdir in suites:
                if not built:
                    row[name] = "build-error"
                    continue
                if name == "before" and same_tests(scratch, m.kind):  # same test files: same verdict
                    row[name], row[name + "_s"], row[name + "_by"] = row["after"], 0, "(same tests as after)"
                    continue
                status, dt, info = run_tests(scratch, m.kind, env, tdir, args.timeout)
                row[name] = {"fail": "caught", "timeout": "caught", "pass": "missed"}.get(status, status)
                row[name + "_s"], row[name + "_by"] = round(dt), info
        finally:
            apply(scratch, m, False)
            if m.kind == "cpu":
                build_cpu(scratch, env, buildlog)  # back to the unmutated build (ccache: cheap)
        results.append(row)
        cols = "  ".join(f"{name}: {row[name].upper():8s}" for name, _ in suites)
        log(f"{m.id:32s} {cols}  {row.get('after_s', 0):4d} s  {row.get('after_by', '')[:110]}")

    log("")
    for name, _ in suites:
        done = [r for r in results if r[name] in ("caught", "missed")]
        caught = [r for r in done if r[name] == "caught"]
        missed = [r["id"] for r in done if r[name] == "missed"]
        other = [f"{r['id']} ({r[name]})" for r in results if r[name] not in ("caught", "missed")]
        log(f"score ({name}): {len(caught)}/{len(done)} caught" + (f"; missed: {', '.join(missed)}" if missed else "")
            + (f"; not counted: {', '.join(other)}" if other else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0 if all(r["after"] != "missed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
