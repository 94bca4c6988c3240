"""Preemption: SIGTERM, SIGINT and SIGUSR1 (SLURM's warning signal) ask the loop to stop after the current step.

The handler only sets a flag; the loop asks every rank at the end of each step (one all-reduce of that flag,
so all ranks stop at the same step even when only one was signalled), saves a checkpoint and returns.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """Installs the handlers on ``__enter__``, restores the previous ones on ``__exit__``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum

    def __enter__(self) -> StopRequest:
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                break
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def requested(self, device: torch.device) -> bool:
        """Whether any rank received a stop signal (a collective: call it on every rank)."""
        flag = torch.tensor([1.0 if self.signum is not None else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.to(device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
