#!/usr/bin/env bash
# normkit issue 13: the GPU goals answered in ONE call of the device tool (one H200, torch 2.11 / Triton 3.6, no
# network), in at most 8 minutes.
#
# The device call, from a session whose task has a GPU lent (the tool's `status`: can_start_another is true):
#
#     make gpu-wheels                                                   # here, once: the Liger-Kernel wheel
#     run(command="bash benchmarks/gpu_check.sh", timeout_s=540, carry=[".gpu-wheels"])
#
#   - carry: .gpu-wheels only (liger-kernel, no dependencies; without it the Liger-Kernel baseline is skipped with a
#     clear line). Do NOT carry .venv: the device's python3 (/opt/torch/.venv: torch, triton, numpy, pytest) runs
#     everything; normkit is read from src/ through PYTHONPATH; the wheel goes into a temporary folder on it.
#   - timeout_s=540: the script stops itself after GPU_CHECK_SECONDS (480) with a global `timeout`; the benchmark
#     sizes itself to that, and rewrites its report after every check and case, so a cut leaves every number so far.
#     Call give_back right after, unless a second run follows at once.
#
# What it does, in order: the environment ($OUT/env.txt); the Liger-Kernel wheel installed if carried;
# benchmarks/bench_gpu.py with NORMKIT_TUNE=check (autotune with at most 2 candidates): 17 GPU-only correctness
# checks first, then the goal shapes, most important first, each timed by CUDA events in interleaved rounds and by
# CUDA-graph replay, its compile/tune time (first call) printed apart; report in $OUT/gpu-bench.md and .json (goals
# as PASS/FAIL, a suggested CUDA_PLAN under "cuda_plan"); then, if over 60 s are left, the kernel tests on the GPU
# ($OUT/pytest-gpu.log). All output also in $OUT/gpu-check.log; it ends with the goals, so the reply's tail has them.
# Exit status: non-zero if a check failed, a case raised, or the tests failed.
#
# Dry run (no GPU, this repository's CPU machine): the same script end to end under TRITON_INTERPRET=1, tiny
# shapes, time.perf_counter instead of CUDA events and graphs, torch.compile's "eager" backend, no GPU tests:
#     bash benchmarks/gpu_check.sh --dry-run           # or GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh
#     bash benchmarks/gpu_check.sh --dry-run --smoke   # 1 check and 2 cases (tests/test_bench_gpu.py)
#
# Knobs: OUT (./gpu-check-out), GPU_CHECK_SECONDS (480; dry run 180), GPU_BENCH_ARGS (extra bench_gpu.py arguments,
# e.g. --skip-compile, --no-graphs), PYTHON (python3; dry run .venv/bin/python when present), NORMKIT_TUNE (check).

set -euo pipefail

dry=${GPU_CHECK_DRY_RUN:-}
smoke=
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry=1 ;;
        --smoke) smoke=1 ;;
        *) echo "gpu_check.sh: unknown argument $arg (expected --dry-run, --smoke)" >&2; exit 2 ;;
    esac
done
if [ -n "$dry" ]; then TOTAL=${GPU_CHECK_SECONDS:-180}; else TOTAL=${GPU_CHECK_SECONDS:-480}; fi

if [ -z "${GPU_CHECK_INNER:-}" ]; then
    # Re-run this script under one global timeout; TERM reaches the whole process group, KILL 20 s later.
    export GPU_CHECK_INNER=1 GPU_CHECK_START
    GPU_CHECK_START=$(date +%s)
    exec timeout --kill-after=20 "$TOTAL" bash "$0" "$@"
fi

cd "$(dirname "$0")/.."
if [ -n "$dry" ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" NORMKIT_TUNE=${NORMKIT_TUNE:-check}
unset TRITON_INTERPRET NORMKIT_BACKEND  # real kernels on the real GPU; bench_gpu.py asks for the Triton backend
[ -n "$dry" ] && export TRITON_INTERPRET=1
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
tee_pid=$!

elapsed() { echo $(( $(date +%s) - GPU_CHECK_START )); }
say() { printf '\n=== [%4ss] %s\n' "$(elapsed)" "$*"; }

say "environment${dry:+ (DRY RUN: CPU, Triton interpreter, tiny shapes; nothing here is a GPU number)}"
{
    date -u '+%Y-%m-%d %H:%M:%S UTC'
    uname -a
    if [ -z "$dry" ]; then
        nvidia-smi || echo "nvidia-smi failed"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
            --format=csv || true
    fi
    echo "NORMKIT_TUNE=$NORMKIT_TUNE TRITON_INTERPRET=${TRITON_INTERPRET:-} python=$PY"
    "$PY" - <<'EOF'
import platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not importable:", exc)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", torch.cuda.get_device_name(0), "| SMs", p.multi_processor_count, "| memory GiB",
          round(p.total_memory / 2**30, 1), "| L2 MiB", getattr(p, "L2_cache_size", 0) / 2**20)
import normkit
print("normkit", normkit.__version__, "from", normkit.__file__)
EOF
} 2>&1 | tee "$OUT/env.txt"
[ -n "$dry" ] || "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "no CUDA device visible to $PY: stopping (nothing here can be measured)"
    exit 2
}

say "Liger-Kernel (the LayerNorm baseline)"
liger_dir=
shopt -s nullglob
wheels=(.gpu-wheels/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    liger_dir=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-wheels.XXXXXX")
    trap 'rm -rf "$liger_dir"' EXIT
    # pip when the device's python has it; a wheel is a zip, so unpacking it is the same install without pip.
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-index --target "$liger_dir" "${wheels[@]}" \
        || for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$liger_dir"; done
    export PYTHONPATH="$PYTHONPATH:$liger_dir"  # after src/: nothing in it can shadow normkit, torch or triton
    echo "installed ${wheels[*]} (no dependencies) into $liger_dir"
else
    echo "SKIPPED: no .gpu-wheels/*.whl (run \`make gpu-wheels\` on the networked machine and carry=[\".gpu-wheels\"]);"
    echo "the LayerNorm vs Liger-Kernel goal will read NOT MEASURED"
fi

# The benchmark gets the global limit less what has run, less 50 s for its imports, the end-of-run copy, the report
# and the summary.
budget=$(( TOTAL - $(elapsed) - 50 ))
[ "$budget" -lt 30 ] && budget=30
bench_args=(--budget-s "$budget" --out "$OUT/gpu-bench.md")
[ -n "$dry" ] && bench_args+=(--device cpu --dry-run)
[ -n "$smoke" ] && bench_args+=(--smoke)
# shellcheck disable=SC2206  # GPU_BENCH_ARGS is a word list on purpose
bench_args+=(${GPU_BENCH_ARGS:-})
say "benchmark: $PY benchmarks/bench_gpu.py ${bench_args[*]}"
bench_rc=0
"$PY" benchmarks/bench_gpu.py "${bench_args[@]}" || bench_rc=$?
echo "bench_gpu.py exit status: $bench_rc (0 ok, 1 a check failed or a case raised, 2 could not start)"

test_rc=0
left=$(( TOTAL - $(elapsed) - 20 ))
if [ -n "$dry" ]; then
    say "GPU tests: skipped (dry run)"
elif [ "$left" -lt 60 ]; then
    say "GPU tests: skipped (${left}s left)"
else
    tests=()
    for f in tests/test_*kernel*.py tests/test_*triton*.py tests/test_*cuda*.py; do tests+=("$f"); done
    say "GPU tests with the ${left}s left: ${tests[*]:-none found}"
    if [ ${#tests[@]} -gt 0 ]; then
        timeout "$left" "$PY" -m pytest "${tests[@]}" -q -x -rfEs -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.log" \
            || test_rc=$?
        [ "$test_rc" -eq 124 ] && echo "GPU TESTS CUT OFF after ${left}s (not a failure of the kernels by itself)" \
            && test_rc=0
    fi
fi

say "summary (report: \$OUT/gpu-bench.md and gpu-bench.json; log: \$OUT/gpu-check.log)"
if [ -f "$OUT/gpu-bench.md" ]; then
    grep -E '^- (device|date|torch|copy)' "$OUT/gpu-bench.md" || true
    grep -E '^[0-9]+ of [0-9]+ checks passed|\*\*FAIL\*\*|\*\*error\*\*' "$OUT/gpu-bench.md" | head -30 || true
    grep -E '^Measured [0-9]+ of' "$OUT/gpu-bench.md" || true
    sed -n '/^## Goals/,/^## Correctness/p' "$OUT/gpu-bench.md" | sed '$d'
fi
echo "bench: $bench_rc, tests: $test_rc, total $(elapsed)s"
status=0
{ [ "$bench_rc" -eq 0 ] && [ "$test_rc" -eq 0 ]; } || status=1
exec >&- 2>&-  # let tee write out the last lines before the script exits
wait "$tee_pid" 2>/dev/null || true
exit "$status"
