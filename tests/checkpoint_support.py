"""Test helpers for checkpoints: real objectives (iBOT, MAE on vit_test) fed from a synthetic *global* sample order,
runs that are killed with SIGKILL at a given step or mid-save, and resumed runs on any world size."""

from __future__ import annotations

import csv
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tests.objective_support import IMG, LOCAL, N_PATCHES, SMALL_HEADS

SAMPLE_SEED = 12345


def sample(position: int) -> dict[str, torch.Tensor]:
    """The sample at a global position of the synthetic order (deterministic in the position alone)."""
    g = torch.Generator().manual_seed(SAMPLE_SEED + position)
    return {
        "global_crops": torch.randn(2, 3, IMG, IMG, generator=g),
        "local_crops": torch.randn(2, 3, LOCAL, LOCAL, generator=g),
        "masks": torch.rand(2, N_PATCHES, generator=g) < 0.4,
        "stain_ids": torch.randint(0, 4, (), generator=g),
        "marker_ids": torch.randint(0, 3, (), generator=g),
    }


class GlobalOrderLoader:
    """Like the DALI loader: rank ``r`` of ``W`` takes positions ``P + r*B .. P + r*B + B - 1`` of the global order;
    the state is the global position ``P``, so it resumes on any world size. ``kill_at``: SIGKILL this process
    when asked for the batch of that step (counted from position 0)."""

    def __init__(self, batch_size: int, rank: int, world_size: int, kill_at: int | None = None,
                 term_at: int | None = None) -> None:
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.position = 0
        self.kill_at, self.term_at = kill_at, term_at
        self.consumed: list[int] = []

    def __iter__(self) -> GlobalOrderLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.kill_at is not None and self.position == self.kill_at * self.batch_size * self.world_size:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.term_at is not None and self.position == self.term_at * self.batch_size * self.world_size:
            os.kill(os.getpid(), signal.SIGTERM)  # as SLURM would; the step in progress still completes
        first = self.position + self.rank * self.batch_size
        positions = list(range(first, first + self.batch_size))
        self.consumed += positions
        samples = [sample(p) for p in positions]
        self.position += self.batch_size * self.world_size
        return {
            "global_crops": torch.stack([s["global_crops"] for s in samples], 1),
            "local_crops": torch.stack([s["local_crops"] for s in samples], 1),
            "masks": torch.stack([s["masks"] for s in samples], 1),
            "stain_ids": torch.stack([s["stain_ids"] for s in samples]),
            "marker_ids": torch.stack([s["marker_ids"] for s in samples]),
        }

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.position = int(state["position"])


def overrides(out_dir: str, objective: str, stage: int, iterations: int, batch: int, **extra: Any) -> list[str]:
    items = {
        "model": "vit_test", "objective": objective, "meta.output_dir": out_dir, "deepspeed": f"zero{stage}",
        "data.pipeline.batch_size": batch, "data.crops.global_size": IMG, "data.crops.local_size": LOCAL,
        "data.crops.local_count": 2, "train.iterations": iterations, "train.log_every": 1, "train.image_every": 0,
        "train.checkpoint_every": 2, "train.keep_checkpoints": 5, "train.progress_bar": False,
        "train.freeze_last_layer_iters": 1, "train.lr_scaling": "none",
        "train.schedules.lr": "{start: 0.0, peak: 2.0e-3, end: 1.0e-4, warmup_iters: 2}",
        "train.schedules.teacher_momentum": "{start: 0.9, peak: 0.9, end: 1.0, warmup_iters: 0}", **extra,
    }
    return [*SMALL_HEADS, *(f"{k}={v}" for k, v in items.items())]


def slide_index(slide: Path, base: Path) -> Path:
    """A real tile index of one slide at 1 µm/px in ``base/index`` (the train CLI reads the index before it looks at
    a checkpoint, so a CLI test of a bad resume needs one)."""
    from foundation.cli import main

    base.mkdir(parents=True, exist_ok=True)
    with open(base / "manifest.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "stain"], [str(slide), "H&E"]])
    assert main(["index", str(base / "manifest.csv"), "--out", str(base / "index"), "--workers", "1",
                 "--mpp", "1.0"]) == 0
    return base / "index"


def _kill_mid_save(at_iteration: int) -> None:
    """Every rank dies (SIGKILL) once all have written step ``at_iteration``, before it is committed."""
    from foundation.train import checkpoint

    save, barrier = checkpoint.Checkpointer.save, checkpoint._barrier
    calls = {"n": 0}

    def counting_barrier() -> None:
        barrier()
        calls["n"] += 1
        if calls["n"] == 2:  # the barrier after every rank wrote its files
            os.kill(os.getpid(), signal.SIGKILL)

    def dying_save(self: Any, iteration: int, *args: Any) -> Any:
        if iteration == at_iteration:
            checkpoint._barrier = counting_barrier
        return save(self, iteration, *args)

    checkpoint.Checkpointer.save = dying_save


def _record_loaded_buffers(into: dict[str, torch.Tensor]) -> Any:
    """Make ``Checkpointer.load`` copy the engine module's buffers into ``into`` right after it restored them
    (what the resumed run starts from); returns the original method, to put back."""
    from foundation.train import checkpoint

    load = checkpoint.Checkpointer.load

    def recording_load(self: Any, tag_dir: Any) -> Any:
        restored = load(self, tag_dir)
        into.update({n: b.detach().cpu().clone() for n, b in self.engine.module.named_buffers()})
        return restored

    checkpoint.Checkpointer.load = recording_load
    return load


def train(rank: int, world_size: int, args: list[str], kill_at: int | None = None,
          kill_mid_save: int | None = None, term_at: int | None = None, term_rank: int = 1,
          record_loaded_buffers: bool = False) -> dict[str, Any]:
    """One run of the real objective in this process; returns what the tests compare (on every rank).
    ``record_loaded_buffers``: also return the module buffers as the resume restored them (``loaded_buffers``)."""
    from deepspeed.utils import safe_get_full_fp32_param

    from foundation.config import load_config, save_config
    from foundation.models.param_groups import param_groups
    from foundation.objectives import build_objective
    from foundation.train import trainer
    from foundation.train.engine import init_distributed

    cfg = load_config(overrides=args)
    dist = init_distributed()
    if rank == 0:
        save_config(cfg, trainer.run_dir(cfg) / "config.yaml")
    trainer.seed_everything(int(cfg.meta.seed))
    objective = build_objective(cfg)
    loader = GlobalOrderLoader(int(cfg.data.pipeline.batch_size), rank, world_size, kill_at,
                               term_at if rank == term_rank else None)
    if kill_mid_save is not None:
        _kill_mid_save(kill_mid_save)
    loaded: dict[str, torch.Tensor] = {}
    original_load = _record_loaded_buffers(loaded) if record_loaded_buffers else None
    try:
        result = trainer.run_training(cfg, objective, param_groups(objective, cfg), loader, dist)
    finally:
        if original_load is not None:
            from foundation.train import checkpoint

            checkpoint.Checkpointer.load = original_load
    out = {"student": {n: safe_get_full_fp32_param(p).float().cpu() for n, p in objective.named_parameters()},
           "state": result.state.state_dict(), "position": loader.position, "consumed": loader.consumed,
           "stopped": result.state.stopped}
    if record_loaded_buffers:
        out["loaded_buffers"] = loaded
    if result.teacher is not None:
        out["teacher"] = result.teacher.full_state_dict()
    return out


def run_many(rank: int, world_size: int, jobs: list[dict[str, Any]], result_path: str) -> None:
    """``train(**job)`` for each job in order (a killed job ends the process); rank 0 saves the outcomes,
    every rank its consumed positions."""
    outcomes = []
    for job in jobs:
        outcomes.append(train(rank, world_size, **job))
        if rank == 0:
            torch.save(outcomes, result_path)
        torch.save([o["consumed"] for o in outcomes], f"{result_path}.rank{rank}")


def spawn_jobs(world_size: int, jobs: list[dict[str, Any]], result_path: str, killed: bool = False) -> None:
    """Run ``jobs`` on ``world_size`` gloo ranks; with ``killed`` the processes are expected to die by SIGKILL."""
    import torch.multiprocessing as mp
    from train_support import spawn

    if not killed:
        spawn(run_many, world_size, jobs, result_path, world_size=world_size)
        return
    try:
        spawn(run_many, world_size, jobs, result_path, world_size=world_size)
    except mp.ProcessExitedException as err:
        assert err.exit_code == -signal.SIGKILL or "signal" in str(err), err
    else:
        raise AssertionError("the run was expected to be killed")
