# Sourced by launch/*.sh: use the project's .venv when it exists and no environment is active (its activate
# script, written by scripts/setup_env.sh, sets the venv's own TORCH_EXTENSIONS_DIR), say how to get an
# environment when python cannot import torch, and refuse at once on a stale torch-extension build lock.
#   REPO   the repository root (set by the caller)
#   PY     the python to check (default: python)
if [[ -z "${VIRTUAL_ENV:-}" && -x "$REPO/.venv/bin/python" ]]; then
  # shellcheck disable=SC1091
  . "$REPO/.venv/bin/activate"
fi
if ! "${PY:-python}" -c "import torch, sharded_msam_sf" 2>/dev/null; then
  echo "launch: '$(command -v "${PY:-python}" || echo "${PY:-python}")' cannot import torch and sharded_msam_sf." >&2
  echo "  Create the project's environment once:  bash $REPO/scripts/setup_env.sh" >&2
  echo "  (it makes $REPO/.venv, which these scripts then use), or activate yours:  . PATH/TO/VENV/bin/activate" >&2
  exit 1
fi
if ! "${PY:-python}" -m sharded_msam_sf.extension_lock; then exit 1; fi  # a killed build's lock would hang every rank
