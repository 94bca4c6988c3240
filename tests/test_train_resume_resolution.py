"""Which checkpoint a resume takes, and what it may touch first: ``latest`` over the highest step, a wrong world
size or ZeRO stage refused before the run folder is written, and metrics.jsonl cut back to the resumed step.
Checkpoint folders are fabricated with the trainer's own marker format (no engine is built: fast)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from checkpoint_support import overrides, slide_index

from foundation.cli import main
from foundation.config import load_config, to_dict
from foundation.fileio import atomic_write_text
from foundation.train.checkpoint import COMPLETE, FORMAT_VERSION, LATEST, _list_files, resolve_resume, tag_for
from foundation.train.logging import METRICS_FILE, RunLogger


def fabricate(directory: Path, step: int, world_size: int = 1, zero_stage: int = 1,
              config: dict | None = None) -> Path:
    """A complete checkpoint folder of ``step`` (one small file and its ``COMPLETE`` marker)."""
    tag = directory / tag_for(step)
    (tag / "trainer").mkdir(parents=True)
    (tag / "trainer" / "rank_00000.pt").write_bytes(b"x" * (step + 1))
    meta = {"format": FORMAT_VERSION, "iteration": step, "world_size": world_size, "zero_stage": zero_stage,
            "universal": False, "code_version": "test", "param_shapes": {}, "teacher_shapes": None,
            "config": config, "files": _list_files(tag)}
    atomic_write_text(tag / COMPLETE, json.dumps(meta) + "\n")
    return tag


@pytest.fixture()
def rerun(tmp_path):
    """A run that ended at 90, then a fresh 30-step run in the same folder: ``latest`` names step 30."""
    ckpt = tmp_path / "run" / "checkpoints"
    for step in (20, 30, 80, 85, 90):
        fabricate(ckpt, step)
    atomic_write_text(ckpt / LATEST, tag_for(30))
    return ckpt


@pytest.mark.parametrize("spec", ["auto", "true", "RUN", "CHECKPOINTS"])
def test_auto_resume_follows_latest_not_the_highest_step(rerun, spec, caplog):
    spec = {"RUN": str(rerun.parent), "CHECKPOINTS": str(rerun)}.get(spec, spec)
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(rerun, spec) == rerun / tag_for(30)
    assert not caplog.text  # nothing to warn about


@pytest.mark.parametrize("damage", ["missing", "names_a_missing_folder", "names_an_incomplete_one", "empty"])
def test_broken_latest_falls_back_to_the_newest_complete_with_a_warning(rerun, damage, caplog):
    latest = rerun / LATEST
    if damage == "missing":
        latest.unlink()
    elif damage == "names_a_missing_folder":
        latest.write_text(tag_for(40))
    elif damage == "names_an_incomplete_one":
        (rerun / tag_for(30) / COMPLETE).unlink()
    else:
        latest.write_text("")
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(rerun, "auto") == rerun / tag_for(90)
    assert str(latest) in caplog.text and tag_for(90) in caplog.text


def test_no_checkpoint_at_all_starts_afresh_quietly(tmp_path, caplog):
    (tmp_path / "checkpoints").mkdir()
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(tmp_path / "checkpoints", "auto") is None
        assert resolve_resume(tmp_path / "nothing", "auto") is None
    assert not caplog.text


def test_notes_say_when_nothing_is_left_and_when_a_fresh_run_meets_older_checkpoints(rerun):
    from foundation.train.trainer import resume_notes

    cfg = load_config(overrides=["train.iterations=30"])
    (note,) = resume_notes(cfg, rerun / tag_for(30), rerun)
    assert f"{rerun / tag_for(30)} is at step 30" in note and "train.iterations=30" in note
    assert "nothing left to train" in note
    assert resume_notes(load_config(overrides=["train.iterations=31"]), rerun / tag_for(30), rerun) == []
    (note,) = resume_notes(cfg, None, rerun)
    assert f"{rerun} holds 5 checkpoints of an earlier run (step_00000020 .. step_00000090)" in note
    assert resume_notes(cfg, None, rerun.parent / "elsewhere") == []


@pytest.fixture(scope="module")
def index(wsi, tmp_path_factory):
    return slide_index(wsi["svs_jpeg"], tmp_path_factory.mktemp("index"))


@pytest.mark.parametrize(("world_size", "stage", "message"), [
    (2, 1, "written by 2 ranks, this run has 1"),
    (1, 3, "written at ZeRO-3, this run is ZeRO-1"),
])
def test_wrong_topology_stops_the_cli_before_the_run_folder_is_written(index, tmp_path, caplog, monkeypatch,
                                                                      world_size, stage, message):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)  # a one-process run, as without a launcher
    run = tmp_path / "run"
    args = overrides(str(run), "ibot", 1, 40, 2)
    tag = fabricate(run / "checkpoints", 20, world_size=world_size, zero_stage=stage,
                    config=to_dict(load_config(overrides=args)))
    atomic_write_text(run / "checkpoints" / LATEST, tag.name)
    written = {run / "config.yaml": b"train:\n  iterations: 30\n", run / "deepspeed_config.json": b"{}\n"}
    for path, content in written.items():
        path.write_bytes(content)
    with caplog.at_level(logging.ERROR):
        code = main(["train", "--index", str(index), *args])  # train.resume=auto, the default
    assert code == 2
    assert f"{tag / COMPLETE}: {message}" in caplog.text
    for path, content in written.items():
        assert path.read_bytes() == content, path
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "deepspeed_config.json"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_cuts_metrics_back_to_the_resumed_step(tmp_path):
    path = tmp_path / METRICS_FILE
    # a run that logged to 80, crashed, was resumed from 79 and crashed again while writing a row at 80
    rows = [{"iteration": i, "loss/total": float(i)} for i in (78, 79, 80)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 8')
    logger = RunLogger(tmp_path, True, 100, 79, progress_bar=False)
    assert [r["iteration"] for r in _rows(path)] == [78, 79]  # before anything new is logged
    logger.scalars(80, {"loss/total": 0.5})
    logger.close()
    assert [(r["iteration"], r["loss/total"]) for r in _rows(path)] == [(78, 78.0), (79, 79.0), (80, 0.5)]
    assert not list(tmp_path.glob(f".{METRICS_FILE}*"))  # no temporary file left


def test_fresh_run_appends_to_metrics(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text(json.dumps({"iteration": 5, "loss/total": 1.0}) + "\n")
    logger = RunLogger(tmp_path, True, 10, 0, progress_bar=False)
    logger.scalars(1, {"loss/total": 2.0})
    logger.close()
    assert [r["iteration"] for r in _rows(path)] == [5, 1]
