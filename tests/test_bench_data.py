"""`foundation bench data` in smoke mode: indexes the real slides, runs both loaders, writes the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from foundation.cli import main
from foundation.data.bench import BENCH_SLIDES


def test_bench_data_smoke_writes_both_sides_and_the_ratio(data_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("FOUNDATION_TEST_DATA", str(data_dir))
    out = tmp_path / "bench.json"
    batches, batch_size = 2, 2
    code = main(["bench", "data", "--batches", str(batches), "--warmup", "1", "--rounds", "1", "--batch-size",
                 str(batch_size), "--out", str(out), "data.crops.local_count=2"])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"ours", "baseline", "ratio", "setup"}
    for side in ("ours", "baseline"):
        figures = result[side]
        assert figures["samples"] == batches * batch_size
        assert figures["samples_per_s"] > 0
        assert figures["crops_per_s"] == pytest.approx(figures["samples_per_s"] * 4, rel=0.01)  # 2 global + 2 local
        assert figures["global_crops_per_s"] == pytest.approx(figures["samples_per_s"] * 2, rel=0.01)
        # 96 px locals of 224 px globals: 2 + 2 * (96/224)^2 global crops' worth of pixels per sample
        assert figures["global_crop_equivalents_per_s"] == pytest.approx(
            figures["samples_per_s"] * (2 + 2 * (96 / 224) ** 2), rel=0.01)
        assert len(figures["rounds"]) == 1
    assert result["ratio"] == pytest.approx(result["ours"]["samples_per_s"] / result["baseline"]["samples_per_s"],
                                            rel=0.01)
    assert result["ours"]["failed_reads"] == 0
    assert result["ours"]["reader_workers"] == 0  # reader_workers: auto reads in-process on the CPU path
    assert result["setup"]["slides"] == [Path(p).name for p, *_ in BENCH_SLIDES["jpeg"]]
    printed = capsys.readouterr().out
    assert "ours" in printed and "baseline" in printed and "ratio" in printed
