"""The training loop: per step, the scheduled values, then per micro-batch one student call (the objective
runs the teacher inside it), one loss, one backward, one ``engine.step``; then the EMA update, logs,
pictures, the kNN monitor (every ``eval.monitor.every`` steps, logged under ``monitor/``) and checkpoints.

A non-finite loss (on any rank: the ranks agree through one all-reduce) skips that micro-batch before its
backward, so no NaN reaches a gradient or a weight; it is counted and the next batch is taken.
``train.max_nonfinite_in_row`` of them in a row raise :class:`NonFiniteLossError` without saving, so the
last checkpoint stays the last good state.

A stop signal (:mod:`foundation.train.signals`) ends the loop after the step in progress: it saves a checkpoint
(unless that step just saved one) and returns with ``state.stopped`` set.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from foundation.train.checkpoint import Checkpointer
from foundation.train.engine import apply_schedule
from foundation.train.logging import RunLogger
from foundation.train.metrics import WindowMeter
from foundation.train.monitoring import TrainMonitor
from foundation.train.schedules import Schedules
from foundation.train.teacher import EMATeacher


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stops without saving."""


@dataclass
class LoopState:
    """What the loop needs to continue exactly where it stopped (saved in every checkpoint)."""

    iteration: int = 0
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    stopped: bool = False  # ended early by a stop signal (not saved in checkpoints)

    def state_dict(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "stopped"}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, int]) -> LoopState:
        return cls(**{k: int(state[k]) for k in ("iteration", "nonfinite_total", "nonfinite_in_row")})


@dataclass
class LoopParts:
    """Everything the loop drives; built by :mod:`foundation.train.trainer`."""

    engine: Any
    teacher: EMATeacher | None
    data: Iterator[Mapping[str, torch.Tensor]]
    schedules: Schedules
    logger: RunLogger
    meter: WindowMeter
    checkpointer: Checkpointer
    device: torch.device
    compute_dtype: torch.dtype | None
    grad_accum_steps: int
    log_every: int
    checkpoint_every: int
    image_every: int
    max_nonfinite_in_row: int
    data_state: Callable[[], Mapping[str, Any] | None] = lambda: None
    pictures: Callable[[int], None] | None = None
    stop: Callable[[torch.device], bool] | None = None  # a collective: whether any rank was asked to stop
    monitor: TrainMonitor | None = None  # the kNN monitor (a collective at ZeRO-3: every rank calls it)
    # ZeRO-0 in fp32: DeepSpeed clips without keeping the norm, so the loop measures it before the step
    grad_norm_before_step: bool = False


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def finite_on_all_ranks(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (one all-reduce of a flag)."""
    flag = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() != "nccl":
            flag = flag.cpu()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _nonfinite(parts: LoopParts, state: LoopState, loss: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> None:
    state.nonfinite_total += 1
    state.nonfinite_in_row += 1
    shown = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
    parts.logger.message(f"step {state.iteration}: non-finite loss on at least one rank (rank 0: "
                         f"{float(loss.detach()):.4g}; {shown}); batch skipped, none stepped "
                         f"({state.nonfinite_in_row} in a row, {state.nonfinite_total} in total)")
    if state.nonfinite_in_row >= parts.max_nonfinite_in_row:
        latest = parts.checkpointer.latest_tag()
        kept = f"the last checkpoint {parts.checkpointer.directory / latest} is intact" if latest else \
            "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"{state.nonfinite_in_row} non-finite losses in a row at step {state.iteration} "
            f"(train.max_nonfinite_in_row={parts.max_nonfinite_in_row}); stopping without saving: {kept}. "
            "Lower the LR or raise its warmup, prefer bf16 to fp16, check the data, then resume.")


def _micro_steps(parts: LoopParts, state: LoopState,
                 values: Mapping[str, float]) -> tuple[float, torch.Tensor | float | None]:
    """Run ``grad_accum_steps`` finite micro-batches (backward + engine.step each); return the seconds spent
    waiting for data and the step's gradient norm (before clipping; a device tensor where DeepSpeed keeps one)."""
    teacher_module = parts.teacher.module if parts.teacher is not None else None
    data_seconds = 0.0
    grad_norm = None
    done = 0
    while done < parts.grad_accum_steps:
        start = time.perf_counter()
        batch = to_device(next(parts.data), parts.device)
        data_seconds += time.perf_counter() - start
        with _autocast(parts.device, parts.compute_dtype):
            loss, terms = parts.engine(batch, teacher_module, values)
        if not finite_on_all_ranks(loss):
            _nonfinite(parts, state, loss, terms)
            continue
        state.nonfinite_in_row = 0
        parts.engine.backward(loss)
        if parts.grad_norm_before_step and done + 1 == parts.grad_accum_steps:
            grads = [p.grad for p in parts.engine.module.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        parts.engine.step()
        parts.meter.add_micro(loss, terms)
        done += 1
    return data_seconds, grad_norm if parts.grad_norm_before_step else parts.engine.get_global_grad_norm()


def _due(iteration: int, every: int, last: bool) -> bool:
    return last or (every > 0 and iteration % every == 0)


def train_loop(parts: LoopParts, state: LoopState, total_iters: int) -> LoopState:
    """Train from ``state.iteration`` to ``total_iters``; checkpoints at ``checkpoint_every`` and at the end."""
    while state.iteration < total_iters:
        step_start = time.perf_counter()
        values = parts.schedules.values(state.iteration)
        apply_schedule(parts.engine.optimizer.param_groups, values)
        data_seconds, grad_norm = _micro_steps(parts, state, values)
        if parts.teacher is not None:
            parts.teacher.update(values["teacher_momentum"])
        state.iteration += 1
        parts.meter.add_step(time.perf_counter() - step_start, data_seconds, grad_norm)
        parts.logger.advance()
        last = state.iteration == total_iters
        monitored = parts.monitor(values) if parts.monitor is not None and parts.monitor.due(state.iteration) else {}
        if _due(state.iteration, parts.log_every, last):
            scalars = parts.meter.reduce()
            scalars.update({f"schedule/{k}": v for k, v in values.items()})
            scalars["health/nonfinite_losses"] = float(state.nonfinite_total)
            # fp16: steps DeepSpeed's loss scaler skipped on gradient overflow (0 in bf16/fp32)
            scalars["health/overflow_skipped_steps"] = float(parts.engine.skipped_steps)
            parts.logger.scalars(state.iteration, {**scalars, **monitored})
        elif monitored:
            parts.logger.scalars(state.iteration, monitored)
        if parts.pictures is not None and parts.image_every > 0 and state.iteration % parts.image_every == 0:
            parts.pictures(state.iteration)
        saved = _due(state.iteration, parts.checkpoint_every, last)
        if saved:
            parts.checkpointer.save(state.iteration, state.state_dict(), parts.data_state())
        if not last and parts.stop is not None and parts.stop(parts.device):
            if not saved:
                parts.checkpointer.save(state.iteration, state.state_dict(), parts.data_state())
            parts.logger.message(f"stop signal: saved step {state.iteration} and stopped")
            state.stopped = True
            break
    parts.logger.flush()
    return state
