#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the tested versions.
# Idempotent: a second run only checks. Usage: bash scripts/setup_env.sh [VENV_DIR]
#   VENV_DIR   default: $SMSF_VENV or .venv in the repository root
#   SMSF_TORCH_SPEC   the torch requirement (default torch==2.13.0; the CPU build where the
#                     index has it — on a CUDA machine install your CUDA torch first)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${1:-${SMSF_VENV:-$root/.venv}}
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv" >&2
  "$py" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.smsf-installed"
want=$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing dependencies into $venv (tested versions from constraints.txt)" >&2
  python -m pip install -q --upgrade pip
  # torch first: deepspeed's build imports it
  python -m pip install -q -c "$root/constraints.txt" "${SMSF_TORCH_SPEC:-torch==2.13.0}"
  python -m pip install -q -c "$root/constraints.txt" -e "$root[test,deepspeed,mpi,train,bench,tensorboard,hf,lightning,peft]"
  # torchtitan without its datasets pin (datasets<4.8 needs fsspec<=2026.2; its optimizer and checkpoint
  # components, which the tests use, need only these)
  python -m pip install -q -c "$root/constraints.txt" --no-deps torchtitan
  python -m pip install -q -c "$root/constraints.txt" tyro spmd_types torch_checkpointing torchdata
  echo "$want" > "$stamp"
fi
# DeepSpeed JIT-builds a small shm comm op on first use; two ranks building it at once can
# abort, so build it here, once, before any multi-rank run.
if [ -z "${SMSF_SKIP_DS_BUILD:-}" ]; then
  DS_ACCELERATOR=cpu python - <<'PY' >&2
import os, sys
try:
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
except Exception as e:  # deepspeed not installed: nothing to build
    print(f"[setup] deepspeed shm op not built ({e})", file=sys.stderr); sys.exit(0)
b = ShareMemCommBuilder()
if b.is_compatible():
    b.load(verbose=False)
    print("[setup] deepspeed shm comm op ready", file=sys.stderr)
PY
fi
