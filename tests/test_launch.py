"""launch/no_ssh.sh: two simulated nodes (two launcher processes on 127.0.0.1, one rank each) train together."""

from __future__ import annotations

import pytest
from launch_support import LAUNCH, build_demo_index, check_run, finish, launch_env, smoke_args, start
from train_support import free_port

pytestmark = pytest.mark.distributed


def test_two_nodes_without_ssh(tmp_path):
    index = build_demo_index(tmp_path)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "run"
    port = str(free_port())
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    procs = [start([str(LAUNCH / "no_ssh.sh"), *smoke_args(index, out)],
                   launch_env(NODE_RANK=str(r), HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                   logs[r]) for r in (0, 1)]
    finish(procs, logs)
    check_run(out, world_size=2)
    # each node ran its own launcher with its own node rank
    assert "node_rank=0" in logs[0].read_text() and "node_rank=1" in logs[1].read_text()
