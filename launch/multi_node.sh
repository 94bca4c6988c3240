#!/usr/bin/env bash
# Several nodes from one command on the first node: the deepspeed launcher reaches the others over ssh (pdsh).
# Needs passwordless ssh between the nodes and the same checkout path on each. HOSTFILE lists "host slots=GPUS".
# The ranks on every node start in this command's working directory (it must exist on every node).
#   HOSTFILE=launch/hostfile.example MASTER_ADDR=node0 launch/multi_node.sh --config vit_g_ibot --index /data/index
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${HOSTFILE:?set HOSTFILE (see launch/hostfile.example)}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node in the hostfile}"
# The deepspeed runner forwards SIGINT/SIGTERM itself in pdsh mode (pkill of the launcher on every node).
exec "$DEEPSPEED" --hostfile "$HOSTFILE" --launcher pdsh --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module foundation.train "$@"
