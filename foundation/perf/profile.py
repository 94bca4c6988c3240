"""Where a step's time goes: device kernel time by kind, the busiest kernels and the busiest host operators.

``profile_step`` runs a few steps under ``torch.profiler`` and sums the time of every device kernel. Set against
the unprofiled step time of the same side (the profiler slows the host, not the kernels), it splits a step into
device work and device idle time (host work, synchronisation, launch gaps): the first question when our step is
slower than the plain reference.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from foundation.perf.measure import synchronize

US_PER_MS = 1000.0
# Kernel kinds, matched in order on the kernel's name (case-insensitive); the first match wins.
KERNEL_KINDS = (
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(mha|attn)"),
    ("matmul", r"gemm|cutlass|xmma|sm\d\d_|cublas|wgmma"),
    ("communication", r"nccl"),
    ("optimizer_foreach", r"adam|multi_tensor|foreach"),  # AdamW, clipping norms, the EMA lerp
    ("copy", r"memcpy|memset|copy|concat|cat_|transpose"),
    ("reduction", r"reduce|norm|softmax|sum|mean|max"),
)


def kernel_kind(name: str) -> str:
    """The kind of a device kernel from its name (``elementwise`` when nothing else matches)."""
    lowered = name.lower()
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, lowered):
            return kind
    return "elementwise"


def _rows(events: list[Any], time_of: Callable[[Any], float], steps: int, top: int) -> list[dict[str, Any]]:
    ranked = sorted(events, key=time_of, reverse=True)[:top]
    return [{"name": e.key[:160], "ms_per_step": time_of(e) / US_PER_MS / steps, "calls_per_step": e.count / steps}
            for e in ranked]


def profile_step(step: Callable[[], Any], steps: int, device: torch.device, top: int) -> dict[str, Any]:
    """Kernel time per step (total and by kind), the ``top`` kernels and the ``top`` host operators by self time.

    On the CPU there are no device kernels: the kernel figures are None and only the host operators are listed.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    events = list(prof.key_averages())
    kernels = [e for e in events if e.device_type.name != "CPU" and e.self_device_time_total > 0]
    host = [e for e in events if e.device_type.name == "CPU"]
    by_kind: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.self_device_time_total / US_PER_MS / steps
    on_device = device.type != "cpu"
    return {
        "steps": steps,
        "device_ms_per_step": sum(by_kind.values()) if on_device else None,
        "kernel_launches_per_step": sum(e.count for e in kernels) / steps,
        "device_ms_per_step_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top_kernels": _rows(kernels, lambda e: e.self_device_time_total, steps, top),
        "top_host_ops": _rows(host, lambda e: e.self_cpu_time_total, steps, top),
    }


def idle_share(profile: dict[str, Any], step_seconds: float) -> float | None:
    """Share of the (unprofiled) step time the device had no kernel running (None on the CPU)."""
    if profile["device_ms_per_step"] is None:
        return None
    return max(0.0, 1.0 - profile["device_ms_per_step"] / (step_seconds * US_PER_MS))


def profile_line(profile: dict[str, Any], shown: int = 4) -> str:
    """One line: kernel ms per step by kind on a device, the busiest host operators on the CPU."""
    kinds = profile["device_ms_per_step_by_kind"]
    if kinds:
        return "kernel ms/step " + ", ".join(f"{k} {v:.1f}" for k, v in kinds.items())
    ops = profile["top_host_ops"][:shown]
    return "host ms/step " + ", ".join(f"{op['name']} {op['ms_per_step']:.2f}" for op in ops)
