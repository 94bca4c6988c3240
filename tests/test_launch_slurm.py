"""launch/slurm.sbatch on a simulated 2-node allocation: ``srun`` and ``scontrol`` are stand-ins that run one task
per "node" on this machine with SLURM's per-task variables, so the script's own rendezvous logic (master from the
node list, node rank from SLURM_NODEID, hostfile from SLURM_JOB_NODELIST) is what gets tested."""

from __future__ import annotations

import os
import stat

import pytest
from launch_support import LAUNCH, REPO, build_demo_index, check_run, finish, launch_env, smoke_args, start
from train_support import free_port

pytestmark = pytest.mark.distributed

NODES = ("localhost", "127.0.0.1")  # two names for this machine: two "nodes"

SRUN = """#!/usr/bin/env bash
# srun stand-in: drop options, run the command once per node with that task's SLURM variables, in parallel.
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc
"""

SCONTROL = f"""#!/usr/bin/env bash
# scontrol stand-in: `scontrol show hostnames LIST` prints the simulated nodes.
[ "$1 $2" = "show hostnames" ] && printf '%s\\n' {' '.join(NODES)}
"""


def _shim(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_slurm_script_on_two_simulated_nodes(tmp_path):
    index = build_demo_index(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _shim(bin_dir / "srun", SRUN)
    _shim(bin_dir / "scontrol", SCONTROL)
    out, log = tmp_path / "run", tmp_path / "slurm.log"
    env = launch_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="sim[0-1]", SLURM_JOB_ID="4242",
                     SLURM_NNODES="2", SLURM_GPUS_ON_NODE="1", SLURM_SUBMIT_DIR=str(REPO),
                     HOSTFILE_DIR=str(tmp_path), MASTER_PORT=str(free_port()))
    proc = start(["bash", str(LAUNCH / "slurm.sbatch"), *smoke_args(index, out)], env, log)
    finish([proc], [log])
    assert (tmp_path / "hostfile.4242").read_text() == "localhost slots=1\n127.0.0.1 slots=1\n"
    check_run(out, world_size=2)
    text = log.read_text()
    assert "node_rank=0" in text and "node_rank=1" in text and "--master_addr=localhost" in text
