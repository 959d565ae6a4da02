#!/usr/bin/env bash
# Launch a DeepSpeed job with the `deepspeed` launcher (one node, or several with a hostfile).
#
#   one node, CPU (gloo):  launch/deepspeed.sh --config configs/deepspeed/zero2-cpu.json --dist-backend gloo
#   one node, 8 GPUs:      NPROC=8 launch/deepspeed.sh --config configs/deepspeed/zero3-gpu.json
#   two nodes (ssh/pdsh):  HOSTFILE=launch/hostfile.example MASTER_ADDR=node0 \
#                          launch/deepspeed.sh --config configs/deepspeed/zero3-gpu.json
#   your own script:       SCRIPT=train_mine.py launch/deepspeed.sh --my-args ...
#
# Environment (defaults): NPROC (2) processes per node when no hostfile; HOSTFILE (none);
# MASTER_ADDR (127.0.0.1: rendezvous stays on this machine unless you name a node);
# MASTER_PORT (29500); MODULE (sharded_msam_sf.deepspeed, the smoke-run program) or SCRIPT
# (a .py file, overrides MODULE); DS_ACCELERATOR (cpu when no CUDA GPU is visible);
# BIND_CORES=1 pins each CPU rank to its cores (needs numactl).
# Everything after the options is passed to the program ("$@").
set -euo pipefail
NPROC="${NPROC:-2}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
MODULE="${MODULE:-sharded_msam_sf.deepspeed}"
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
