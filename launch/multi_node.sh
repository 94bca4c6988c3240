#!/usr/bin/env bash
# Several nodes from one command on the first node: the deepspeed launcher reaches the others over ssh (pdsh).
# Needs passwordless ssh between the nodes and the same checkout path on each. HOSTFILE lists "host slots=GPUS".
#   HOSTFILE=launch/hostfile.example MASTER_ADDR=node0 launch/multi_node.sh --config vit_g_ibot --index /data/index
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${HOSTFILE:?set HOSTFILE (see launch/hostfile.example)}"
: "${MASTER_ADDR:?set MASTER_ADDR to the first node's address}"
exec "$DEEPSPEED" --hostfile "$HOSTFILE" --launcher pdsh --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module foundation.train "$@"
