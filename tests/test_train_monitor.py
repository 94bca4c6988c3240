"""The kNN monitor inside the trainer: a 1-rank vit_test run of iBOT (teacher + DINO head) and of MAE (no teacher)
on real H&E/IHC tiles, probed every 2 steps on real tiles of stain_he_vs_ihc grouped by source image.

The logged values must be finite, in TensorBoard and the JSONL under ``monitor/``, and equal to a probe of the
final teacher (iBOT, at the last step's teacher temperature; the teacher is frozen there so it differs from the
student) or the final student backbone (MAE) made after the run under the same autocast: the loop probed the right
module, and gave the student back its training mode.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from eval_support import HE_IHC_GROUPS
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_support import RealTileLoader, real_overrides, spawn

from foundation.config import ConfigError, load_config

STEPS = 4
EVERY = 2
PER_CLASS = 6
KNN = ("knn_balanced_accuracy", "feature_std")
HEAD = ("head_entropy", "head_marginal_entropy")


def monitor_overrides(data_dir: str, out_dir: str, objective: str, **extra: Any) -> list[str]:
    return real_overrides(out_dir, 1, objective, STEPS, **{
        "eval.monitor.tiles": str(Path(data_dir) / "tiles" / "stain_he_vs_ihc"), "eval.monitor.every": EVERY,
        "eval.monitor.max_tiles_per_class": PER_CLASS, "eval.monitor.group_by": f"'{HE_IHC_GROUPS}'",
        "eval.knn.k": 3, "train.image_every": 0, "train.log_every": 3, **extra})


def monitor_run(rank: int, data_dir: str, base: str, result_path: str) -> None:
    from foundation.eval.monitor import KnnMonitor
    from foundation.models.param_groups import param_groups
    from foundation.objectives import build_objective
    from foundation.train import trainer
    from foundation.train.engine import autocast_dtype, init_distributed

    dist = init_distributed()
    out: dict[str, Any] = {}
    for name in ("ibot", "mae"):
        run_dir = Path(base) / name
        # iBOT: the teacher stays at the initial weights while the student moves, so the two probes differ
        frozen = {"train.schedules.teacher_momentum": "{start: 1.0, peak: 1.0, end: 1.0, warmup_iters: 0}",
                  "train.schedules.lr": "{start: 5.0e-3, peak: 5.0e-3, end: 5.0e-3, warmup_iters: 0}"}
        extra = frozen if name == "ibot" else {}
        cfg = load_config(overrides=monitor_overrides(data_dir, str(run_dir), name, **extra))
        trainer.seed_everything(int(cfg.meta.seed))
        objective = build_objective(cfg)
        loader = RealTileLoader(Path(data_dir), cfg, rank, dist.world_size)
        result = trainer.run_training(cfg, objective, param_groups(objective, cfg), loader, dist)
        probe = KnnMonitor.from_config(cfg)
        dtype = autocast_dtype(str(cfg.train.precision))  # the loop probes under the training autocast
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            if result.teacher is not None:
                teacher = result.teacher.module
                temp = trainer.build_schedules(cfg, 1).values(STEPS - 1)["teacher_temp"]
                after = probe(objective.teacher_backbone(teacher), objective.teacher_head(teacher), temp)
                out["ibot_student"] = probe(objective.backbone(), objective.student["dino_head"], temp)
            else:
                after = probe(objective.backbone())
        out[name] = {"dir": str(run_dir), "after": after, "student_training": objective.training,
                     "rows": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]}
    torch.save(out, result_path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("monitor")
    spawn(monitor_run, str(data_dir), str(base), str(base / "result.pt"), world_size=1)
    return torch.load(base / "result.pt", weights_only=False)


@pytest.mark.parametrize(("objective", "names"), [("ibot", KNN + HEAD), ("mae", KNN)])
def test_monitor_scalars_reach_tensorboard_and_jsonl(runs, objective, names):
    run = runs[objective]
    tags = {f"monitor/{n}" for n in names}
    rows = {r["iteration"]: r for r in run["rows"] if any(k.startswith("monitor/") for k in r)}
    assert sorted(rows) == list(range(EVERY, STEPS + 1, EVERY))
    for row in rows.values():
        assert {k for k in row if k.startswith("monitor/")} == tags
        assert all(isinstance(row[t], float) and math.isfinite(row[t]) for t in tags), row
        assert 0.0 <= row["monitor/knn_balanced_accuracy"] <= 1.0
        assert row["monitor/feature_std"] > 0.0
    # log_every 3: the last step's probe joins the loss row, step 2's is a row of its own
    assert "loss/total" in rows[STEPS] and "loss/total" not in rows[EVERY]
    events = EventAccumulator(str(Path(run["dir"]) / "tensorboard")).Reload()
    assert tags <= set(events.Tags()["scalars"])
    for tag in tags:
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == sorted(rows)
        assert [e.value for e in logged] == pytest.approx([rows[e.step][tag] for e in logged], rel=1e-6)


@pytest.mark.parametrize(("objective", "names"), [("ibot", KNN + HEAD), ("mae", KNN)])
def test_last_probe_is_the_final_teacher_or_student(runs, objective, names):
    run = runs[objective]
    last = next(r for r in reversed(run["rows"]) if r["iteration"] == STEPS and "monitor/feature_std" in r)
    assert set(run["after"]) == set(names)
    for name in names:
        assert last[f"monitor/{name}"] == pytest.approx(run["after"][name], rel=1e-5, abs=1e-7), name
    assert run["student_training"] is True
    if objective == "ibot":  # the student moved away from the (frozen) teacher: its probe tells them apart
        assert runs["ibot_student"]["head_entropy"] != pytest.approx(run["after"]["head_entropy"], rel=1e-2)


def test_monitor_every_must_be_positive(data_dir, tmp_path):
    from foundation.train.trainer import validate

    cfg = load_config(overrides=monitor_overrides(str(data_dir), str(tmp_path), "ibot", **{"eval.monitor.every": 0}))
    with pytest.raises(ConfigError, match="eval.monitor.every"):
        validate(cfg)
