#!/usr/bin/env bash
# One command that checks fastsplit on a GPU machine, from the repo root:
#   bash bench/gpu_check.sh [LOG_DIR]        (default: gpu-check/)
# 1. builds the extension for this device's architecture, 2. prints build_info(), 3. runs the whole suite on
# CUDA (fixed Triton configs, one process), 4. runs compute-sanitizer memcheck over a small case of every Triton
# and native kernel, 5. runs the quick GPU rows of the benchmarks; every log lands in LOG_DIR, and a summary
# line per step in LOG_DIR/summary.txt. Budget: 9 minutes on one H100. Exit status: the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-gpu-check}
mkdir -p "$LOG"
: > "$LOG/summary.txt"
failed=0
step() {  # step NAME LOGFILE COMMAND...: run, time, record
    local name=$1 log=$2
    shift 2
    local t0=$SECONDS
    "$@" > "$LOG/$log" 2>&1
    local rc=$?
    printf '%-22s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$log" | tee -a "$LOG/summary.txt"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}
ARCH=$(python -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}' + ('a' if a == 9 else ''))")
nvidia-smi > "$LOG/nvidia-smi.txt" 2>&1
step build build.log env FASTSPLIT_CUDA_ARCHS="$ARCH" python -m pip install --no-build-isolation --no-deps -e .
step build_info build_info.json python -c "import fastsplit, json; print(json.dumps(fastsplit.build_info(), indent=2))"
step tests tests.log env PYTHONUNBUFFERED=1 timeout 300 python -m pytest -q tests -p no:cacheprovider --durations=15
step memcheck memcheck.log timeout 180 compute-sanitizer --tool memcheck --print-limit 5 --error-exitcode 1 \
    python bench/sanitize_cases.py
step bench_steered_linear bench_steered_linear.log timeout 60 python bench/bench_steered_linear.py --quick --csv "$LOG/results.csv"
step bench_split_loss bench_split_loss.log timeout 60 python bench/bench_split_loss.py --quick --csv "$LOG/results.csv"
echo "failed steps: $failed (logs in $LOG/)" | tee -a "$LOG/summary.txt"
exit "$failed"
