"""ZeRO-3 leaf blocks (``train.zero3_leaf_modules``, foundation/train/zero3_leaf.py) on 2 gloo ranks: the same
training as ZeRO-3 with a hook per layer, bitwise, and a clear stop when an objective calls a block twice."""

from __future__ import annotations

import pytest
import torch
from train_support import TinyObjective, spawn, synthetic_batch, tiny_overrides, tiny_param_groups

pytestmark = pytest.mark.distributed

STEPS = 3


class TwiceObjective(TinyObjective):
    """Runs the student backbone twice per step (one call per crop): what a leaf block must not see."""

    def forward(self, batch, teacher, step_values):
        crops = batch["global_crops"]
        loss = sum(self.net.backbone.forward_features(c)[:, 0].float().pow(2).mean() for c in crops)
        return loss, {}


def _train(rank: int, result_path: str) -> None:
    from deepspeed.utils import safe_get_full_fp32_param

    from foundation.config import load_config
    from foundation.train.build import build_engines
    from foundation.train.engine import apply_schedule, deepspeed_config, init_distributed

    info = init_distributed()
    values = {"teacher_temp": 0.05, "ibot_weight": 1.0, "mae_weight": 1.0}
    out = {}
    for leaf in (True, False):
        cfg = load_config(overrides=tiny_overrides("unused", 3, **{"train.zero3_leaf_modules": leaf}))
        objective = TinyObjective(seed=0)
        engines = build_engines(objective, tiny_param_groups(objective), cfg,
                                deepspeed_config(cfg, info.world_size), info)
        engine = engines.engine
        apply_schedule(engine.optimizer.param_groups, {"lr": 1e-3, "last_layer_lr": 1e-3, "weight_decay": 0.04})
        for step in range(STEPS):
            loss, _ = engine(synthetic_batch(4, seed=100 * step + rank), engines.teacher.module, values)
            engine.backward(loss)
            engine.step()
        out[leaf] = {
            "leaves": sorted(n for n, m in objective.named_modules() if getattr(m, "_z3_leaf", False)),
            "teacher_leaves": sorted(n for n, m in engines.teacher.module.named_modules()
                                     if getattr(m, "_z3_leaf", False)),
            "params": {n: safe_get_full_fp32_param(p).clone() for n, p in objective.named_parameters()},
        }
    cfg = load_config(overrides=tiny_overrides("unused", 3))
    twice = TwiceObjective(seed=0)
    engines = build_engines(twice, tiny_param_groups(twice), cfg, deepspeed_config(cfg, info.world_size), info)
    try:
        engines.engine(synthetic_batch(4, seed=rank), engines.teacher.module, values)
        out["twice"] = "no error"
    except RuntimeError as err:
        out["twice"] = str(err)
    if rank == 0:
        torch.save(out, result_path)


def test_leaf_blocks_train_bitwise_as_per_layer_hooks_and_refuse_a_second_call(tmp_path):
    path = tmp_path / "leaf.pt"
    spawn(_train, str(path))
    out = torch.load(path)
    assert out[True]["leaves"] == ["net.backbone.blocks.0", "net.backbone.blocks.1"]
    assert out[True]["teacher_leaves"] == ["backbone.blocks.0", "backbone.blocks.1"]
    assert out[False]["leaves"] == out[False]["teacher_leaves"] == []
    leaf, hooked = out[True]["params"], out[False]["params"]
    assert leaf.keys() == hooked.keys()
    init = TinyObjective(seed=0).state_dict()
    assert all(not torch.equal(leaf[n], init[n].float()) for n in leaf if "blocks" in n)  # the blocks trained
    for name in leaf:
        assert torch.equal(leaf[name], hooked[name]), name
    assert "ran 2 times with gradients" in out["twice"] and "train.zero3_leaf_modules=false" in out["twice"]
