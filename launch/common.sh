# Sourced by the launch scripts: the repository root, its venv, and CPU defaults when there is no GPU.
# shellcheck shell=bash
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$LAUNCH_DIR")"
VENV_BIN="${VENV_BIN:-$REPO/.venv/bin}"
# The launchers by full path, PATH left alone: a venv's pip `ninja` ahead of the system one on PATH makes torch
# rebuild DeepSpeed's JIT ops (~1-2 min) whenever processes with and without it share TORCH_EXTENSIONS_DIR.
DEEPSPEED="$VENV_BIN/deepspeed"
TORCHRUN="$VENV_BIN/torchrun"
[ -x "$DEEPSPEED" ] || DEEPSPEED="$(command -v deepspeed)"
[ -x "$TORCHRUN" ] || TORCHRUN="$(command -v torchrun)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO" || exit 1
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # No GPU: DeepSpeed's cpu accelerator and gloo; one BLAS thread per rank unless told otherwise.
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
MASTER_PORT="${MASTER_PORT:-29500}"
