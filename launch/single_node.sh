#!/usr/bin/env bash
# One node, GPUS ranks (default: every GPU; on a CPU-only machine set GPUS, e.g. 2), via the deepspeed launcher.
#   GPUS=8 launch/single_node.sh --config vit_l_ibot --index /data/index
set -euo pipefail
source "$(dirname "$0")/common.sh"
GPUS="${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
[ "$GPUS" -ge 1 ] || { echo "no GPU found: set GPUS=N (ranks on the CPU)" >&2; exit 2; }
exec "$DEEPSPEED" --num_gpus "$GPUS" --master_port "$MASTER_PORT" --module foundation.train "$@"
