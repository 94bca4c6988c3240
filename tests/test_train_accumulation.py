"""Gradient accumulation and fp16 on 2 gloo ranks (ZeRO-1, tiny objective; one spawn, ~30 s).

Accumulating 2 micro-batches of 2 must train like one batch of the same 4 samples (fp32: equal up to summation
order), with one schedule value, one optimizer step and one EMA update per step. fp16 runs through DeepSpeed's
loss scaler: with a small first scale it tracks fp32; with the default 2**16 every early step overflows, is
skipped by DeepSpeed, counted in the logs, and leaves the weights untouched.
"""

from __future__ import annotations

import pytest
import torch
from train_support import TinyObjective, accumulation_run, spawn

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("accumulation")
    spawn(accumulation_run, str(base), str(base / "result.pt"))
    return torch.load(base / "result.pt", weights_only=False)


def test_accumulated_micro_batches_train_like_one_batch(runs):
    whole, acc = runs["whole"], runs["accumulated"]
    assert whole["state"] == acc["state"] == {"iteration": 4, "nonfinite_total": 0, "nonfinite_in_row": 0}
    assert whole["position"] == acc["position"] == 4  # the same 16 samples per rank
    for name, value in whole["student"].items():
        torch.testing.assert_close(acc["student"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    for name, value in whole["teacher"].items():
        torch.testing.assert_close(acc["teacher"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    for a, b in zip(whole["rows"], acc["rows"], strict=True):
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-5)
        assert b["optim/grad_norm"] == pytest.approx(a["optim/grad_norm"], rel=1e-4)
        assert b["schedule/lr"] == a["schedule/lr"]


def test_fp16_tracks_fp32(runs):
    fp16 = runs["fp16"]["rows"]
    assert [r["health/overflow_skipped_steps"] for r in fp16] == [0, 0, 0, 0]
    for a, b in zip(runs["whole"]["rows"], fp16, strict=True):
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-2)


def test_fp16_overflow_steps_are_skipped_and_counted(runs):
    run = runs["fp16_overflow"]
    assert [r["health/overflow_skipped_steps"] for r in run["rows"]] == [1, 2, 3, 4]
    init = dict(TinyObjective(seed=0).named_parameters())
    for name, value in run["student"].items():
        # the fp32 master starts from the fp16 copy of the initial weights and was never stepped
        assert torch.equal(value, init[name].detach().half().float()), name
