"""DeepSpeed ZeRO-1/2 clipping as the trainer sets it up (``foundation/train/grad_norm.py``): the same global norm
as DeepSpeed's own and as a float64 sum over the ranks, and bitwise the same clipped gradients."""

from __future__ import annotations

import pytest
import torch
from train_support import TinyObjective, spawn, synthetic_batch, tiny_overrides, tiny_param_groups

pytestmark = pytest.mark.distributed


def _clipping(rank: int, stage: int, precision: str, result_path: str) -> None:
    import torch.distributed as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from foundation.config import load_config
    from foundation.train.build import build_engines
    from foundation.train.engine import deepspeed_config, init_distributed

    cfg = load_config(overrides=tiny_overrides("unused", stage, **{"train.precision": precision,
                                                                   "train.grad_clip": 0.5}))
    info = init_distributed()
    objective = TinyObjective(seed=0)
    engines = build_engines(objective, tiny_param_groups(objective), cfg, deepspeed_config(cfg, info.world_size),
                            info)
    engine, opt = engines.engine, engines.engine.optimizer
    values = {"teacher_temp": 0.05, "ibot_weight": 1.0, "mae_weight": 1.0}
    loss, _ = engine(synthetic_batch(4, seed=10 + rank), engines.teacher.module, values)
    engine.backward(loss * 1e3)  # gradients far from 1: a wrong sum of squares shows, and clipping acts
    ours = opt.scaled_global_norm()
    theirs = DeepSpeedZeroOptimizer.scaled_global_norm(opt)
    squares = sum((g.double() ** 2).sum() for grads in opt.averaged_gradients.values() for g in grads)
    dist.all_reduce(squares)  # each rank holds its partition's gradients (ZeRO-2: its part only)
    flat = [torch.cat([g.float().reshape(-1) for g in opt.averaged_gradients[i]]) for i in opt.averaged_gradients]
    clipped = {"ours": [f.clone() for f in flat], "nan": [f.clone() for f in flat]}
    opt.unscale_and_clip_grads(clipped["ours"], ours)
    clipped["nan"][0][0] = float("nan")  # a non-finite gradient: its norm is not finite either
    opt.unscale_and_clip_grads(clipped["nan"], torch.tensor(float("nan")))
    clipped["theirs"] = [f.clone() for f in flat]
    DeepSpeedZeroOptimizer.unscale_and_clip_grads(opt, clipped["theirs"], ours)
    if rank == 0:
        torch.save({"ours": ours, "theirs": theirs, "float64": squares.sqrt(), "clipped": clipped, "flat": flat,
                    "patched": {"scaled_global_norm", "unscale_and_clip_grads"} <= set(vars(opt))}, result_path)


@pytest.mark.parametrize(("stage", "precision"), [(1, "bf16"), (2, "fp32")])
def test_norm_and_clipping_equal_deepspeeds_on_two_ranks(tmp_path, stage, precision):
    path = tmp_path / "clipping.pt"
    spawn(_clipping, stage, precision, str(path), world_size=2)
    out = torch.load(path)
    assert out["patched"]
    assert out["ours"] > 1
    torch.testing.assert_close(out["ours"], out["theirs"], rtol=1e-6, atol=0)
    torch.testing.assert_close(out["ours"].double(), out["float64"], rtol=1e-6, atol=0)
    for ours, theirs, plain in zip(out["clipped"]["ours"], out["clipped"]["theirs"], out["flat"], strict=True):
        assert torch.equal(ours, theirs)  # the same scale factor, computed on the device
        torch.testing.assert_close(ours, plain * 0.5 / float(out["ours"]), rtol=1e-5, atol=1e-12)  # clip to 0.5
    # a non-finite norm: every gradient becomes 0, the NaN one too (no host check needed)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in out["clipped"]["nan"])


def _norms_zero0_and_zero1(rank: int, result_path: str) -> None:
    from foundation.config import load_config
    from foundation.train.build import build_engines
    from foundation.train.engine import deepspeed_config, init_distributed, keeps_grad_norm

    info = init_distributed()
    out = {}
    for stage in (0, 1):
        cfg = load_config(overrides=tiny_overrides("unused", stage, **{"train.precision": "fp32",
                                                                       "train.grad_clip": 0.5}))
        ds_config = deepspeed_config(cfg, info.world_size)
        objective = TinyObjective(seed=0)
        engines = build_engines(objective, tiny_param_groups(objective), cfg, ds_config, info)
        engine = engines.engine
        loss, _ = engine(synthetic_batch(4, seed=10), engines.teacher.module, {"teacher_temp": 0.05,
                                                                             "ibot_weight": 1.0, "mae_weight": 1.0})
        engine.backward(loss * 1e3)
        # what the loop measures when DeepSpeed keeps no norm (LoopParts.grad_norm_before_step)
        before = torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters() if p.grad is not None])
        engine.step()
        out[stage] = {"keeps": keeps_grad_norm(ds_config), "deepspeed": engine.get_global_grad_norm(),
                      "before_step": before}
    torch.save(out, result_path)


def test_the_loop_measures_the_norm_deepspeed_does_not_keep_at_zero0(tmp_path):
    path = tmp_path / "norms.pt"
    spawn(_norms_zero0_and_zero1, str(path), world_size=1)
    out = torch.load(path)
    assert out[0]["keeps"] is False and out[0]["deepspeed"] is None  # ZeRO-0 fp32: clipped, no norm kept
    assert out[1]["keeps"] is True and float(out[1]["deepspeed"]) > 1
    torch.testing.assert_close(out[0]["before_step"].double(), torch.as_tensor(out[1]["deepspeed"]).double(),
                               rtol=1e-5, atol=0)  # the same batch and weights: the norm ZeRO-1 reports
