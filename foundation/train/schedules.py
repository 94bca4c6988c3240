"""Training schedules as pure functions of the iteration (optimizer step), all read from ``cfg.train``.

Every schedule has one shape, :func:`warmup_cosine`: a linear ramp from ``start`` to ``peak`` over
``warmup_iters``, then a half cosine from ``peak`` to ``end`` over the remaining iterations. Special
cases cover every schedule of DINOv2/iBOT/MAE:

=====================  =========================================================================
schedule               typical spec
=====================  =========================================================================
``lr``                 ``start 0 -> peak (scaled base LR) -> end min_lr`` (warmup + cosine decay)
``weight_decay``       ``warmup_iters 0, peak 0.04 -> end 0.4`` (cosine increase)
``teacher_momentum``   ``warmup_iters 0, peak 0.992 -> end 1.0`` (cosine to 1)
``teacher_temp``       ``start 0.04 -> peak 0.07 == end 0.07`` (linear warmup, then constant)
``*_weight``           loss-term weights (constant by default)
=====================  =========================================================================

The base LR is given per ``reference_batch`` images and scaled to the global batch (``sqrt`` or
``linear`` rule, as in DINOv2's ``sqrt_wrt_1024`` and MAE's ``blr * batch / 256``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SCALING_RULES = ("sqrt", "linear", "none")


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule: ``start`` -> (linear, ``warmup_iters``) -> ``peak`` -> (cosine) -> ``end``."""

    start: float
    peak: float
    end: float
    warmup_iters: int

    @classmethod
    def constant(cls, value: float) -> ScheduleSpec:
        return cls(value, value, value, 0)

    @classmethod
    def from_cfg(cls, name: str, node: Any) -> ScheduleSpec:
        """A mapping ``{start, peak, end, warmup_iters}`` or a number (a constant)."""
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            return cls.constant(float(node))
        if not isinstance(node, Mapping):
            raise ValueError(f"train.schedules.{name} must be a number or a mapping with start, peak, end, "
                             f"warmup_iters; got {node!r}")
        keys = {"start", "peak", "end", "warmup_iters"}
        if set(node) != keys:
            raise ValueError(f"train.schedules.{name} must have exactly the keys {sorted(keys)}, got {sorted(node)}")
        warmup = node["warmup_iters"]
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"train.schedules.{name}.warmup_iters must be an int >= 0, got {warmup!r}")
        try:
            return cls(float(node["start"]), float(node["peak"]), float(node["end"]), warmup)
        except (TypeError, ValueError) as err:
            raise ValueError(f"train.schedules.{name}: start/peak/end must be numbers ({err})") from err


def warmup_cosine(iteration: int, total_iters: int, spec: ScheduleSpec) -> float:
    """Value of ``spec`` at ``iteration`` of a run of ``total_iters`` optimizer steps.

    Warmup: ``start + (peak - start) * it / warmup`` for ``it < warmup``. Then
    ``end + (peak - end) * (1 + cos(pi * (it - warmup) / (total - warmup))) / 2``, which equals ``peak`` at
    ``it = warmup`` and reaches ``end`` at ``it = total`` (one past the last step, as in DINOv2).
    Iterations past ``total`` hold ``end``.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if iteration < spec.warmup_iters:
        return spec.start + (spec.peak - spec.start) * iteration / spec.warmup_iters
    decay_iters = total_iters - spec.warmup_iters
    if decay_iters <= 0:
        return spec.peak
    if iteration >= total_iters:
        return spec.end
    progress = (iteration - spec.warmup_iters) / decay_iters
    return spec.end + 0.5 * (spec.peak - spec.end) * (1.0 + math.cos(math.pi * progress))


def scale_lr(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """The base LR given per ``reference_batch`` images, scaled to ``global_batch`` by ``rule``."""
    if rule not in SCALING_RULES:
        raise ValueError(f"train.lr_scaling must be one of {SCALING_RULES}, got {rule!r}")
    if global_batch <= 0 or reference_batch <= 0:
        raise ValueError(f"batch sizes must be positive (global {global_batch}, reference {reference_batch})")
    ratio = global_batch / reference_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if rule == "linear":
        return base_lr * ratio
    return base_lr


class Schedules:
    """All schedules of a run, evaluated per iteration.

    ``cfg_train.schedules`` maps a name to a :class:`ScheduleSpec` node, a number, or ``None``: a ``None``
    entry takes its constant from ``null_defaults`` (the objective's configured term weights) or is left
    out. The ``lr`` entry's ``start`` and ``peak`` are scaled by the global batch; ``end`` is the
    absolute minimum LR (as DINOv2's ``min_lr``).
    """

    def __init__(self, cfg_train: Mapping[str, Any], total_iters: int, global_batch: int,
                 null_defaults: Mapping[str, float] | None = None) -> None:
        if total_iters <= 0:
            raise ValueError(f"train.iterations must be > 0, got {total_iters}")
        self.total_iters = total_iters
        nodes = cfg_train["schedules"]
        for required in ("lr", "weight_decay"):
            if nodes.get(required) is None:
                raise ValueError(f"train.schedules.{required} is required")
        null_defaults = null_defaults or {}
        self.specs: dict[str, ScheduleSpec] = {}
        for name, node in nodes.items():
            if node is not None:
                self.specs[name] = ScheduleSpec.from_cfg(name, node)
            elif name in null_defaults:
                self.specs[name] = ScheduleSpec.constant(float(null_defaults[name]))
        factor = scale_lr(1.0, global_batch, int(cfg_train["lr_reference_batch"]), str(cfg_train["lr_scaling"]))
        lr = self.specs["lr"]
        self.specs["lr"] = ScheduleSpec(lr.start * factor, lr.peak * factor, lr.end, lr.warmup_iters)
        self.freeze_last_layer_iters = int(cfg_train["freeze_last_layer_iters"])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.specs)

    def values(self, iteration: int) -> dict[str, float]:
        """Every schedule at ``iteration``, plus ``last_layer_lr`` (0 while the prototypes are frozen)."""
        out = {name: warmup_cosine(iteration, self.total_iters, spec) for name, spec in self.specs.items()}
        out["last_layer_lr"] = 0.0 if iteration < self.freeze_last_layer_iters else out["lr"]
        return out
