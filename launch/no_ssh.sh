#!/usr/bin/env bash
# Several nodes without ssh: run this once on every node with its NODE_RANK (0 .. nodes-1). All nodes use the same
# HOSTFILE (its order defines the ranks) and reach MASTER_ADDR:MASTER_PORT, the address of node rank 0.
# SIGTERM/SIGINT to this script: this node's ranks save a checkpoint after their step and exit, and with them the
# ranks of every other node (they agree on the stop at each step).
#   node0$ NODE_RANK=0 HOSTFILE=launch/hostfile.example MASTER_ADDR=10.0.0.1 launch/no_ssh.sh --config vit_l_ibot ...
#   node1$ NODE_RANK=1 HOSTFILE=launch/hostfile.example MASTER_ADDR=10.0.0.1 launch/no_ssh.sh --config vit_l_ibot ...
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${HOSTFILE:?set HOSTFILE (see launch/hostfile.example)}"
: "${NODE_RANK:?set NODE_RANK to the line of this node in the hostfile (0-based)}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node rank 0}"
run_launcher 2 "$DEEPSPEED" --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" --module foundation.train "$@"
