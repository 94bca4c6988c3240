"""ZeRO-3 on one rank with the fetch of foundation/train/zero3_fetch.py: bitwise the same training as with
DeepSpeed's own single-partition fetch, with every weight partitioned, prefetched and released again."""

from __future__ import annotations

import pytest
import torch
from train_support import TinyObjective, spawn, synthetic_batch, tiny_overrides, tiny_param_groups

pytestmark = pytest.mark.distributed

STEPS = 4
# Every weight partitioned (no persistent ones), released as soon as its module is done, and fetched ahead in small
# coalesced buckets: the fetch handle's wait is called again for weights released since its first call.
RELEASE_EARLY = {"deepspeed.zero_optimization.stage3_param_persistence_threshold": 0,
                 "deepspeed.zero_optimization.stage3_max_live_parameters": 1000000000,
                 "deepspeed.zero_optimization.stage3_max_reuse_distance": 0,
                 "deepspeed.zero_optimization.stage3_prefetch_bucket_size": 5000}


def _train(rank: int, result_path: str) -> None:
    from deepspeed.runtime.zero import partition_parameters
    from deepspeed.utils import safe_get_full_fp32_param

    from foundation.config import load_config
    from foundation.train.build import build_engines
    from foundation.train.engine import apply_schedule, deepspeed_config, init_distributed

    info = init_distributed()
    values = {"teacher_temp": 0.05, "ibot_weight": 1.0, "mae_weight": 1.0}
    deepspeeds = partition_parameters._no_gather_coalesced
    handles = []
    out = {}
    for ours in (True, False):
        cfg = load_config(overrides=tiny_overrides("unused", 3, **{"train.zero3_in_place_fetch": ours},
                                                   **RELEASE_EARLY))
        objective = TinyObjective(seed=0)
        engines = build_engines(objective, tiny_param_groups(objective), cfg,
                                deepspeed_config(cfg, info.world_size), info)
        fetch = partition_parameters._no_gather_coalesced
        partition_parameters._no_gather_coalesced = lambda params, f=fetch: handles.append(f(params)) or handles[-1]
        handles.clear()
        engine = engines.engine
        apply_schedule(engine.optimizer.param_groups, {"lr": 1e-3, "last_layer_lr": 1e-3, "weight_decay": 0.04})
        for step in range(STEPS):
            loss, _ = engine(synthetic_batch(4, seed=100 * step), engines.teacher.module, values)
            engine.backward(loss)
            engine.step()
        out[ours] = {"handles": {type(h).__name__ for h in handles},
                     "params": {n: safe_get_full_fp32_param(p).clone() for n, p in objective.named_parameters()}}
        partition_parameters._no_gather_coalesced = deepspeeds
    torch.save(out, result_path)


def test_in_place_fetch_trains_bitwise_as_deepspeeds(tmp_path):
    path = tmp_path / "fetch.pt"
    spawn(_train, str(path), world_size=1)
    out = torch.load(path)
    assert out[True]["handles"] == {"AliasedPartitionHandle"}
    assert "AliasedPartitionHandle" not in out[False]["handles"]
    init = TinyObjective(seed=0).state_dict()
    ours, theirs = out[True]["params"], out[False]["params"]
    assert all(not torch.equal(ours[n], init[n].float()) for n in ours if "blocks" in n)  # the blocks trained
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
