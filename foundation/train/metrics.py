"""Per-window training metrics: sums kept on the device between logs, reduced over ranks once per log.

Nothing here synchronises the device during a step; :meth:`WindowMeter.reduce` does one all-reduce of a
packed tensor (sums) and one of the peak memory (max) every ``train.log_every`` steps, on every rank.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Mapping

import torch
import torch.distributed as dist

BYTES_PER_GB = 1024**3
KIB = 1024  # ru_maxrss is in KiB on Linux
_TINY_SECONDS = 1e-9  # guards divisions by an empty window


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated device memory on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * KIB


class WindowMeter:
    """Loss terms, timings and gradient norms since the last :meth:`reduce`."""

    def __init__(self, device: torch.device, world_size: int, images_per_step: int) -> None:
        self.device = device
        self.world_size = world_size
        self.images_per_step = images_per_step  # over all ranks
        self._reset()

    def _reset(self) -> None:
        self.term_sums: dict[str, torch.Tensor] = {}
        self.micro_steps = 0
        self.steps = 0
        self.step_seconds = 0.0
        self.data_seconds = 0.0
        self.grad_norms: list[torch.Tensor | float] = []
        self.window_start = time.perf_counter()

    def add_micro(self, loss: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> None:
        """One finite micro-step: the total loss and each (unweighted) term, kept on the device."""
        for name, value in {"total": loss, **terms}.items():
            value = value.detach().float()
            self.term_sums[name] = self.term_sums[name] + value if name in self.term_sums else value.clone()
        self.micro_steps += 1

    def add_step(self, step_seconds: float, data_seconds: float, grad_norm: torch.Tensor | float | None) -> None:
        self.steps += 1
        self.step_seconds += step_seconds
        self.data_seconds += data_seconds
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)

    def reduce(self) -> dict[str, float]:
        """Window means over steps and ranks (a collective: call it on every rank), then start a new window."""
        wall = time.perf_counter() - self.window_start
        names = sorted(self.term_sums)
        # DeepSpeed hands the norm back as a device tensor or a float: averaged on the device, one host copy. Over the
        # finite norms only: an fp16 step the loss scaler skipped (counted in health/overflow_skipped_steps) has an
        # inf norm and would make the whole window's mean inf; nan when no step of the window had one.
        grad_norm = torch.tensor(float("nan"), dtype=torch.float64)
        if self.grad_norms:
            norms = torch.stack([torch.as_tensor(g, dtype=torch.float64, device=self.device) for g in self.grad_norms])
            finite = torch.isfinite(norms)
            grad_norm = (torch.where(finite, norms, 0.0).sum() / finite.sum()).cpu()
        local = torch.stack([
            *[self.term_sums[n].double().cpu() / max(self.micro_steps, 1) for n in names],
            torch.tensor(self.data_seconds / max(wall, _TINY_SECONDS), dtype=torch.float64),
            torch.tensor(self.step_seconds / max(self.steps, 1), dtype=torch.float64),
            grad_norm,
        ])
        peak = torch.tensor([peak_memory_bytes(self.device)], dtype=torch.float64)
        if dist.is_initialized() and self.world_size > 1:
            # nccl reduces device tensors only, gloo host tensors only
            backend_device = torch.device("cuda", torch.cuda.current_device()) \
                if dist.get_backend() == "nccl" else torch.device("cpu")
            local, peak = local.to(backend_device), peak.to(backend_device)
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            local, peak = local.cpu() / self.world_size, peak.cpu()
        values = local.tolist()
        out = {f"loss/{n}": v for n, v in zip(names, values[:len(names)], strict=True)}
        data_share, step_time, grad_norm = values[len(names):]
        images_per_s = self.images_per_step * self.steps / max(wall, _TINY_SECONDS)
        out.update({
            "optim/grad_norm": grad_norm,
            "perf/images_per_s": images_per_s,
            "perf/images_per_s_per_gpu": images_per_s / self.world_size,
            "perf/data_wait_share": data_share,
            "perf/step_time_s": step_time,
            "perf/peak_memory_gb": float(peak.item()) / BYTES_PER_GB,
        })
        self._reset()
        return out
