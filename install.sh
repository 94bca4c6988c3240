#!/usr/bin/env bash
# Set up a virtual environment with the verified stack (see constraints.txt). Safe to run again.
#   PYTHON=python3.11  interpreter to build the venv from
#   VENV=.venv         where the venv goes
#   FOUNDATION_NO_DALI=1   skip NVIDIA DALI (the data pipeline then cannot run)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt)

# torch first, on its own: the pair in constraints.txt is the one verified with timm and DeepSpeed.
"${pip[@]}" torch torchvision
# cuCIM without its [ctk] extra (~1.35 GB of CUDA wheels); its runtime needs come from pyproject.
"${pip[@]}" --no-deps cucim-cu13
"${pip[@]}" cupy-cuda13x lazy-loader click
extras="dev"
[ "${FOUNDATION_NO_DALI:-0}" = "1" ] || extras="dev,dali"
"${pip[@]}" -e ".[${extras}]"
echo "installed into $VENV: $("$VENV/bin/python" -c 'import torch, timm, deepspeed; print("torch", torch.__version__, "timm", timm.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -1)"
