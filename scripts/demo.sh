#!/usr/bin/env bash
# The main job on its embedded default, from a fresh clone: installs the tested versions into
# .venv (once), then runs configs/job/default.json (2 CPU ranks, gloo, DeepSpeed ZeRO-2, one_pass)
# through launch/torchrun.sh. Extra arguments go to the job (e.g. --override train.steps=50).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup_env.sh"
# shellcheck disable=SC1091
. "${SMSF_VENV:-$root/.venv}/bin/activate"
cd "$root"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
exec bash launch/torchrun.sh "$@"
