"""ZeRO-3 on one rank with the fetch of foundation/train/zero3_fetch.py (``train.zero3_in_place_fetch``): bitwise
the same training as with DeepSpeed's own single-partition fetch, for the real objectives with every weight
partitioned (no persistent ones), so weights are prefetched in coalesced groups and released between uses.

A handle without DeepSpeed's "complete" flag fails here (a released weight marked available again: "weight of
shape [0]"), as the first version did on the H200 (benchmarks/RESULTS.md)."""

from __future__ import annotations

import pytest
import torch
from train_support import spawn

pytestmark = pytest.mark.distributed

STEPS = 6
OBJECTIVES = ("mae", "ibot")


def _train(rank: int, result_path: str) -> None:
    from deepspeed.runtime.zero import partition_parameters
    from deepspeed.utils import safe_get_full_fp32_param

    from foundation.objectives import build_objective
    from foundation.perf.ours import OurStep
    from foundation.perf.step import compose
    from foundation.perf.synth import synthetic_batch
    from foundation.train.engine import init_distributed
    from foundation.train.trainer import build_schedules, seed_everything

    info = init_distributed()
    deepspeeds = partition_parameters._no_gather_coalesced
    handles: list[str] = []
    out = {}
    for objective_name in OBJECTIVES:
        for in_place in (True, False):
            cfg = compose("benchmarks/step_cpu.yaml", [
                f"train.zero3_in_place_fetch={in_place}",
                "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"],
                model=None, objective=objective_name, batch=None, zero=3, precision=None)
            seed_everything(int(cfg.meta.seed))
            objective = build_objective(cfg)
            patch = int(objective.backbone().patch_embed.patch_size[0])
            batch = synthetic_batch(cfg, objective.required_batch_keys, patch, info.device, int(cfg.meta.seed))
            schedules = build_schedules(cfg, info.world_size)
            ours = OurStep(objective, cfg, batch, schedules, 300, info)
            fetch = partition_parameters._no_gather_coalesced  # as build_engines left it: record the handles
            partition_parameters._no_gather_coalesced = (
                lambda params, f=fetch: handles.append(type(h := f(params)).__name__) or h)
            handles.clear()
            ours.loss()  # a forward without gradients first, as the step bench does
            for _ in range(STEPS):
                ours.step()
            out[objective_name, in_place] = {
                "handles": set(handles),
                "params": {n: safe_get_full_fp32_param(p).clone() for n, p in objective.named_parameters()}}
            partition_parameters._no_gather_coalesced = deepspeeds
            ours.release()
    torch.save(out, result_path)


def test_in_place_fetch_trains_bitwise_as_deepspeeds(tmp_path):
    path = tmp_path / "fetch.pt"
    spawn(_train, str(path), world_size=1)
    out = torch.load(path, weights_only=False)
    for objective_name in OBJECTIVES:
        ours, theirs = out[objective_name, True], out[objective_name, False]
        assert ours["handles"] == {"AliasedPartitionHandle"}, objective_name
        assert "AliasedPartitionHandle" not in theirs["handles"]
        assert ours["params"].keys() == theirs["params"].keys()
        for name, value in ours["params"].items():
            assert torch.equal(value, theirs["params"][name]), (objective_name, name)
