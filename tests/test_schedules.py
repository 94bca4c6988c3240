"""Schedules against closed-form values (DINOv2's CosineScheduler shape) and the LR scaling rules."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from foundation.config import load_config, to_dict
from foundation.train.schedules import Schedules, ScheduleSpec, scale_lr, warmup_cosine


def dinov2_cosine(base: float, final: float, total: int, warmup: int, start_warmup: float) -> np.ndarray:
    """DINOv2 ``CosineScheduler`` (dinov2/utils/utils.py), except that the warmup is ``start + (base-start)*i/w``."""
    warm = start_warmup + (base - start_warmup) * np.arange(warmup) / max(warmup, 1)
    iters = np.arange(total - warmup)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate([warm, cos])


def test_warmup_cosine_matches_closed_form_everywhere():
    spec = ScheduleSpec(start=0.0, peak=4e-3, end=1e-6, warmup_iters=10)
    ref = dinov2_cosine(4e-3, 1e-6, 100, 10, 0.0)
    got = np.array([warmup_cosine(i, 100, spec) for i in range(100)])
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)


def test_landmarks():
    spec = ScheduleSpec(start=0.1, peak=1.0, end=0.2, warmup_iters=4)
    assert warmup_cosine(0, 20, spec) == pytest.approx(0.1)
    assert warmup_cosine(2, 20, spec) == pytest.approx(0.55)  # half-way up the ramp
    assert warmup_cosine(4, 20, spec) == pytest.approx(1.0)  # peak where the cosine starts
    assert warmup_cosine(12, 20, spec) == pytest.approx(0.6)  # cosine midpoint: (peak + end) / 2
    assert warmup_cosine(20, 20, spec) == pytest.approx(0.2)  # end reached one past the last step
    assert warmup_cosine(500, 20, spec) == pytest.approx(0.2)


def test_teacher_momentum_reaches_one_and_is_monotone():
    spec = ScheduleSpec(start=0.992, peak=0.992, end=1.0, warmup_iters=0)
    values = [warmup_cosine(i, 50, spec) for i in range(51)]
    assert values[0] == 0.992 and values[-1] == 1.0
    assert all(b >= a for a, b in itertools.pairwise(values))
    # closed form at a quarter: 1 - 0.008 * (1 + cos(pi/4)) / 2
    assert values[12] == pytest.approx(1.0 - 0.004 * (1 + math.cos(math.pi * 12 / 50)), rel=1e-12)


def test_teacher_temp_warms_up_then_holds():
    spec = ScheduleSpec(start=0.04, peak=0.07, end=0.07, warmup_iters=30)
    assert warmup_cosine(15, 100, spec) == pytest.approx(0.055)
    assert [warmup_cosine(i, 100, spec) for i in (30, 60, 99)] == pytest.approx([0.07] * 3)


def test_warmup_longer_than_run_holds_peak():
    spec = ScheduleSpec(start=0.0, peak=1.0, end=0.0, warmup_iters=10)
    assert warmup_cosine(5, 8, spec) == pytest.approx(0.5)
    assert warmup_cosine(10, 8, spec) == 1.0


@pytest.mark.parametrize(("rule", "expected"), [("sqrt", 4e-3 * math.sqrt(2048 / 1024)), ("linear", 8e-3),
                                                ("none", 4e-3)])
def test_lr_scaling_rules(rule, expected):
    assert scale_lr(4e-3, 2048, 1024, rule) == pytest.approx(expected, rel=1e-12)


def test_bad_scaling_rule_is_named():
    with pytest.raises(ValueError, match="train.lr_scaling.*'cubic'"):
        scale_lr(1.0, 1, 1, "cubic")


def _train_cfg(**schedules):
    cfg = to_dict(load_config().train)
    cfg["schedules"].update(schedules)
    return cfg


def test_schedules_from_config_scale_lr_and_freeze_last_layer():
    cfg = _train_cfg(lr={"start": 0.0, "peak": 1e-3, "end": 1e-6, "warmup_iters": 10})
    cfg.update(lr_scaling="linear", lr_reference_batch=256, freeze_last_layer_iters=5)
    s = Schedules(cfg, total_iters=100, global_batch=512)
    v = s.values(5)
    assert v["lr"] == pytest.approx(0.5 * 2e-3)  # half-way up the warmup to the scaled peak
    assert v["last_layer_lr"] == v["lr"]
    assert s.values(4)["last_layer_lr"] == 0.0
    assert s.values(100)["lr"] == pytest.approx(1e-6)  # the minimum LR is absolute, not scaled
    assert s.values(0)["weight_decay"] == pytest.approx(0.04)


def test_null_weights_take_the_objective_default_numbers_are_constants():
    cfg = _train_cfg(mae_weight=None, ibot_weight=0.5, dino_weight=None)
    s = Schedules(cfg, total_iters=10, global_batch=1024, null_defaults={"mae_weight": 2.0})
    v = s.values(3)
    assert v["mae_weight"] == 2.0 and v["ibot_weight"] == 0.5
    assert "dino_weight" not in v  # null without an objective default: left to the objective


def test_malformed_schedule_is_named():
    with pytest.raises(ValueError, match="train.schedules.teacher_temp"):
        Schedules(_train_cfg(teacher_temp={"start": 0.04, "peak": 0.07}), 10, 1024)
    with pytest.raises(ValueError, match="train.schedules.lr.warmup_iters"):
        Schedules(_train_cfg(lr={"start": 0, "peak": 1, "end": 0, "warmup_iters": -1}), 10, 1024)
