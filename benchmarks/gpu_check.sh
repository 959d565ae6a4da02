#!/usr/bin/env bash
# One run on a CUDA GPU (under 10 minutes: killed at 590 s): correctness of the fused/foreach/
# single paths against the reference, each kernel alone with its fraction of the HBM copy
# bandwidth (Triton and Inductor variants, torch's fused AdamW), then step time at 1B params
# against torch's fused AdamW. Output: stdout (paste it into the README)
# plus benchmarks/results/gpu_check.{json,txt} and step_speed_gpu.json.
#   bash benchmarks/gpu_check.sh [--params 1e9] [--reps 10] [--only adamw_fused,ours_fused,...]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
timeout 590 python benchmarks/gpu_check.py "$@" 2>&1 | tee benchmarks/results/gpu_check.txt
exit "${PIPESTATUS[0]}"
