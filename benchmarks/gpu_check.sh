#!/usr/bin/env bash
# GPU validation in one run (the protocol: GPU.md; what the outputs mean: benchmarks/README.md).
#
#   benchmarks/gpu_check.sh RESULTS_DIR
#   benchmarks/gpu_check.sh --pack "$OUT"     # on the GPU machine (it returns at most 8 files)
#
# --pack OUT_DIR: the results folder is built in a temporary place and OUT_DIR receives exactly two
# files: gpu_check.tar.gz (the whole folder, top directory gpu_check/) and summary.txt. Unpack
# here with `mkdir -p DIR && tar xzf gpu_check.tar.gz -C DIR --strip-components=1`.
#
# Writes at most 12 files into RESULTS_DIR: env.json, ptxas.txt, bench.json, bench.md, bench.png
# (the `targets` preset: the rows the GPU issues name, run right after the build), pytest.log,
# sanitizer.log, gpu/bench.{json,md,png} (the broad `gpu` preset with the time left),
# evidence.md (benchmarks/gpu_evidence.py: occupancy from the build's registers, the model of
# docs/CUDA.md next to this run's times, also written into bench.md) and summary.txt (printed last). Every step has a time cap taken from one overall budget
# (GPU_CHECK_BUDGET_S, default 470 s), a failing step does not stop the ones after it, and
# summary.txt records each step's status. Scratch files (the full build log, the benchmark
# consoles) live in a temporary folder and are not returned.
#
# Switches (local dry runs): GPU_CHECK_PYTHON=/path/python, GPU_CHECK_SKIP_BUILD=1, GPU_CHECK_SKIP_PYTEST=1,
# GPU_CHECK_SKIP_SANITIZER=1, GPU_CHECK_SKIP_EVIDENCE=1, GPU_CHECK_TARGETS_ARGS="--preset targets", GPU_CHECK_BENCH_ARGS="--preset gpu"
# (the two bench runs' arguments; GPU_CHECK_SKIP_TARGETS=1 / GPU_CHECK_SKIP_BENCH=1 skip them),
# CMPE_SE_COMMIT=<sha> (recorded when the tree has no .git).
set -u

PACK_DIR=""
if [ "${1:-}" = "--pack" ]; then
    if [ $# -lt 2 ] || [ -z "$2" ]; then
        echo "usage: $0 RESULTS_DIR | $0 --pack OUT_DIR" >&2
        exit 2
    fi
    mkdir -p "$2" || exit 2
    PACK_DIR=$(cd "$2" && pwd)
    PACK_TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_pack.XXXXXX")
    set -- "$PACK_TMP/gpu_check"
fi
if [ $# -lt 1 ] || [ -z "$1" ]; then
    echo "usage: $0 RESULTS_DIR | $0 --pack OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}
BENCH_MIN=${GPU_CHECK_BENCH_MIN_S:-160}       # reserved for the benchmarks (targets, then gpu)
TARGETS_T=${GPU_CHECK_TARGETS_S:-130}          # cap of the targets benchmark
SANITIZER_MIN=${GPU_CHECK_SANITIZER_MIN_S:-70}  # reserved for compute-sanitizer (4 runs)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
STEPS="$SCRATCH/steps.txt"
: > "$STEPS"
export PYTHONUNBUFFERED=1 CMPE_SE_BENCH_NO_PROGRESS=1

PY=${GPU_CHECK_PYTHON:-}
for cand in python python3; do
    [ -n "$PY" ] && break
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY=$cand; break; fi
done
[ -n "$PY" ] || PY=$(command -v python3 || command -v python || echo python3)

elapsed() { echo $(( $(date +%s) - START )); }
# cap WANTED RESERVE: seconds a step may take so that RESERVE seconds stay for the steps after it
cap() {
    local left=$(( BUDGET - $(elapsed) - $2 ))
    [ "$left" -gt "$1" ] && left=$1
    [ "$left" -lt 15 ] && left=15
    echo "$left"
}
# record NAME STATUS SECONDS NOTE
record() { printf '%-12s %-10s %5ss  %s\n' "$1" "$2" "$3" "$4" >> "$STEPS"; }
status_of() {  # rc -> ok / TIMEOUT / FAIL(rc)
    case "$1" in 0) echo ok ;; 124|137) echo TIMEOUT ;; *) echo "FAIL($1)" ;; esac
}
# step NAME CAP LOG CMD...: run with a time cap, append to LOG; sets LAST_RC, LAST_S (the
# caller records the status with a note)
step() {
    local name=$1 t=$2 log=$3; shift 3
    local t0; t0=$(date +%s)
    echo "== $name (cap ${t}s): $*" | tee -a "$log" >&2
    timeout -k 15 "$t" "$@" >> "$log" 2>&1
    LAST_RC=$?
    LAST_S=$(( $(date +%s) - t0 ))
    if [ "$LAST_RC" -eq 124 ] || [ "$LAST_RC" -eq 137 ]; then echo "== $name: TIMEOUT after ${t}s" >> "$log"; fi
}
# done_step NAME NOTE: record the last step's status
done_step() { record "$1" "$(status_of "$LAST_RC")" "$LAST_S" "$2"; }
LAST_RC=0
LAST_S=0

# ---- 1. environment -------------------------------------------------------------------------
NVSMI="$SCRATCH/nvidia-smi.txt"
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi > "$NVSMI" 2>&1
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu,compute_mode \
        --format=csv > "$SCRATCH/nvidia-smi.csv" 2>&1
else
    echo "nvidia-smi not found" > "$NVSMI"; : > "$SCRATCH/nvidia-smi.csv"
fi
step env 60 "$SCRATCH/env.log" "$PY" - "$OUT/env.json" "$NVSMI" "$SCRATCH/nvidia-smi.csv" "$ROOT" <<'EOF'
import importlib.util, json, os, platform, shutil, subprocess, sys
out, smi, smi_csv, root = sys.argv[1:5]
env = {"python": sys.executable, "python_version": platform.python_version(), "host": platform.node()}
for mod in ("torch", "triton", "numpy"):
    try:
        env[mod] = __import__(mod).__version__
    except Exception as exc:  # noqa: BLE001
        env[mod] = f"unavailable: {exc}"
try:
    import torch
    env["torch_cuda"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gb": round(p.total_memory / 2**30, 1),
                      "sms": p.multi_processor_count, "l2_mb": round(getattr(p, "L2_cache_size", 0) / 2**20, 1)}
except Exception as exc:  # noqa: BLE001
    env["torch_error"] = str(exc)
for tool in ("nvcc", "compute-sanitizer", "ncu", "ninja"):
    path = shutil.which(tool)
    env[tool] = path
    if tool == "nvcc" and path:
        env["nvcc_version"] = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:]
# the same hash and commit as bench.json (envinfo.py loaded by path: no package import needed)
spec = importlib.util.spec_from_file_location("envinfo", os.path.join(root, "cmpe_se_fused/bench/envinfo.py"))
try:
    envinfo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(envinfo)
    env["git"] = envinfo.git_info(root)
    env["kernel_hash"] = envinfo.kernel_hash(root)
    env["kernel_files"] = envinfo.kernel_files(root)
except Exception as exc:  # noqa: BLE001
    env["envinfo_error"] = str(exc)
env["nvidia_smi"] = open(smi).read()
env["nvidia_smi_csv"] = open(smi_csv).read()
env["env"] = {k: os.environ.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "CUDA_HOME", "CUDA_VISIBLE_DEVICES")}
json.dump(env, open(out, "w"), indent=1)
print("env.json written")
EOF
done_step env "python=$PY"

# ---- 2. build for sm_90, ptxas report -------------------------------------------------------
BUILD_LOG="$SCRATCH/build.log"
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
    record build SKIP 0 "GPU_CHECK_SKIP_BUILD=1"
    echo "build skipped (GPU_CHECK_SKIP_BUILD=1)" > "$OUT/ptxas.txt"
else
    export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} FORCE_CUDA=1
    step build "$(cap 240 $((BENCH_MIN + SANITIZER_MIN + 60)))" "$BUILD_LOG" \
        "$PY" -m pip install -v --no-build-isolation --no-deps -e .
    done_step build "pip install -e . (sm_90)"
    if [ "$LAST_RC" -ne 0 ] && ! grep -q nvcc "$BUILD_LOG"; then
        # pip itself failed before compiling anything: build in place with setup.py
        step build-inpl "$(cap 200 $((BENCH_MIN + SANITIZER_MIN + 60)))" "$BUILD_LOG" \
            "$PY" setup.py build_ext --inplace
        done_step build-inpl "fallback: pip failed before compiling"
    fi
    {
        echo "# ptxas -v resource report (TORCH_CUDA_ARCH_LIST=9.0), from the build log"
        n_fn=$(grep -c "Compiling entry function" "$BUILD_LOG")
        echo "# entry functions: $n_fn; max registers: $(grep -o 'Used [0-9]* registers' "$BUILD_LOG" | awk '{print $2}' | sort -n | tail -1)"
        echo "# nonzero spill lines: $(grep -E 'bytes spill' "$BUILD_LOG" | grep -cvE '0 bytes spill stores, 0 bytes spill loads')"
        echo "# nonzero stack frames: $(grep -E 'bytes stack frame' "$BUILD_LOG" | grep -cv '^ *0 bytes stack frame')"
        grep -E "ptxas|bytes stack frame|spill stores" "$BUILD_LOG" | sed -e "s/'//g" | { command -v c++filt >/dev/null && c++filt || cat; }
        echo "# --- build log tail ---"
        tail -n 25 "$BUILD_LOG"
    } > "$OUT/ptxas.txt" 2>&1
fi
EXT_OUT=$(timeout 120 "$PY" -c "import cmpe_se_fused.ops as o; print(';'.join(f'{k}={v or \"loaded\"}' for k, v in o.EXTENSION_STATUS.items()))" 2>&1)
EXT_RC=$?
if [ "$EXT_RC" -eq 0 ]; then
    record extensions ok 0 "$(echo "$EXT_OUT" | tail -1)"
else  # e.g. an abort while loading the extensions: keep the first error line
    record extensions "FAIL($EXT_RC)" 0 "import cmpe_se_fused.ops: $(echo "$EXT_OUT" | grep -m1 -E 'Error|error|Mismatch|what' | cut -c1-240)"
fi

# ---- 3. the targets benchmark (the issues' rows, before anything can eat the budget) ---------
if [ "${GPU_CHECK_SKIP_TARGETS:-0}" = 1 ]; then
    record targets SKIP 0 "GPU_CHECK_SKIP_TARGETS=1"
else
    T_CAP=$(cap "$TARGETS_T" $((SANITIZER_MIN + 60)))
    # shellcheck disable=SC2086  # GPU_CHECK_TARGETS_ARGS is a word list on purpose
    step targets "$T_CAP" "$SCRATCH/targets.log" \
        "$PY" -m cmpe_se_fused.bench ${GPU_CHECK_TARGETS_ARGS:---preset targets} --out "$OUT" --budget-s $(( T_CAP - 25 ))
    done_step targets "--preset targets; $(grep -c '"status": "ok"' "$OUT/bench.json" 2>/dev/null) ok rows"
    rm -f "$OUT"/*.tmp
fi

# ---- 4. GPU tests ---------------------------------------------------------------------------
if [ "${GPU_CHECK_SKIP_PYTEST:-0}" = 1 ]; then
    record pytest SKIP 0 "GPU_CHECK_SKIP_PYTEST=1"; echo "skipped" > "$OUT/pytest.log"
else
    step pytest "$(cap 240 $((SANITIZER_MIN + 40)))" "$OUT/pytest.log" \
        "$PY" -m pytest -m cuda --maxfail=25 -q -p no:cacheprovider tests
    done_step pytest "$(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/pytest.log" | tail -1 | tr -d '=' | sed 's/^ *//')"
fi

# ---- 5. compute-sanitizer memcheck + racecheck ----------------------------------------------
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo "")
SAN_LOG="$OUT/sanitizer.log"
if [ "${GPU_CHECK_SKIP_SANITIZER:-0}" = 1 ]; then
    record sanitizer SKIP 0 "GPU_CHECK_SKIP_SANITIZER=1"; echo "skipped" > "$SAN_LOG"
elif [ ! -f benchmarks/cuda_sanitize.py ]; then
    record sanitizer SKIP 0 "benchmarks/cuda_sanitize.py does not exist"; echo "no benchmarks/cuda_sanitize.py" > "$SAN_LOG"
elif [ -z "$SAN" ]; then
    record sanitizer SKIP 0 "compute-sanitizer not found"; echo "compute-sanitizer not found" > "$SAN_LOG"
else
    : > "$SAN_LOG"
    # memcheck: every case; racecheck (slow): the script's --quick subset (fp32, two shapes, every
    # mode and layout); then both again on the resident forward (CMPE_SE_CUDA_PATH=resident, --quick)
    for run in memcheck racecheck memcheck-res racecheck-res; do
        tool=${run%-res}
        SAN_ARGS=""; [ "$tool" = racecheck ] && SAN_ARGS="--quick"
        CUDA_PATH_ENV="CMPE_SE_CUDA_PATH=persistent"
        case "$run" in *-res) CUDA_PATH_ENV="CMPE_SE_CUDA_PATH=resident"; SAN_ARGS="--quick" ;; esac
        # shellcheck disable=SC2086  # SAN_ARGS is empty or one word
        step "$run" "$(cap 90 30)" "$SAN_LOG" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$CUDA_PATH_ENV" \
            "$SAN" --tool "$tool" --error-exitcode 99 --print-limit 50 "$PY" benchmarks/cuda_sanitize.py $SAN_ARGS
        done_step "$run" "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$SAN_LOG" | tail -1 | sed 's/^=* *//')"
    done
fi

# ---- 6. the broad benchmark with the time left ------------------------------------------------
BENCH_T=$(cap 400 10)
BENCH_BUDGET=$(( BENCH_T - 30 ))
if [ "${GPU_CHECK_SKIP_BENCH:-0}" = 1 ]; then
    record bench SKIP 0 "GPU_CHECK_SKIP_BENCH=1"
elif [ "$BENCH_BUDGET" -lt 30 ]; then
    record bench SKIP 0 "only ${BENCH_T}s left of the budget"
else
    mkdir -p "$OUT/gpu"
    # shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a word list on purpose
    step bench "$BENCH_T" "$SCRATCH/bench.log" \
        "$PY" -m cmpe_se_fused.bench ${GPU_CHECK_BENCH_ARGS:---preset gpu} --out "$OUT/gpu" --budget-s "$BENCH_BUDGET"
    done_step bench "gpu/; --budget-s ${BENCH_BUDGET}; $(grep -c '"status": "ok"' "$OUT/gpu/bench.json" 2>/dev/null) ok rows"
    rm -f "$OUT"/gpu/*.tmp
fi

# ---- 7. evidence: kernel resources from the .so, occupancy, the model vs this run's numbers ---
if [ "${GPU_CHECK_SKIP_EVIDENCE:-0}" = 1 ]; then
    record evidence SKIP 0 "GPU_CHECK_SKIP_EVIDENCE=1"
else
    # bytes, coalescing and the Triton bytes come from the CPU emulator / Triton's interpreter (no
    # GPU needed: run them at home); --bench-md puts the model next to bench.md's cuda rows
    step evidence "$(cap 90 0)" "$OUT/evidence.md" \
        "$PY" benchmarks/gpu_evidence.py --skip bytes,small,sectors,triton --measured "$OUT" --bench-md
    done_step evidence "evidence.md: occupancy from cuobjdump, model vs measured (also in bench.md)"
fi

# ---- 8. summary -----------------------------------------------------------------------------
{
    echo "gpu_check.sh  $(date -u +%Y-%m-%dT%H:%M:%SZ)  total $(elapsed)s of budget ${BUDGET}s"
    echo "gpu: $(head -2 "$SCRATCH/nvidia-smi.csv" 2>/dev/null | tail -1)"
    echo "python: $PY  commit: $(grep -o '"short": *"[0-9a-f]*"' "$OUT/env.json" 2>/dev/null | head -1 | grep -o '[0-9a-f]\{7,\}')"
    echo
    echo "step         status      time   note"
    cat "$STEPS"
    echo
    for md in "$OUT/bench.md" "$OUT/gpu/bench.md"; do
        if [ -f "$md" ]; then
            echo "### ${md#"$OUT"/}"
            awk '/^## /{p = ($0 ~ /^## (Summary|Launch variants|End to end)/)} p' "$md"
            grep -E "^- (MISMATCH|run interrupted|layer .* error|e2e .* error)" "$md" | head -20
        fi
    done
    if [ ! -f "$OUT/bench.md" ] && [ -f "$SCRATCH/targets.log" ]; then
        echo "no bench.md; targets console tail:"
        tail -n 30 "$SCRATCH/targets.log"
    fi
    if grep -q "FAIL\|TIMEOUT" "$STEPS"; then
        echo
        echo "failed step logs (tails):"
        grep -q "^build .*FAIL" "$STEPS" && { echo "--- build"; tail -n 20 "$BUILD_LOG"; }
        grep -q "^targets .*FAIL" "$STEPS" && { echo "--- targets"; tail -n 20 "$SCRATCH/targets.log"; }
        grep -q "^bench .*FAIL" "$STEPS" && { echo "--- bench"; tail -n 20 "$SCRATCH/bench.log"; }
        grep -q "^env .*FAIL" "$STEPS" && { echo "--- env"; tail -n 10 "$SCRATCH/env.log"; }
    fi
    if [ -n "$PACK_DIR" ]; then
        echo
        echo "packed: $PACK_DIR/gpu_check.tar.gz ($(find "$OUT" -type f | wc -l) files + this summary);" \
             "unpack: mkdir -p DIR && tar xzf gpu_check.tar.gz -C DIR --strip-components=1"
    fi
} > "$OUT/summary.txt" 2>&1
rm -rf "$SCRATCH"
if [ -n "$PACK_DIR" ]; then
    # The GPU machine returns at most 8 files from $OUT (GPU.md): one archive of the whole results
    # folder (gpu/ included) plus summary.txt beside it.
    tar czf "$PACK_DIR/gpu_check.tar.gz" -C "$(dirname "$OUT")" "$(basename "$OUT")" \
        || echo "packing failed" >> "$OUT/summary.txt"
    cp "$OUT/summary.txt" "$PACK_DIR/summary.txt"
    rm -rf "$PACK_TMP"
    cat "$PACK_DIR/summary.txt"
else
    cat "$OUT/summary.txt"
fi
exit 0
