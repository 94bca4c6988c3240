"""Timing, FLOP counting, the GEMM ceiling, peak memory and the environment record, on any device."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from foundation.train.metrics import peak_memory_bytes


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[], Any], steps: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as torch's FLOP counter sees them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def gemm_tflops(device: torch.device, size: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Achieved TFLOP/s of a ``size``^3 matmul in ``dtype`` on ``device`` (the MFU denominator)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    time_steps(lambda: a @ b, 2, device)
    per_call = median([time_steps(lambda: a @ b, 5, device) for _ in range(repeats)])
    return 2 * size**3 / per_call / 1e12


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated device memory since the last reset (GPU), the process's peak RSS (CPU: never reset)."""
    return peak_memory_bytes(device) / 1024**3


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware of this run."""
    import deepspeed
    import timm

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__, "timm": timm.__version__, "device": str(device),
        "host": platform.node(), "cpu_threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env
