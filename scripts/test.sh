#!/usr/bin/env bash
# The test suite from a fresh clone: installs the tested versions into .venv (once), builds
# DeepSpeed's CPU comm op (once), then runs pytest. Extra arguments go to pytest.
#   bash scripts/test.sh                 # everything, on the CPU (run time: README.md, "Tests")
#   bash scripts/test.sh tests/test_oracles.py -x
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup_env.sh"
# shellcheck disable=SC1091
. "${SMSF_VENV:-$root/.venv}/bin/activate"
cd "$root"
export DS_ACCELERATOR=cpu MASTER_ADDR=127.0.0.1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
