#!/usr/bin/env bash
# Start the main job with torchrun. Every setting is an environment variable with a default;
# arguments are passed to `python -m sharded_msam_sf.train` (default: --config configs/job/default.json).
#
#   launch/torchrun.sh                                   # 2 CPU ranks, the embedded default
#   NPROC=4 launch/torchrun.sh --config configs/job/fsdp2-tp2-cpu.json  # FSDP2 + tensor parallel, dp 2 x tp 2
#   NPROC=4 launch/torchrun.sh --config configs/job/fsdp2-pp2-cpu.json  # FSDP2 + pipeline parallel, pp 2 x dp 2
#   NPROC=8 launch/torchrun.sh --config configs/job/gpt-1.3b-gpu.json --data /data/owt
#   NNODES=2 MASTER_ADDR=node0 LOCAL_ADDR=$(hostname) NPROC=8 launch/torchrun.sh --config ...   # on each node
#   NNODES=1:2 MASTER_ADDR=node0 MAX_RESTARTS=3 launch/torchrun.sh --config ...   # elastic: 1 to 2 nodes
#   MAX_RESTARTS=3 launch/torchrun.sh ...                # restart failed ranks from the last checkpoint
#
# Environment (defaults): NPROC (2) processes per node; NNODES (1; "MIN:MAX" for an elastic job);
# RDZV_BACKEND (c10d: the nodes are numbered in the order they join, any node may come back;
# static: NODE_RANK (0) numbers them, no elasticity); MASTER_ADDR
# (127.0.0.1) and MASTER_PORT (29500): the head node, which hosts the c10d rendezvous;
# RDZV_ENDPOINT (MASTER_ADDR:MASTER_PORT); RDZV_ID (sharded-msam-sf: the same on every node of
# a job, different for two jobs sharing a head node); RDZV_CONF (none; e.g. "join_timeout=900"
# or "last_call_timeout=5,close_timeout=10"); LOCAL_ADDR (none: this node's address as the
# others reach it; torchrun falls back to the host name); MAX_RESTARTS (0); PYTHON (python).
# Multi-node runs export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh worker store per rendezvous
# round, so that a replacement node can join; set it to 0 to get torch's default). See docs/cluster.md.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # runs from a clone without pip install too
PY="${PYTHON:-python}"
# shellcheck source=launch/venv.sh
. "$REPO/launch/venv.sh"

NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}
RDZV_ID=${RDZV_ID:-sharded-msam-sf}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
PYTHON=${PYTHON:-python}

if [ "$#" -eq 0 ]; then
  set -- --config "$REPO/configs/job/default.json"
fi

if [ "$NNODES" = 1 ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
  # one node: a private rendezvous on a free local port (no clash with other jobs)
  RDZV=(--standalone)
else
  RDZV=(--nnodes "$NNODES" --rdzv-backend "$RDZV_BACKEND" --rdzv-id "$RDZV_ID"
        --rdzv-endpoint "${RDZV_ENDPOINT:-$MASTER_ADDR:$MASTER_PORT}")
  # c10d numbers the nodes in the order they join; only the static backend reads --node-rank
  if [ "$RDZV_BACKEND" = static ]; then RDZV+=(--node-rank "$NODE_RANK"); fi
  if [ -n "${RDZV_CONF:-}" ]; then RDZV+=(--rdzv-conf "$RDZV_CONF"); fi
  if [ -n "${LOCAL_ADDR:-}" ]; then RDZV+=(--local-addr "$LOCAL_ADDR"); fi
  # every rendezvous round gets a fresh worker store on the new rank 0 (torch 2.13's shared store
  # leaves a replacement node waiting for an address the old rank 0 never republishes)
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
fi

set -x
exec "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node "$NPROC" \
  --max-restarts "$MAX_RESTARTS" -m sharded_msam_sf.train "$@"
