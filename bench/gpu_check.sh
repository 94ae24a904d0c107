#!/usr/bin/env bash
# The GPU check, sized for one 15-minute GPU slot (machine start included). From the repo root:
#
#   bash bench/gpu_check.sh [--quick] [--dry-run] [LOG_DIR]          (LOG_DIR default: gpu-check/)
#
# Steps, each bounded by `timeout -s INT` (pytest then still prints its summary and writes its JUnit XML) and each
# printing its own time. The limits (full / --quick) add up to 5 and 3 minutes:
#   build      FASTSPLIT_CUDA_ARCHS=<this device> pip install -e .        60 / 60 s  (about 50 s on an H200)
#   info       fastsplit.build_info() -> build_info.json                   10 /  5 s
#   tests      the GPU selection (tests/gpu, -m "gpu or gpu_selection")    70 / 70 s  (-rfE, a per-test timeout)
#   memcheck   compute-sanitizer over bench/sanitize_cases.py              50 / 40 s
#   bench      steered_linear (prefill; decode as CUDA-graph device time), split_loss against Liger and CCE,
#              host overhead, CUDA-graph capture and syncs: a JSON each     60 s      (not with --quick)
#   tune       fastsplit tune at the default model's shapes: every candidate's time and the tuned routes
#              (tune.json; the cache format of fastsplit.ops._tune)         25 s      (not with --quick)
#   targets    python -m fastsplit.kernels.check_targets for this device's target: every kernel and default
#              config compiled, shared memory against the limit and the hand estimate, registers and spills
#              (targets.json)                                               20 s      (not with --quick or --dry-run)
#   summary    LOG_DIR/summary.json: every figure, the failing test ids (also after a time-out), the memcheck
#              verdict, each goal checked, the routes the figures support    5 s
# --dry-run: every step on the CPU (no build, the selection under Triton's interpreter in fp32, the sanitize cases
# on the CPU, benches at CPU sizes): checks the check without a GPU (about 50 s here). --limits: print the plan.
# Exit status: the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=0 DRY=0 LIMITS=0 LOG=gpu-check
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        --dry-run) DRY=1 ;;
        --limits) LIMITS=1 ;;
        -h|--help) sed -n 2,21p "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
        *) LOG=$arg ;;
    esac
done
if [ "$QUICK" -eq 1 ]; then
    L_BUILD=60 L_INFO=5 L_TESTS=70 L_MEMCHECK=40 L_SUMMARY=5
else
    L_BUILD=60 L_INFO=10 L_TESTS=70 L_MEMCHECK=50 L_SUMMARY=5 L_LINEAR=30 L_SPLIT=20 L_HOST=10 L_TUNE=25 L_TARGETS=20
fi
if [ "$LIMITS" -eq 1 ]; then
    echo "build $L_BUILD info $L_INFO tests $L_TESTS memcheck $L_MEMCHECK summary $L_SUMMARY" \
        "${L_LINEAR:+bench_linear $L_LINEAR bench_split $L_SPLIT bench_host $L_HOST tune $L_TUNE targets $L_TARGETS}"
    exit 0
fi
mkdir -p "$LOG"
rm -f "$LOG"/*.xml "$LOG"/*.json
: > "$LOG/steps.txt"
T0=$SECONDS
failed=0
step() {  # step NAME LIMIT_S LOGFILE COMMAND...: run under timeout -s INT, time it, record it
    local name=$1 limit=$2 log=$3
    shift 3
    local t=$SECONDS
    echo "== $name (limit ${limit}s) ..."
    timeout -s INT -k 15 "$limit" "$@" > "$LOG/$log" 2>&1
    local rc=$?
    local verdict=ok
    [ "$rc" -eq 0 ] || verdict=FAILED
    [ "$rc" -eq 124 ] && verdict="TIMED OUT"
    printf '%-9s %-9s rc=%-3s %4ss (total %4ss)  %s\n' "$name" "$verdict" "$rc" "$((SECONDS - t))" \
        "$((SECONDS - T0))" "$LOG/$log" | tee -a "$LOG/steps.txt"
    [ "$rc" -eq 0 ] || { failed=$((failed + 1)); tail -n 5 "$LOG/$log" | sed 's/^/    /'; }
}

if [ "$DRY" -eq 1 ]; then
    export FASTSPLIT_GPU_DRY_RUN=1 TRITON_INTERPRET=1
    DEV=cpu
    echo "dry run: every step on the CPU" | tee -a "$LOG/steps.txt"
else
    DEV=cuda
    ARCH=$(python -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}' + ('a' if a == 9 else ''))")
    nvidia-smi > "$LOG/nvidia-smi.txt" 2>&1
    step build "$L_BUILD" build.log env FASTSPLIT_CUDA_ARCHS="$ARCH" python -m pip install --no-build-isolation --no-deps -e .
fi
step info "$L_INFO" build_info.log python -c "import fastsplit, json; json.dump(fastsplit.build_info(), open('$LOG/build_info.json', 'w'), indent=2); print(open('$LOG/build_info.json').read())"

PYTEST_TIMEOUT=()
python -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT=(--timeout=60)
step tests "$L_TESTS" tests.log env PYTHONUNBUFFERED=1 FASTSPLIT_FIXED_CONFIGS=1 python -m pytest -q -p no:cacheprovider \
    -rfE "${PYTEST_TIMEOUT[@]}" --durations=10 --junitxml="$LOG/tests.xml" -m "gpu or gpu_selection" tests

if [ "$DRY" -eq 1 ]; then
    step memcheck "$L_MEMCHECK" memcheck.log python bench/sanitize_cases.py --device cpu
else
    step memcheck "$L_MEMCHECK" memcheck.log compute-sanitizer --tool memcheck --print-limit 5 --error-exitcode 1 \
        python bench/sanitize_cases.py
fi

if [ "$QUICK" -eq 0 ]; then
    CSV="$LOG/results.csv"
    step bench_linear "$L_LINEAR" bench_linear.log python bench/bench_steered_linear.py --quick --device "$DEV" --rep 5 \
        --csv "$CSV" --json "$LOG/steered_linear.json"
    step bench_split "$L_SPLIT" bench_split.log python bench/bench_split_loss.py --device "$DEV" --rep 5 --csv "$CSV" \
        --json "$LOG/split_loss.json" $([ "$DRY" -eq 1 ] && echo --quick)
    step bench_host "$L_HOST" bench_host.log python bench/bench_overhead.py --device "$DEV" --json "$LOG/overhead.json"
    # rows 1 and 16 share the decode kernel's compiles; a fresh cache folder, so every key is measured here
    step tune "$L_TUNE" tune.log env FASTSPLIT_CACHE="$LOG/cache" python -m fastsplit tune --device "$DEV" --quiet \
        --rows 1,16,4096 --json "$LOG/tune.json" $([ "$DRY" -eq 1 ] && echo --rows 1,16 --loss-rows 64)
    # this device's target only (the CI runs every target): ~70 compiles spread over the machine's cores
    [ "$DRY" -eq 0 ] && step targets "$L_TARGETS" targets.log env -u TRITON_INTERPRET python -m fastsplit.kernels.check_targets \
        --targets "${ARCH%a}" --json "$LOG/targets.json"
fi
step summary "$L_SUMMARY" summary.log python bench/gpu_summary.py "$LOG"
cat "$LOG/summary.log"
echo "gpu_check: $failed failed step(s), $((SECONDS - T0)) s in all; logs and summary.json in $LOG/" | tee -a "$LOG/steps.txt"
exit "$failed"
