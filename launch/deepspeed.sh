#!/usr/bin/env bash
# Start the main job (python -m sharded_msam_sf.train) with the `deepspeed` launcher, on one node
# or on several with a hostfile. Arguments go to the program (default: --config configs/job/default.json).
#
#   one node, 2 CPU ranks: launch/deepspeed.sh                          # the embedded default job
#   one node, 8 GPUs:      NPROC=8 launch/deepspeed.sh --config configs/job/gpt-1.3b-gpu.json --data /data/owt
#   two nodes (ssh/pdsh):  HOSTFILE=launch/hostfile.example MASTER_ADDR=node0 \
#                          launch/deepspeed.sh --config configs/job/gpt-1.3b-gpu.json --data /data/owt
#   the smoke run:         SCRIPT=examples/deepspeed_smoke.py launch/deepspeed.sh \
#                          --config configs/deepspeed/zero2-cpu.json --dist-backend gloo
#   another module:        MODULE=my_pkg.train launch/deepspeed.sh --my-args ...
#
# Environment (defaults): NPROC (2) processes per node when no hostfile; HOSTFILE (none);
# MASTER_ADDR (127.0.0.1: rendezvous stays on this machine unless you name a node);
# MASTER_PORT (29500); MODULE (sharded_msam_sf.train) or SCRIPT (a .py file, overrides MODULE);
# DS_ACCELERATOR (cpu when no CUDA GPU is visible); BIND_CORES=1 pins each CPU rank to its
# cores (needs numactl). Everything after the options is passed to the program ("$@").
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # runs from a clone without pip install too
PY="${PYTHON:-python}"
# shellcheck source=launch/venv.sh
. "$REPO/launch/venv.sh"
NPROC="${NPROC:-2}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${MODULE:-}" && -z "${SCRIPT:-}" && "$#" -eq 0 ]]; then
  set -- --config "$REPO/configs/job/default.json"
fi
MODULE="${MODULE:-sharded_msam_sf.train}"
if [[ -z "${DS_ACCELERATOR:-}" ]] && ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
args=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_local_rank)
if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile "$HOSTFILE")
else
  args+=(--num_nodes 1 --num_gpus "$NPROC")
  [[ "${BIND_CORES:-0}" == 1 ]] && args+=(--bind_cores_to_rank)  # CPU: needs numactl
fi
if [[ -n "${SCRIPT:-}" ]]; then
  exec deepspeed "${args[@]}" "$SCRIPT" "$@"
fi
exec deepspeed "${args[@]}" --module "$MODULE" "$@"
