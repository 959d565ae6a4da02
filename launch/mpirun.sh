#!/usr/bin/env bash
# Start the main job (python -m sharded_msam_sf.train) with MPI: ranks come from the MPI
# launcher's environment (Open MPI, MPICH/Hydra, PMIx); the training itself uses
# torch.distributed (gloo/nccl), MPI only starts the processes. Arguments go to the program
# (default: --config configs/job/default.json).
#
#   one node, 2 ranks:  launch/mpirun.sh                                  # the embedded default job
#   two nodes, 8 each:  NP=16 MPI_ARGS="-hosts node0,node1 -ppn 8" MASTER_ADDR=node0 \
#                       launch/mpirun.sh --config configs/job/gpt-1.3b-gpu.json --data /data/owt
#                       (Open MPI: MPI_ARGS="--hostfile launch/hostfile.openmpi -npernode 8" or
#                       "-H node0:8,node1:8"; MPICH/Hydra: "-f hosts -ppn 8")
#   the smoke run:      SCRIPT=examples/deepspeed_smoke.py launch/mpirun.sh \
#                       --config configs/deepspeed/zero2-cpu.json --dist-backend gloo
#                       (ranks found with mpi4py by sharded_msam_sf.deepspeed.init_distributed)
#
# Environment (defaults): NP (2) ranks in all; MPIEXEC (mpiexec, the venv's if present);
# MPI_ARGS (none) extra launcher arguments; MASTER_ADDR (127.0.0.1 on one node; set it to
# rank 0's node for several, or unset it to let DeepSpeed take rank 0's first address);
# MASTER_PORT (29500); MODULE (sharded_msam_sf.train) or SCRIPT (a .py file, overrides MODULE).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # runs from a clone without pip install too
PY="${PYTHON:-python}"
# shellcheck source=launch/venv.sh
. "$REPO/launch/venv.sh"
NP="${NP:-2}"
export MASTER_ADDR="${MASTER_ADDR-127.0.0.1}"
[[ -z "$MASTER_ADDR" ]] && unset MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${MODULE:-}" && -z "${SCRIPT:-}" && "$#" -eq 0 ]]; then
  set -- --config "$REPO/configs/job/default.json"
fi
MODULE="${MODULE:-sharded_msam_sf.train}"
MPIEXEC="${MPIEXEC:-$(dirname "$(command -v "$PY")")/mpiexec}"
[[ -x "$MPIEXEC" ]] || MPIEXEC=mpiexec
if [[ -z "${DS_ACCELERATOR:-}" ]] && ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
unset RANK WORLD_SIZE LOCAL_RANK  # the ranks come from MPI
# shellcheck disable=SC2086
if [[ -n "${SCRIPT:-}" ]]; then
  exec "$MPIEXEC" -n "$NP" ${MPI_ARGS:-} "$PY" "$SCRIPT" "$@"
fi
exec "$MPIEXEC" -n "$NP" ${MPI_ARGS:-} "$PY" -m "$MODULE" "$@"
