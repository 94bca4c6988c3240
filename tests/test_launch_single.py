"""One node, two ranks: launch/single_node.sh (deepspeed launcher) and launch/torchrun.sh (torchrun --standalone);
a SIGTERM to either script stops every rank with a checkpoint, and a run from another directory keeps its
relative paths there."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from pathlib import Path

import pytest
from launch_support import (
    LAUNCH,
    build_demo_index,
    check_run,
    finish,
    launch_env,
    processes_matching,
    smoke_args,
    start,
)
from train_support import free_port

pytestmark = pytest.mark.distributed

STOP_ITERATIONS = 100_000  # far more than the test waits for: only the signal ends the run
START_TIMEOUT_S = 300  # to the first logged step (the first run on a machine compiles DeepSpeed's shm op)
STOP_TIMEOUT_S = 120  # from SIGTERM to the script's exit


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return build_demo_index(tmp_path_factory.mktemp("demo"))


def test_deepspeed_launcher_two_ranks(index, tmp_path):
    out, log = tmp_path / "run", tmp_path / "launcher.log"
    proc = start([str(LAUNCH / "single_node.sh"), *smoke_args(index, out)],
                 launch_env(GPUS="2", MASTER_PORT=str(free_port())), log)
    finish([proc], [log])
    check_run(out, world_size=2)


def test_torchrun_two_ranks(index, tmp_path):
    out, log = tmp_path / "run", tmp_path / "torchrun.log"
    proc = start([str(LAUNCH / "torchrun.sh"), *smoke_args(index, out)], launch_env(NPROC="2"), log)
    finish([proc], [log])
    check_run(out, world_size=2)


def _tail(log: Path) -> str:
    return "\n".join(log.read_text().splitlines()[-40:])


@pytest.mark.parametrize(("script", "ranks"), [("single_node.sh", "GPUS"), ("torchrun.sh", "NPROC")])
def test_sigterm_stops_every_rank_with_a_checkpoint(index, tmp_path, script, ranks):
    """SIGTERM to the script's PID: both ranks finish their step, save a checkpoint and exit, the script exits 0
    and no process of the run is left. Started from another directory with a relative --index and output_dir,
    which resolve there."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    marker = f"stop-{uuid.uuid4().hex}"  # in every command line of the run (script, launcher, ranks, workers)
    relative_out = Path("runs") / marker
    args = [*smoke_args(Path(os.path.relpath(index, cwd)), relative_out, iterations=STOP_ITERATIONS),
            "train.checkpoint_every=0"]  # the only checkpoint is the one the signal asks for
    out, log = cwd / relative_out, tmp_path / "launcher.log"
    env = launch_env(**{ranks: "2"}, MASTER_PORT=str(free_port()))
    proc = start([str(LAUNCH / script), *args], env, log, cwd=cwd)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None, f"{script} exited with {proc.returncode} before training\n{_tail(log)}"
            assert time.monotonic() < deadline, f"no step logged in {START_TIMEOUT_S} s\n{_tail(log)}"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=STOP_TIMEOUT_S)
        assert code == 0, f"{script} exited with {code}\n{_tail(log)}"
        deadline = time.monotonic() + 15  # the ranks' data workers notice their parent's exit
        while processes_matching(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert processes_matching(marker) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in processes_matching(marker):
            os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    # the signal went to the two ranks, not to the launcher
    assert re.search(r"launch: SIGTERM sent to the ranks \(\d+ \d+\)", text), _tail(log)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tag = (out / "checkpoints" / "latest").read_text()
    step = rows[-1]["iteration"]
    assert tag == f"step_{step:08d}" and 1 <= step < STOP_ITERATIONS
    assert f"stop signal: saved step {step} and stopped" in text
    saved = sorted(p.name for p in (out / "checkpoints" / tag / "trainer").iterdir())
    assert saved == ["rank_00000.pt", "rank_00001.pt"]
