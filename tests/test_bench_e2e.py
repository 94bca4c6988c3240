"""CPU smoke of `foundation bench e2e`: the full loop on the real slides (indexed on the fly) for a few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_e2e_reports_throughput_and_data_wait(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "FOUNDATION_TEST_DATA": str(data_dir)}
    cmd = [sys.executable, "-m", "foundation", "bench", "e2e", "--config", "benchmarks/e2e_cpu.yaml",
           "--steps", "2", "--out", str(out), "objective=ibot", "data.pipeline.batch_size=4"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data wait" in proc.stdout
    result = json.loads(out.read_text())
    assert result["kind"] == "e2e" and "torch" in result["environment"]
    row = result["results"][0]
    assert row["objective"] == "ibot" and row["batch_per_rank"] == 4 and row["iterations"] == 4
    assert len(row["windows"]) == 2  # the warm-up window and the reported one
    assert row["images_per_s"] > 0 and 0.0 <= row["data_wait_share"] <= 1.0
    assert row["loss"] == row["loss"]  # finite enough to compare with itself: not NaN
