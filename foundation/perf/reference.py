"""The plain-PyTorch reference step: the same objective, batch and precision as ours, without DeepSpeed.

What it does per step, as ``../shared/reference/h100_reference_step.py``: forward under autocast (fp32 weights),
``loss.backward()``, the same gradient clipping (``clip_grad_norm_`` with foreach), ``torch.optim.AdamW``
(fused on CUDA) over the same parameter groups and learning rates, ``zero_grad(set_to_none=True)``, and the
EMA update as one ``torch._foreach_lerp_`` over the (student, teacher) pairs. No host synchronisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from foundation.models.param_groups import param_groups
from foundation.objectives.base import Objective
from foundation.train.engine import apply_schedule
from foundation.train.teacher import init_teacher_weights


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


class ReferenceStep:
    """One optimizer step of ``objective`` (moved to ``device`` in fp32) on a fixed batch."""

    def __init__(self, objective: Objective, cfg: Any, batch: Mapping[str, torch.Tensor],
                 values: Mapping[str, float], device: torch.device, compute_dtype: torch.dtype | None) -> None:
        self.objective = objective.to(device=device, dtype=torch.float32).train()
        self.teacher: nn.Module | None = objective.build_teacher()
        self.pairs = objective.teacher_pairs(self.teacher) if self.teacher is not None else []
        init_teacher_weights(self.pairs)
        if self.teacher is not None:
            self.teacher.to(device=device, dtype=torch.float32).requires_grad_(False).eval()
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad], "lr": 0.0, "weight_decay": 0.0}
                  for g in param_groups(objective, cfg)]
        groups = [g for g in groups if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(float(b) for b in cfg.train.adamw_betas),
                                           eps=float(cfg.train.adamw_eps), fused=device.type == "cuda")
        self.params = [p for g in groups for p in g["params"]]
        self.clip = float(cfg.train.grad_clip)
        self.batch, self.values, self.device, self.dtype = batch, dict(values), device, compute_dtype
        self._teacher_params = [t for _, t in self.pairs]
        self._student_params = [s for s, _ in self.pairs]

    def forward_backward(self) -> torch.Tensor:
        """Loss and gradients of the batch (what the FLOP counter sees)."""
        with autocast(self.device, self.dtype):
            loss, _ = self.objective(self.batch, self.teacher, self.values)
        loss.backward()
        return loss.detach()

    def step(self) -> torch.Tensor:
        """One full training step; returns the (detached) loss."""
        apply_schedule(self.optimizer.param_groups, self.values)
        loss = self.forward_backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self._teacher_params:
            with torch.no_grad():
                torch._foreach_lerp_(self._teacher_params, self._student_params,
                                     1.0 - float(self.values["teacher_momentum"]))
        return loss
