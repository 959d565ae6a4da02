#!/usr/bin/env bash
# One run on a CUDA GPU (a few minutes): correctness of the fused/foreach/single paths
# against the reference, step time at 1B params against torch's fused AdamW, and the
# share of the measured HBM copy bandwidth. Output: stdout (paste it into the README)
# plus benchmarks/results/gpu_check.{json,txt} and step_speed_gpu.json.
#   bash benchmarks/gpu_check.sh [--params 1e9] [--reps 10] [--only adamw_fused,ours_fused,...]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
python benchmarks/gpu_check.py "$@" 2>&1 | tee benchmarks/results/gpu_check.txt
exit "${PIPESTATUS[0]}"
