#!/usr/bin/env bash
# Start the main job with torchrun. Every setting is an environment variable with a default;
# arguments are passed to `python -m sharded_msam_sf.train` (default: --config configs/job/default.json).
#
#   launch/torchrun.sh                                   # 2 CPU ranks, the embedded default
#   NPROC=8 launch/torchrun.sh --config configs/job/gpt-1.3b-gpu.json --data /data/owt
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC=8 launch/torchrun.sh --config ...   # on each node
#   MAX_RESTARTS=3 launch/torchrun.sh ...                # restart failed ranks from the last checkpoint
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # runs from a clone without pip install too

NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-python}

if [ "$#" -eq 0 ]; then
  set -- --config "$REPO/configs/job/default.json"
fi

if [ "$NNODES" -eq 1 ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
  # one node: a private rendezvous on a free local port (no clash with other jobs)
  RDZV=(--standalone)
else
  RDZV=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --rdzv-backend c10d
        --rdzv-endpoint "${RDZV_ENDPOINT:-$MASTER_ADDR:$MASTER_PORT}")
fi

set -x
exec "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node "$NPROC" \
  --max-restarts "$MAX_RESTARTS" -m sharded_msam_sf.train "$@"
