"""``foundation train`` refuses a bad config before any work: nothing is written, no process group is joined."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from foundation.cli import entry, main
from foundation.config import load_config
from foundation.train.trainer import validate

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize(("args", "message"), [
    (["train.iteratons=5"], "unknown config key 'train.iteratons'"),
    (["train.precision=fp8"], "train.precision must be one of"),
    (["deepspeed=zero9"], "unknown deepspeed config 'zero9'"),
    ([], "no tile index: pass --index DIR"),
    (["--index", "{tmp}/nowhere"], "not a tile index folder"),
    (["--index", "{tmp}/archive"], "not a readable tile index"),  # a slide folder, not an index
])
def test_bad_input_stops_before_any_work(tmp_path, caplog, args, message):
    out = tmp_path / "run"
    (tmp_path / "archive" / "slides").mkdir(parents=True)
    (tmp_path / "archive" / "slides" / "a.svs").write_bytes(b"II*\x00")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with caplog.at_level(logging.ERROR):
        code = main(["train", "--config", "cpu_smoke", f"meta.output_dir={out}", *args])
    assert code == 2
    assert message in caplog.text
    assert not out.exists()


def test_an_index_without_tiles_stops_before_any_work(tmp_path, caplog, wsi):
    (tmp_path / "m.csv").write_text(f"path,stain\n{wsi['dicom']},H&E\n")  # 29 µm/px: no tile at 0.5 µm/px
    assert main(["index", str(tmp_path / "m.csv"), "--out", str(tmp_path / "index"), "--workers", "1"]) == 0
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        code = main(["train", "--config", "cpu_smoke", "--index", str(tmp_path / "index"), f"meta.output_dir={out}"])
    assert code == 2 and "the index holds no tiles (1 slides" in caplog.text
    assert not out.exists()


@pytest.fixture(scope="module")
def index_dir(wsi, tmp_path_factory):
    from checkpoint_support import slide_index

    return slide_index(wsi["svs_jpeg"], tmp_path_factory.mktemp("slides"))


@pytest.mark.parametrize(("override", "message"), [
    ("objective.mae.mask_ratio=1.5", "objective.mae.mask_ratio must lie in [0, 1), got 1.5"),
    ("objective.dino.student_temp=-1", "objective.dino.student_temp must be > 0"),
    ("model.num_heads=5", "model.embed_dim=64 is not divisible by model.num_heads=5"),
    ("model.depth=0", "model.depth=0 must be >= 1"),
    ("data.crops.global_size=70", "data.crops.global_size=70 is not a multiple of the patch size 16"),
    ("data.crops.local_size=33", "data.crops.local_size=33 is not a multiple of the patch size 16"),
    ("data.pipeline.device=gpu", "data.pipeline.device=gpu but this machine has no CUDA device"),
    ("objective=mae objective.weights.koleo=0.1", "MAE computes no ['koleo'] loss term"),
])
def test_bad_model_objective_or_crop_values_stop_before_any_work(index_dir, tmp_path, caplog, override, message):
    import torch

    if override.startswith("data.pipeline.device") and torch.cuda.is_available():
        pytest.skip("a GPU is there")
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        code = main(["train", "--config", "cpu_smoke", "--index", str(index_dir), f"meta.output_dir={out}",
                     *override.split()])
    assert code == 2 and message in caplog.text
    assert not out.exists()


def test_launcher_local_rank_argument_is_accepted(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        code = main(["train", "--config", "cpu_smoke", "--local_rank=1", f"meta.output_dir={tmp_path}/r"])
    assert code == 2 and "no tile index" in caplog.text  # parsed fine, stopped at the missing index
    caplog.clear()
    with caplog.at_level(logging.ERROR):  # `deepspeed --module foundation CMD` puts it before the command
        code = main(["--local_rank=1", "train", "--config", "cpu_smoke", f"meta.output_dir={tmp_path}/r"])
    assert code == 2 and "no tile index" in caplog.text


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(preset):
    cfg = load_config(preset)
    validate(cfg)


def test_entry_exits_with_the_command_status(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        entry(["train", "--config", "cpu_smoke", f"meta.output_dir={tmp_path}/r"])  # no index: status 2
    assert exit_info.value.code == 2


ENTRY_AFTER_A_PROCESS_GROUP = """
import atexit, os, socket, sys
import torch.distributed as dist
import foundation.cli as cli

def command(argv):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    atexit.register(lambda: print("interpreter finalization ran"))
    cli._leave_process_group()
    print("command done")
    return 3

cli.main = command
cli.entry(["train"])
"""


def test_entry_skips_interpreter_finalization_after_a_process_group():
    """A command that joined a process group exits with its status, its output flushed, and no finalization."""
    proc = subprocess.run([sys.executable, "-c", ENTRY_AFTER_A_PROCESS_GROUP], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="0"))
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.splitlines() == ["command done"]
