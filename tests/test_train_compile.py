"""``train.compile_blocks``: the trainer's compiled blocks train like the eager ones under DeepSpeed ZeRO-1."""

from __future__ import annotations

import pytest
import torch
from train_support import spawn, tiny_overrides, tiny_run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ITERATIONS = 3


def _train(tmp_path, name: str, *extra: str) -> dict:
    base = tmp_path / name
    overrides = tiny_overrides(str(base / "run"), 1, ITERATIONS, **{"train.precision": "fp32"}) + list(extra)
    spawn(tiny_run, overrides, str(base / "result.pt"), {}, False, world_size=1)
    return torch.load(base / "result.pt", weights_only=False)


def test_compiled_blocks_train_the_same_weights(tmp_path):
    eager = _train(tmp_path, "eager")
    compiled = _train(tmp_path, "compiled", "train.compile_blocks=true")
    assert "error" not in compiled and eager["student_names"] == compiled["student_names"]
    for name in eager["student_names"]:
        # inductor reorders float sums: equal to fp32 rounding
        torch.testing.assert_close(compiled["student"][name], eager["student"][name], rtol=1e-4, atol=1e-5,
                                   msg=name)
    assert (eager["compiled_blocks"], compiled["compiled_blocks"]) == (0, 2)
    assert compiled["state"]["iteration"] == ITERATIONS
