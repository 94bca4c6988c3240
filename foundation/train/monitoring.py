"""The in-training kNN monitor (:mod:`foundation.eval.monitor`) as the loop calls it.

Every ``eval.monitor.every`` steps the loop calls :class:`TrainMonitor` on every rank (at ZeRO-3 the forward
gathers the partitioned weights collectively; the result is the same on each rank) and rank 0 logs the returned
scalars under ``monitor/``. It probes the EMA teacher's backbone, with the teacher's prototype head (iBOT, DINO)
at the step's ``teacher_temp``; objectives without a teacher (MAE, SimCLR) probe the student backbone. Student
and teacher run in eval mode (no drop path, no stain-token dropout) under ``no_grad`` and get their modes back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from foundation.eval.monitor import KnnMonitor

PREFIX = "monitor/"


class TrainMonitor:
    """``monitor(step_values) -> {"monitor/<name>": float}`` for the run's engine and teacher."""

    def __init__(self, monitor: KnnMonitor, every: int, engine: Any, teacher_module: torch.nn.Module | None,
                 compute_dtype: torch.dtype | None, device: torch.device,
                 gather: Sequence[torch.nn.Parameter] = ()) -> None:
        if every < 1:
            raise ValueError(f"eval.monitor.every must be >= 1, got {every}")
        self.monitor = monitor
        self.every = every
        self.engine = engine
        self.teacher_module = teacher_module
        self.compute_dtype = compute_dtype
        self.device = device
        self.gather = list(gather)  # ZeRO-3: parameters no module hook gathers outside the engine's forward

    def due(self, iteration: int) -> bool:
        return iteration % self.every == 0

    def modules(self) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """The probed backbone and head: the teacher's where there is a teacher, else the student backbone."""
        objective = self.engine.module
        if self.teacher_module is None:
            return objective.backbone(), None
        return objective.teacher_backbone(self.teacher_module), objective.teacher_head(self.teacher_module)

    def __call__(self, step_values: Mapping[str, float]) -> dict[str, float]:
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        backbone, head = self.modules()
        temp = None
        if head is not None:
            if "teacher_temp" not in step_values:
                raise KeyError(f"the teacher has a head but no teacher_temp is scheduled (have {sorted(step_values)})")
            temp = float(step_values["teacher_temp"])
        modes = [(m, m.training) for m in (self.engine, self.teacher_module) if m is not None]
        for module, _ in modes:
            module.eval()
        dtype = self.compute_dtype
        try:
            with torch.no_grad(), GatheredParameters(self.gather, modifier_rank=None, enabled=bool(self.gather)), \
                    torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                scalars = self.monitor(backbone, head, temp)
        finally:
            for module, mode in modes:
                module.train(mode)
        return {PREFIX + k: v for k, v in scalars.items()}
