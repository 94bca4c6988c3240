#!/usr/bin/env bash
# torchrun instead of the deepspeed launcher. One node: NPROC ranks (default: every GPU). Several nodes: run it on
# each node with NNODES, NODE_RANK and MASTER_ADDR (the address of node rank 0), like the no-ssh mode.
# SIGTERM/SIGINT to this script: every rank saves a checkpoint after its step and exits (see run_launcher).
#   NPROC=8 launch/torchrun.sh --config vit_b_ibot --index /data/index
#   node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC=8 launch/torchrun.sh --config vit_l_ibot --index ...
set -euo pipefail
source "$(dirname "$0")/common.sh"
NPROC="${NPROC:-$(gpu_count)}"
check_ranks NPROC "$NPROC"
NNODES="${NNODES:-1}"
if [ "$NNODES" -eq 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  run_launcher 1 "$TORCHRUN" --standalone --nproc_per_node "$NPROC" -m foundation.train "$@"
  exit
fi
: "${NODE_RANK:?set NODE_RANK for a multi-node torchrun}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node rank 0}"
run_launcher 1 "$TORCHRUN" --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m foundation.train "$@"
