"""The real objectives (iBOT, MAE; vit_test) under the trainer on 2 gloo ranks, on real H&E and IHC tiles.

ZeRO-1 and ZeRO-3 (with no persistent weights, so every ViT token must be gathered by the trainer), a few
steps each, plus a small overfit case at ZeRO-1: MAE on one fixed batch must drive its loss down.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_support import objectives_run, spawn

pytestmark = pytest.mark.distributed

OVERFIT_STEPS = 60


def _run(tmp_path_factory, data_dir: Path, stage: int, overfit_steps: int) -> dict:
    base = tmp_path_factory.mktemp(f"objectives_zero{stage}")
    spawn(objectives_run, str(data_dir), str(base), stage, str(base / "result.pt"), overfit_steps)
    return torch.load(base / "result.pt", weights_only=False)


@pytest.fixture(scope="module")
def zero1(tmp_path_factory, data_dir):
    return _run(tmp_path_factory, data_dir, 1, OVERFIT_STEPS)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, data_dir):
    return _run(tmp_path_factory, data_dir, 3, 0)


@pytest.mark.parametrize("stage", [1, 3])
@pytest.mark.parametrize(("objective", "terms", "has_teacher"), [
    ("ibot", {"loss/total", "loss/dino", "loss/ibot", "loss/koleo"}, True),
    ("mae", {"loss/total", "loss/mae"}, False),
])
def test_objective_trains_a_few_steps(stage, objective, terms, has_teacher, zero1, zero3):
    run = {1: zero1, 3: zero3}[stage][objective]
    assert run["state"] == {"iteration": 3, "nonfinite_total": 0, "nonfinite_in_row": 0}
    assert [r["iteration"] for r in run["rows"]] == [1, 2, 3]
    for row in run["rows"]:
        assert terms <= set(row), terms - set(row)
        assert all(math.isfinite(row[t]) for t in terms)
    assert run["moved"] > 0.9 * run["params"]  # the optimizer reached (almost) every student weight
    assert bool(run["teacher_keys"]) is has_teacher
    images = set(EventAccumulator(str(Path(run["dir"]) / "tensorboard"), size_guidance={"images": 0})
                 .Reload().Tags()["images"])
    expected = {"crops/global", "crops/local", "pictures/teacher_attention"} | ({"pictures/mae"} if not has_teacher
                                                                                else set())
    assert expected <= images, expected - images


def test_ibot_zero1_and_zero3_losses_agree(zero1, zero3):
    for a, b in zip(zero1["ibot"]["rows"], zero3["ibot"]["rows"], strict=True):
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=2e-2)


def test_overfit_one_batch_drives_the_mae_loss_down(zero1):
    losses = [r["loss/mae"] for r in zero1["mae_overfit"]["rows"]]
    assert len(losses) == OVERFIT_STEPS
    start, end = sum(losses[:3]) / 3, sum(losses[-10:]) / 10
    assert end < 0.55 * start, (start, end)
