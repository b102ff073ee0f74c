#!/usr/bin/env bash
# normkit issue 8: the whole GPU check in ONE call of the device tool (bare H100/H200 machine, no network).
#
# The call, from a session whose task has a GPU lent (the tool's `status`: can_start_another is true):
#
#     run(command="bash benchmarks/gpu_check.sh", timeout_s=540)          # no carry, no kind
#
#   - carry: nothing. Do NOT carry .venv: it is a CPU-only torch for this machine's Python; the device machine's
#     own python3 (/opt/torch/.venv, Python 3.12, torch 2.11+cu130, triton 3.6.0 per the device tool's KINDS.md,
#     2026-11) has every package the kernels, the tests and the benchmark import. normkit itself is read from
#     src/ through PYTHONPATH (tracked files travel with the working tree); nothing is installed.
#   - timeout_s=540: the script stops itself after GPU_CHECK_SECONDS (default 480 s, a global `timeout`), and the
#     benchmark sizes itself to what is left after the tests, so the call ends in about 8 minutes plus a margin.
#     With the machine's start (1-2 min) that is ~10 of the session's 15 device minutes.
#   - a second, shorter run (e.g. after a kernel fix) fits the rest of the budget only on the still-warm machine
#     (it stays warm 30 s after a call; a fresh start costs 1-2 min and none starts under 4 min left):
#         run(command="GPU_CHECK_SECONDS=220 GPU_TEST_SECONDS=60 GPU_BENCH_ARGS=--quick bash benchmarks/gpu_check.sh",
#             timeout_s=260)
#     Otherwise call give_back right after the first run.
#
# What it does: prints the environment (nvidia-smi, versions) to $OUT/env.txt; runs the GPU-relevant tests (the
# kernel tests, on the real GPU: no TRITON_INTERPRET) to $OUT/pytest-gpu.log; runs benchmarks/bench_gpu.py
# (correctness on the GPU first, then the suite within the time left) to $OUT/gpu-bench.md and .json. Everything
# it prints is also in $OUT/gpu-check.log. It ends with the correctness summary and the targets, so the reply's
# output tail carries them. Exit status: non-zero if the tests or the benchmark failed (both always run).
#
# Knobs: GPU_CHECK_SECONDS (480), GPU_TEST_SECONDS (150, the cap on the test step), GPU_BENCH_ARGS (extra
# bench_gpu.py arguments, e.g. --skip-compile or --quick), PYTHON (python3), GPU_CHECK_DRY_RUN=1 (no GPU: the
# same steps on CPU under Triton's interpreter with bench_gpu.py --device cpu --smoke; checks this script only).

set -euo pipefail

if [ -z "${GPU_CHECK_INNER:-}" ]; then
    # Re-run this script under one global timeout; TERM reaches the whole process group, KILL 20 s later.
    export GPU_CHECK_INNER=1 GPU_CHECK_START
    GPU_CHECK_START=$(date +%s)
    exec timeout --kill-after=20 "${GPU_CHECK_SECONDS:-480}" bash "$0" "$@"
fi

cd "$(dirname "$0")/.."
TOTAL=${GPU_CHECK_SECONDS:-480}
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET NORMKIT_BACKEND  # real kernels on the real GPU, normkit's default dispatch
dry=${GPU_CHECK_DRY_RUN:-}
[ -n "$dry" ] && export TRITON_INTERPRET=1
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
tee_pid=$!

elapsed() { echo $(( $(date +%s) - GPU_CHECK_START )); }
say() { printf '\n=== [%4ss] %s\n' "$(elapsed)" "$*"; }

say "environment"
{
    date -u '+%Y-%m-%d %H:%M:%S UTC'
    uname -a
    nvidia-smi || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
        --format=csv || true
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

say "tests on the GPU (kernel tests without the interpreter)"
shopt -s nullglob
tests=()
for f in tests/test_*kernel*.py tests/test_*triton*.py tests/test_*gpu*.py tests/test_*cuda*.py; do
    [ "$f" = tests/test_bench_gpu.py ] && continue  # the CPU-interpreter smoke of the benchmark; it runs next, for real
    [[ " ${tests[*]} " == *" $f "* ]] || tests+=("$f")
done
parallel=()
"$PY" -c "import xdist" 2>/dev/null && parallel=(-n 4)
test_rc=0
if [ ${#tests[@]} -eq 0 ]; then
    echo "no kernel test files (tests/test_*kernel*.py, *triton*, *gpu*, *cuda*) found; selecting by keyword"
    timeout "${GPU_TEST_SECONDS:-150}" "$PY" -m pytest tests -q -rfEs -p no:cacheprovider "${parallel[@]}" \
        -k "cuda or triton or gpu or kernel" --continue-on-collection-errors 2>&1 | tee "$OUT/pytest-gpu.log" \
        || test_rc=$?
else
    echo "test files: ${tests[*]}"
    timeout "${GPU_TEST_SECONDS:-150}" "$PY" -m pytest "${tests[@]}" -q -rfEs -p no:cacheprovider "${parallel[@]}" \
        2>&1 | tee "$OUT/pytest-gpu.log" || test_rc=$?
fi
[ "$test_rc" -eq 124 ] && echo "TESTS CUT OFF by GPU_TEST_SECONDS=${GPU_TEST_SECONDS:-150}"
echo "pytest exit status: $test_rc"

# What is left for the benchmark: the global limit less what has run, less 45 s for the end-of-run copy
# measurement, the report and the summary below.
budget=$(( TOTAL - $(elapsed) - 45 ))
bench_args=()
[ -n "$dry" ] && bench_args+=(--device cpu --smoke)
if [ "$budget" -lt 90 ]; then
    echo "only ${budget}s left: quick set"
    bench_args+=(--quick)
    [ "$budget" -lt 30 ] && budget=30
fi
# shellcheck disable=SC2206  # GPU_BENCH_ARGS is a word list on purpose
bench_args+=(--budget-s "$budget" --out "$OUT/gpu-bench.md" ${GPU_BENCH_ARGS:-})
say "benchmark: $PY benchmarks/bench_gpu.py ${bench_args[*]}"
bench_rc=0
"$PY" benchmarks/bench_gpu.py "${bench_args[@]}" || bench_rc=$?
echo "bench_gpu.py exit status: $bench_rc (0 ok, 1 a correctness check failed or a case raised, 2 could not start)"

say "summary (full report: \$OUT/gpu-bench.md and gpu-bench.json; log: \$OUT/gpu-check.log)"
if [ -f "$OUT/gpu-bench.md" ]; then
    sed -n '1,12p' "$OUT/gpu-bench.md"
    grep -E '^[0-9]+ of [0-9]+ checks passed|\*\*FAIL\*\*|WARNING' "$OUT/gpu-bench.md" | head -40 || true
    sed -n '/^## Targets/,/^## Results/p' "$OUT/gpu-bench.md" | sed '$d'
    grep -E '^Measured [0-9]+ of' "$OUT/gpu-bench.md" || true
fi
echo "tests: $test_rc, bench: $bench_rc, total $(elapsed)s"
status=0
{ [ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]; } || status=1
exec >&- 2>&-  # let tee write out the last lines before the script exits
wait "$tee_pid" 2>/dev/null || true
exit "$status"
