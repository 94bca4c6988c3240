#!/usr/bin/env bash
# The test command (README, CI): installs the stack into .venv if needed, then runs the whole suite.
# Extra arguments go to pytest. Exit code 5 (no tests collected) is a failure, never a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
# No real data: say where it looked, at once (the module needs only the standard library).
"${PYTHON:-python3}" -m foundation.shared_data >/dev/null || exit 1
bash install.sh || { echo "install failed" >&2; exit 1; }
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR=cpu
# DeepSpeed's JIT ops built for this venv, not in the per-user cache another checkout's venv also uses (each would
# rebuild them, 1-2 min per process, whenever the other had built last)
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
# Build DeepSpeed's CPU shared-memory comm op once, in one process, before any test starts ranks: two ranks building it
# at once, or a rank killed mid-build, can leave a broken op behind that aborts every later multi-rank test.
if [ "${DS_ACCELERATOR:-}" = "cpu" ]; then
  .venv/bin/python -c "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder; ShareMemCommBuilder().load()" \
    || { echo "cannot build DeepSpeed's shm comm op" >&2; exit 1; }
fi
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
