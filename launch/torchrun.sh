#!/usr/bin/env bash
# torchrun instead of the deepspeed launcher. One node: NPROC ranks (default: every GPU). Several nodes: run it on
# each node with NNODES, NODE_RANK and MASTER_ADDR (node rank 0's address), like the no-ssh mode.
#   NPROC=8 launch/torchrun.sh --config vit_b_ibot --index /data/index
#   node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC=8 launch/torchrun.sh --config vit_l_ibot --index ...
set -euo pipefail
source "$(dirname "$0")/common.sh"
NPROC="${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
[ "$NPROC" -ge 1 ] || { echo "no GPU found: set NPROC=N (ranks on the CPU)" >&2; exit 2; }
NNODES="${NNODES:-1}"
if [ "$NNODES" -eq 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  exec "$TORCHRUN" --standalone --nproc_per_node "$NPROC" -m foundation.train "$@"
fi
: "${NODE_RANK:?set NODE_RANK for a multi-node torchrun}"
: "${MASTER_ADDR:?set MASTER_ADDR to node rank 0's address}"
exec "$TORCHRUN" --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m foundation.train "$@"
