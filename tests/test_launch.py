"""The launch scripts: every one parses (``bash -n``); each runs the exact launcher command line (stand-ins for
``deepspeed`` and ``torchrun`` through ``VENV_BIN``) from the caller's directory, or stops with a one-line message
when a required variable or the GPU count is missing; launch/no_ssh.sh as two simulated nodes (two launcher
processes on 127.0.0.1, one rank each) that train together."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from launch_support import (
    LAUNCH,
    REPO,
    build_demo_index,
    check_run,
    finish,
    launch_env,
    script_env,
    smoke_args,
    start,
    stub_launchers,
)
from train_support import free_port

SCRIPTS = [*sorted(LAUNCH.glob("*.sh")), LAUNCH / "slurm.sbatch"]
ARGS = ["--config", "vit_l_ibot", "--index", "data/index", "meta.output_dir=runs/a b", "train.lr=1e-3"]
HOSTS = "launch/hostfile.example"

# script, its variables, the launcher it runs and that launcher's arguments before ARGS
COMMANDS = {
    "single_node": ("single_node.sh", {"GPUS": "3"}, "deepspeed",
                    ["--num_gpus", "3", "--master_port", "29500", "--module", "foundation.train"]),
    "multi_node": ("multi_node.sh", {"HOSTFILE": HOSTS, "MASTER_ADDR": "node0"}, "deepspeed",
                   ["--hostfile", HOSTS, "--launcher", "pdsh", "--master_addr", "node0", "--master_port", "29500",
                    "--module", "foundation.train"]),
    "no_ssh": ("no_ssh.sh", {"HOSTFILE": HOSTS, "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29555"},
               "deepspeed",
               ["--hostfile", HOSTS, "--no_ssh", "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port",
                "29555", "--module", "foundation.train"]),
    "torchrun_standalone": ("torchrun.sh", {"NPROC": "2"}, "torchrun",
                            ["--standalone", "--nproc_per_node", "2", "-m", "foundation.train"]),
    "torchrun_nodes": ("torchrun.sh", {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "NPROC": "4"},
                       "torchrun",
                       ["--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "4", "--master_addr", "10.0.0.1",
                        "--master_port", "29500", "-m", "foundation.train"]),
}

# script, its variables with the one named left out, and the message
MISSING = {
    "multi_node-HOSTFILE": ("multi_node.sh", {"MASTER_ADDR": "node0"}, "HOSTFILE",
                            "set HOSTFILE (see launch/hostfile.example)"),
    "multi_node-MASTER_ADDR": ("multi_node.sh", {"HOSTFILE": HOSTS}, "MASTER_ADDR",
                               "set MASTER_ADDR to the address of the first node in the hostfile"),
    "no_ssh-HOSTFILE": ("no_ssh.sh", {"NODE_RANK": "0", "MASTER_ADDR": "a"}, "HOSTFILE",
                        "set HOSTFILE (see launch/hostfile.example)"),
    "no_ssh-NODE_RANK": ("no_ssh.sh", {"HOSTFILE": HOSTS, "MASTER_ADDR": "a"}, "NODE_RANK",
                         "set NODE_RANK to the line of this node in the hostfile (0-based)"),
    "no_ssh-MASTER_ADDR": ("no_ssh.sh", {"HOSTFILE": HOSTS, "NODE_RANK": "0"}, "MASTER_ADDR",
                           "set MASTER_ADDR to the address of node rank 0"),
    "torchrun-NODE_RANK": ("torchrun.sh", {"NNODES": "2", "MASTER_ADDR": "a", "NPROC": "1"}, "NODE_RANK",
                           "set NODE_RANK for a multi-node torchrun"),
    "torchrun-MASTER_ADDR": ("torchrun.sh", {"NNODES": "2", "NODE_RANK": "1", "NPROC": "1"}, "MASTER_ADDR",
                             "set MASTER_ADDR to the address of node rank 0"),
}


def _run(script: str, env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCH / script), *ARGS], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize("case", COMMANDS)
def test_script_runs_the_launcher(case, tmp_path):
    script, variables, launcher, launcher_args = COMMANDS[case]
    stubs = stub_launchers(tmp_path / "bin")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    done = _run(script, script_env(VENV_BIN=str(stubs), **variables), cwd)
    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    # the caller's directory is kept (relative paths in ARGS resolve against it); the checkout is importable
    assert lines[0] == str(cwd)
    assert lines[1].startswith(f"PYTHONPATH={REPO}")
    assert lines[2:] == [str(stubs / launcher), *launcher_args, *ARGS]
    # the launcher's exit status is the script's
    failed = _run(script, script_env(VENV_BIN=str(stubs), STUB_RC="3", **variables), cwd)
    assert failed.returncode == 3


@pytest.mark.parametrize("case", MISSING)
def test_missing_variable_is_one_line(case, tmp_path):
    script, variables, name, message = MISSING[case]
    done = _run(script, script_env(VENV_BIN=str(stub_launchers(tmp_path / "bin")), **variables), tmp_path)
    assert done.returncode != 0 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"{name}: {message}"), done.stderr


@pytest.mark.parametrize(("script", "name"), [("single_node.sh", "GPUS"), ("torchrun.sh", "NPROC")])
def test_no_gpu_asks_for_a_rank_count(script, name, tmp_path):
    # a PATH with no nvidia-smi: only what the scripts need before they count GPUs
    bin_dir = tmp_path / "path"
    bin_dir.mkdir()
    for tool in ("bash", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    stubs = str(stub_launchers(tmp_path / "bin"))
    done = _run(script, script_env(VENV_BIN=stubs, PATH=str(bin_dir)), tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"no GPU found: set {name}=N (ranks on the CPU)\n")
    done = _run(script, script_env(VENV_BIN=stubs, PATH=str(bin_dir), **{name: "two"}), tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"{name}=two: not a number of ranks\n")


SLURM_STUBS = {
    # a large allocation: scontrol's output does not fit one pipe read (`| head -n 1` got SIGPIPE, exit 141)
    "scontrol": '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && for i in $(seq 0 2999); do echo "n$i"; done\n',
    "srun": '#!/bin/sh\necho "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT HOSTFILE=$HOSTFILE"\n'
            'printf \'%s\\n\' "$@"\n',
}


def test_slurm_rendezvous(tmp_path):
    """slurm.sbatch with stand-ins for scontrol (3000 nodes) and srun (prints what it gets): the first node is the
    master, the port comes from the job id, the hostfile lists every node, srun gets one no_ssh.sh task per node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in SLURM_STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = script_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="n[0-2999]", SLURM_JOB_ID="4242",
                     SLURM_GPUS_ON_NODE="4", SLURM_SUBMIT_DIR=str(REPO), HOSTFILE_DIR=str(tmp_path))
    done = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *ARGS], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    hostfile = tmp_path / "hostfile.4242"
    assert hostfile.read_text() == "".join(f"n{i} slots=4\n" for i in range(3000))
    lines = done.stdout.splitlines()
    assert lines[0] == f"MASTER_ADDR=n0 MASTER_PORT={20000 + 4242} HOSTFILE={hostfile}"
    assert lines[1:4] == ["--ntasks-per-node=1", "bash", "-c"]
    assert lines[5:] == [str(REPO), *ARGS]


@pytest.mark.distributed
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
