"""Helpers for the launcher tests: the demo slide index, short cpu_smoke arguments, and run checks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
ITERATIONS = 2
TIMEOUT_S = 600


def build_demo_index(base: Path) -> Path:
    """Demo slides (``foundation demo-data``) and their tile index (``foundation index``) under ``base``."""
    from foundation.cli import main

    assert main(["demo-data", str(base / "demo")]) == 0
    assert main(["index", str(base / "demo" / "manifest.csv"), "--out", str(base / "index")]) == 0
    return base / "index"


def smoke_args(index: Path, out: Path, iterations: int = ITERATIONS) -> list[str]:
    """A 2-step cpu_smoke run with small batches: what every launcher test trains."""
    return ["--config", "cpu_smoke", "--index", str(index), f"meta.output_dir={out}",
            f"train.iterations={iterations}", "train.log_every=1", "train.image_every=0", "train.progress_bar=false",
            "data.pipeline.batch_size=4", "data.crops.local_count=2"]


def launch_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Wait for every process; on a failure or timeout, kill the rest and show the logs."""
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        tails = "\n".join(f"--- {log} ---\n" + "\n".join(log.read_text().splitlines()[-30:]) for log in logs)
        raise AssertionError(f"exit codes {codes}\n{tails}")


def check_run(out: Path, world_size: int) -> None:
    """A finished 2-step run on ``world_size`` ranks: logs of both steps, a checkpoint from every rank."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, ITERATIONS + 1))
    assert all(r["loss/total"] == r["loss/total"] for r in rows)  # not NaN
    assert rows[-1]["perf/images_per_s"] > 0
    assert (out / "config.yaml").is_file() and (out / "tensorboard").is_dir()
    ckpt = out / "checkpoints"
    tag = (ckpt / "latest").read_text()
    assert tag == f"step_{ITERATIONS:08d}"
    ranks = sorted(p.name for p in (ckpt / tag / "trainer").iterdir())
    assert ranks == [f"rank_{r:05d}.pt" for r in range(world_size)]


# The variables the launch scripts read: the script tests start from an environment without them.
SCRIPT_VARS = ("GPUS", "NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "HOSTFILE", "VENV_BIN")

STUB = """#!/bin/sh
# launcher stand-in: prints its working directory, PYTHONPATH and arguments, one a line; exits with $STUB_RC.
pwd
echo "PYTHONPATH=$PYTHONPATH"
printf '%s\\n' "$0" "$@"
exit "${STUB_RC:-0}"
"""


def stub_launchers(bin_dir: Path) -> Path:
    """``deepspeed`` and ``torchrun`` stand-ins (:data:`STUB`) in ``bin_dir``, for ``VENV_BIN``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("deepspeed", "torchrun"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def script_env(**extra: str) -> dict[str, str]:
    """The test's environment without :data:`SCRIPT_VARS`, plus ``extra``."""
    env = {k: v for k, v in launch_env().items() if k not in SCRIPT_VARS}
    env.update(extra)
    return env


def processes_matching(marker: str) -> list[int]:
    """PIDs of the processes whose command line contains ``marker`` (``pgrep -f``)."""
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]
