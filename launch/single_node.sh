#!/usr/bin/env bash
# One node, GPUS ranks (default: every GPU; on a CPU-only machine set GPUS, e.g. 2), via the deepspeed launcher.
# SIGTERM/SIGINT to this script: every rank saves a checkpoint after its step and exits (see run_launcher).
#   GPUS=8 launch/single_node.sh --config vit_l_ibot --index /data/index
set -euo pipefail
source "$(dirname "$0")/common.sh"
GPUS="${GPUS:-$(gpu_count)}"
check_ranks GPUS "$GPUS"
run_launcher 2 "$DEEPSPEED" --num_gpus "$GPUS" --master_port "$MASTER_PORT" --module foundation.train "$@"
