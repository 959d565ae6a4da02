#!/usr/bin/env bash
# The declared version floors (constraints-min.txt: torch 2.6, pydantic 2.7, deepspeed 0.16, ...), installed
# into their own venv, and a test subset there: core (oracles, modes), DDP, FSDP2, ZeRO-2 and the main job.
#   bash scripts/test_min.sh [VENV_DIR]     default .venv-min in the repository root; extra args: none
# Needs the network (or a pip index holding those versions): torch 2.6.0 from PyPI is the CUDA build with
# its nvidia-* wheels (about 3 GB; it runs on the CPU). Not part of .ci/run (the download does not fit it).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${1:-$root/.venv-min}
py=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export TORCH_EXTENSIONS_DIR="$venv/torch_extensions"  # this venv's own op builds
if [ ! -f "$venv/.smsf-min-installed" ]; then
  python -m pip install -q -c "$root/constraints-min.txt" torch==2.6.0
  python -m pip install -q -c "$root/constraints-min.txt" -e "$root[test,deepspeed,train,tensorboard]"
  python -m pip check  # before the triton removal below (torch's wheel requires it)
  touch "$venv/.smsf-min-installed"
fi
# torch 2.6.0 from PyPI pulls triton 3.2.0; with it, `import deepspeed` 0.16.0 raises "0 active drivers" on a
# machine without a GPU (measured), also with DS_ACCELERATOR=cpu. The CPU build of torch has no triton.
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  python -m pip uninstall -q -y triton || true
fi
export DS_ACCELERATOR=cpu MASTER_ADDR=127.0.0.1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python - <<'PY'
import deepspeed, matplotlib, numpy, pydantic, torch, typing_extensions  # noqa: F401
from importlib.metadata import version
print("floors:", {p: version(p) for p in ("torch", "pydantic", "typing_extensions", "deepspeed", "numpy",
                                          "matplotlib", "tqdm", "safetensors", "tensorboard")})
PY
python -m sharded_msam_sf.extension_lock
cd "$root"
python -m pytest -q -p no:cacheprovider tests/test_oracles.py tests/test_modes.py tests/test_ddp.py \
  tests/test_fsdp2.py "tests/test_deepspeed_equivalence.py::test_fp32_masters_match_single_process" \
  "tests/test_train_run.py::test_default_config_end_to_end_beats_unigram" "$@"
