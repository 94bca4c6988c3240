"""Trainer pieces whose CPU and GPU behaviour differ: device tensors in the meter, autocast inside the engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from foundation.train.engine import autocast_inside_engine
from foundation.train.metrics import WindowMeter


class _RecordsAutocast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)  # fp32 weights, like the EMA teacher
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        self.seen.append((torch.is_autocast_enabled(x.device.type), y.dtype))
        return y


def test_autocast_is_restored_inside_an_engine_that_switches_it_off() -> None:
    """DeepSpeed's bf16 engine calls its module under ``autocast(enabled=False)``; the fp32 teacher inside must
    still compute in bf16, as in the plain reference step."""
    module = _RecordsAutocast()
    autocast_inside_engine(module, torch.device("cpu"), torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False):  # what DeepSpeed does
        module(torch.ones(2, 4))
    assert module.seen == [(True, torch.bfloat16)]
    assert list(module.state_dict()) == ["linear.weight", "linear.bias"]  # checkpoints are unchanged


def test_fp32_runs_leave_the_forward_alone() -> None:
    module = _RecordsAutocast()
    plain = module.forward
    autocast_inside_engine(module, torch.device("cpu"), None)
    assert module.forward == plain
    module(torch.ones(2, 4))
    assert module.seen == [(False, torch.float32)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_meter_reduces_device_losses_and_grad_norms() -> None:
    """DeepSpeed returns the gradient norm as a CUDA tensor; the window means mix it with host timings."""
    device = torch.device("cuda", torch.cuda.current_device())
    meter = WindowMeter(device, world_size=1, images_per_step=8)
    for norm in (1.0, 3.0):
        meter.add_micro(torch.tensor(0.5, device=device), {"mae": torch.tensor(0.25, device=device)})
        meter.add_step(0.1, 0.01, torch.tensor(norm, device=device))
    out = meter.reduce()
    assert out["optim/grad_norm"] == pytest.approx(2.0)
    assert out["loss/total"] == pytest.approx(0.5) and out["loss/mae"] == pytest.approx(0.25)
    assert out["perf/step_time_s"] == pytest.approx(0.1)
