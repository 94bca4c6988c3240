"""One node, two ranks: launch/single_node.sh (deepspeed launcher) and launch/torchrun.sh (torchrun --standalone)."""

from __future__ import annotations

import pytest
from launch_support import LAUNCH, build_demo_index, check_run, finish, launch_env, smoke_args, start
from train_support import free_port

pytestmark = pytest.mark.distributed


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
