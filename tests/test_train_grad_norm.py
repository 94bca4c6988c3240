"""The foreach gradient norm given to DeepSpeed's ZeRO-1/2 optimizer equals DeepSpeed's own and a float64 sum."""

from __future__ import annotations

import pytest
import torch
from train_support import TinyObjective, spawn, synthetic_batch, tiny_overrides, tiny_param_groups

pytestmark = pytest.mark.distributed


def _norms(rank: int, stage: int, precision: str, result_path: str) -> None:
    import torch.distributed as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from foundation.config import load_config
    from foundation.train.build import build_engines
    from foundation.train.engine import deepspeed_config, init_distributed

    cfg = load_config(overrides=tiny_overrides("unused", stage, **{"train.precision": precision}))
    info = init_distributed()
    objective = TinyObjective(seed=0)
    engines = build_engines(objective, tiny_param_groups(objective), cfg, deepspeed_config(cfg, info.world_size),
                            info)
    engine, opt = engines.engine, engines.engine.optimizer
    values = {"teacher_temp": 0.05, "ibot_weight": 1.0, "mae_weight": 1.0}
    loss, _ = engine(synthetic_batch(4, seed=10 + rank), engines.teacher.module, values)
    engine.backward(loss * 1e3)  # gradients far from 1: a wrong sum of squares shows
    groups = range(len(opt.bit16_groups))
    ours = torch.stack([opt.get_grad_norm_direct(opt.averaged_gradients[i], opt.params_in_partition[i])
                        for i in groups])
    theirs = torch.stack([DeepSpeedZeroOptimizer.get_grad_norm_direct(opt, opt.averaged_gradients[i],
                                                                      opt.params_in_partition[i]) for i in groups])
    squares = torch.stack([sum((g.double() ** 2).sum() for g in opt.averaged_gradients[i]) for i in groups])
    dist.all_reduce(squares)  # each rank holds its partition's gradients (ZeRO-2: its part only)
    combined = opt.scaled_global_norm()  # what DeepSpeed clips with (a collective: every rank)
    if rank == 0:
        torch.save({"ours": ours, "theirs": theirs, "float64": squares.sqrt(), "global": combined,
                    "patched": "get_grad_norm_direct" in vars(opt)}, result_path)


@pytest.mark.parametrize(("stage", "precision"), [(1, "bf16"), (2, "fp32")])
def test_foreach_norm_equals_deepspeeds_on_two_ranks(tmp_path, stage, precision):
    path = tmp_path / "norms.pt"
    spawn(_norms, stage, precision, str(path), world_size=2)
    out = torch.load(path)
    assert out["patched"]
    assert len(out["ours"]) > 1 and (out["ours"] > 1).all()
    torch.testing.assert_close(out["ours"], out["theirs"], rtol=1e-6, atol=0)
    torch.testing.assert_close(out["ours"].double(), out["float64"], rtol=1e-6, atol=0)
    torch.testing.assert_close(out["global"].double(), out["float64"].square().sum().sqrt(), rtol=1e-6, atol=0)
