"""The teacher read back from a real 2-rank ZeRO-3 training checkpoint (the trainer's own files, ~45 s)."""

from __future__ import annotations

import pytest
import torch
from train_support import TinyObjective, spawn, tiny_overrides, tiny_run

from foundation.eval.checkpoints import CheckpointFormatError, load_backbone, tag_dir

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("zero3")
    spawn(tiny_run, tiny_overrides(str(base / "run"), 3, 3), str(base / "result.pt"), {}, False)
    return base / "run", torch.load(base / "result.pt", weights_only=False)


def test_zero3_teacher_shards_reassemble_to_the_trained_teacher(zero3_run):
    run, result = zero3_run
    tag = tag_dir(run)
    assert sorted(p.name for p in (tag / "teacher").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    backbone, origin = load_backbone(tag, TinyObjective())
    assert origin == f"teacher of {tag}"
    trained = {k.removeprefix("backbone."): v for k, v in result["teacher"].items() if k.startswith("backbone.")}
    state = backbone.state_dict()
    assert state.keys() == trained.keys()
    for name, value in state.items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)


def test_zero3_student_is_refused_with_a_hint(zero3_run):
    run, _ = zero3_run
    with pytest.raises(CheckpointFormatError, match="ZeRO-3 checkpoint: use the teacher"):
        load_backbone(tag_dir(run), TinyObjective(), student=True)
