"""Non-finite losses and resume at ZeRO-3 on 2 gloo ranks (one spawn, three runs; ~70 s on the CI machine).

A NaN on one rank only must make both ranks skip the micro-batch (else their collectives diverge); K in
a row must stop the run without touching the last checkpoint; resuming from it must reproduce the
uninterrupted run bitwise (engine, sharded teacher, loop state, data position, RNG).
"""

from __future__ import annotations

import pytest
import torch
from train_support import resilience_run, spawn

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    base = tmp_path_factory.mktemp("resilience")
    spawn(resilience_run, str(base), 3, str(base / "result.pt"))
    return torch.load(base / "result.pt", weights_only=False)


def test_nonfinite_in_a_row_stops_with_a_clear_message(outcome):
    message = outcome["error"]
    assert "2 non-finite losses in a row at step 4" in message
    assert "train.max_nonfinite_in_row=2" in message
    assert "step_00000003 is intact" in message


def test_last_good_checkpoint_is_left_intact(outcome):
    assert outcome["latest_after_error"] == "step_00000003"
    assert outcome["step3_files"] == sorted([
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "teacher/rank_00000.pt", "teacher/rank_00001.pt", "trainer/rank_00000.pt", "trainer/rank_00001.pt", "COMPLETE",
    ])


def test_single_nonfinite_is_skipped_and_counted(outcome):
    # position 1 was NaN on rank 1 only: skipped on both ranks, counted once, the run went on
    assert outcome["uninterrupted_state"] == {"iteration": 6, "nonfinite_total": 1, "nonfinite_in_row": 0}
    assert outcome["uninterrupted_position"] == 7  # 6 steps + 1 skipped batch
    assert all(torch.isfinite(v).all() for v in outcome["uninterrupted"].values())


def test_resume_reproduces_the_uninterrupted_run_bitwise(outcome):
    assert outcome["resumed_state"] == outcome["uninterrupted_state"]
    assert outcome["resumed_position"] == outcome["uninterrupted_position"]
    for name, value in outcome["uninterrupted"].items():
        assert torch.equal(outcome["resumed"][name], value), name
    for name, value in outcome["uninterrupted_teacher"].items():
        assert torch.equal(outcome["resumed_teacher"][name], value), name
