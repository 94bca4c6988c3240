"""``foundation quickstart``, the README's main job: demo data, index, a short run and the export, in one command."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import torch

from foundation.cli import main
from foundation.export import load_exported

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_ends_with_an_encoder_timm_loads(tmp_path):
    # as a user runs it: its own process (training joins a process group, and the program exits without
    # interpreter finalization after that, see foundation.cli.entry)
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "foundation", "quickstart", "--out", str(out), "train.iterations=4",
                           "train.checkpoint_every=4", "train.log_every=2"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [2, 4]
    assert (out / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    model, info = load_exported(out / "encoder")
    features = model(torch.zeros(2, 3, 64, 64))
    assert features.shape == (2, model.num_features) and torch.isfinite(features).all()
    assert info["folded_label"] == "unknown"


def test_a_bad_override_stops_quickstart_before_any_work(tmp_path, caplog):
    out = tmp_path / "qs"
    with caplog.at_level(logging.ERROR):
        assert main(["quickstart", "--out", str(out), "--skip-train", "train.iterationz=5"]) == 2
    assert "unknown config key 'train.iterationz'" in caplog.text
    assert not out.exists()
