"""Our training step, built and run exactly as ``foundation train`` does, on a fixed batch.

The engine, optimizer, EMA teacher and activation checkpointing come from ``foundation.train`` (trainer order);
one step is the loop's body: scheduled values, ``apply_schedule``, the loop's micro-steps (autocast forward,
the all-rank finite check, ``engine.backward``, ``engine.step``, the window meter), the EMA update and the
meter's step record. Logging, pictures and checkpoints (every N steps in a run) are left out.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch

from foundation.models.param_groups import param_groups
from foundation.objectives.base import Objective
from foundation.train.build import build_engines
from foundation.train.engine import (
    DistInfo,
    autocast_dtype,
    deepspeed_config,
    global_batch_size,
    keeps_grad_norm,
)
from foundation.train.loop import LoopParts, LoopState, _micro_steps
from foundation.train.metrics import WindowMeter
from foundation.train.schedules import Schedules


class OurStep:
    """One optimizer step of the DeepSpeed engine over ``objective`` on a fixed batch."""

    def __init__(self, objective: Objective, cfg: Any, batch: Mapping[str, torch.Tensor], schedules: Schedules,
                 iteration: int, dist: DistInfo) -> None:
        self.ds_config = deepspeed_config(cfg, dist.world_size)
        engines = build_engines(objective, param_groups(objective, cfg), cfg, self.ds_config, dist)
        self.engine, self.teacher = engines.engine, engines.teacher
        self.schedules, self.iteration = schedules, iteration
        self.parts = LoopParts(
            engine=self.engine, teacher=self.teacher, data=itertools.repeat(batch), schedules=schedules,
            logger=None, meter=WindowMeter(dist.device, dist.world_size, global_batch_size(cfg, dist.world_size)),
            checkpointer=None, device=dist.device, compute_dtype=autocast_dtype(str(cfg.train.precision)),
            grad_accum_steps=int(cfg.train.grad_accum_steps), log_every=10**9, checkpoint_every=0, image_every=0,
            max_nonfinite_in_row=1, grad_norm_before_step=not keeps_grad_norm(self.ds_config),
        )
        self.state = LoopState()
        self.last_loss: torch.Tensor | None = None

    def step(self) -> None:
        """The loop's body for one iteration (the loss lands in the meter, as in training)."""
        from foundation.train.engine import apply_schedule

        values = self.schedules.values(self.iteration)
        apply_schedule(self.engine.optimizer.param_groups, values)
        _, grad_norm = _micro_steps(self.parts, self.state, values)
        if self.teacher is not None:
            self.teacher.update(values["teacher_momentum"])
        self.parts.meter.add_step(0.0, 0.0, grad_norm)

    def loss(self) -> torch.Tensor:
        """Forward only (no grad), under the run's autocast: the loss ours computes on the batch now."""
        from foundation.perf.reference import autocast

        values = self.schedules.values(self.iteration)
        batch = next(self.parts.data)
        with torch.no_grad(), autocast(self.parts.device, self.parts.compute_dtype):
            loss, _ = self.engine(batch, self.teacher.module if self.teacher is not None else None, values)
        return loss.detach().float()

    def mean_loss(self) -> float:
        """Mean loss over the steps run so far (one host read, at the end)."""
        sums = self.parts.meter.term_sums
        return float(sums["total"]) / max(self.parts.meter.micro_steps, 1) if "total" in sums else float("nan")

    def release(self) -> None:
        """Drop the engine (and its hooks) so the next configuration starts clean."""
        self.engine.destroy() if hasattr(self.engine, "destroy") else None
        self.engine = self.teacher = self.parts = None  # type: ignore[assignment]
