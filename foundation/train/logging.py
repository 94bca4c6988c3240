"""Run logs on rank 0: TensorBoard scalars and images, JSON lines, and a tqdm progress bar with ETA.

Every scalar goes to both sinks under the same tag (``loss/dino``, ``schedule/lr``, ``perf/images_per_s``...),
so ``metrics.jsonl`` is a plain-text copy of what TensorBoard shows. A run resumed at step S drops what an
interrupted run logged after S from both (TensorBoard's ``purge_step``; :func:`truncate_metrics`), so every
iteration has one row. Other ranks get a logger that does nothing, so the loop calls it unconditionally.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from foundation.fileio import atomic_write_text

TENSORBOARD_DIR = "tensorboard"
METRICS_FILE = "metrics.jsonl"


def _iteration(line: str) -> int | None:
    """The ``iteration`` of one JSON line, None for a line that is not a whole row (a write cut off by a crash)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    value = row.get("iteration") if isinstance(row, dict) else None
    return value if isinstance(value, int) else None


def truncate_metrics(path: Path, last_iteration: int) -> int:
    """Keep the rows of ``path`` up to ``last_iteration`` (rewritten atomically: a temporary file, renamed over);
    return how many rows were dropped. A missing file is left missing."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if (it := _iteration(line)) is not None and it <= last_iteration]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)


class RunLogger:
    """Scalars and images of one run (a no-op unless ``active``)."""

    def __init__(self, run_dir: Path, active: bool, total_iters: int, start_iter: int, progress_bar: bool) -> None:
        self.active = active
        self._writer = None
        self._jsonl = None
        self._bar = None
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=start_iter or None)
        if start_iter:  # resumed: what an interrupted run logged after this step is replaced by this run's rows
            truncate_metrics(run_dir / METRICS_FILE, start_iter)
        self._jsonl = (run_dir / METRICS_FILE).open("a", buffering=1)
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_iters, initial=start_iter, desc="train", unit="step", dynamic_ncols=True)

    def scalars(self, iteration: int, values: Mapping[str, float]) -> None:
        """One row: every value under its tag at ``iteration`` (non-finite values are kept: they are news)."""
        if not self.active:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, iteration)
        row = {"iteration": iteration, "time": time.time()}
        row.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        if self._bar is not None and "loss/total" in values:
            self._bar.set_postfix(loss=f"{values['loss/total']:.4g}", refresh=False)

    def images(self, iteration: int, images: Mapping[str, torch.Tensor]) -> None:
        """``[3, H, W]`` float images in [0, 1] under their tags."""
        if not self.active:
            return
        for tag, image in images.items():
            self._writer.add_image(tag, image.clamp(0, 1), iteration, dataformats="CHW")
        self._writer.flush()

    def text(self, tag: str, text: str, iteration: int = 0) -> None:
        if self.active:
            self._writer.add_text(tag, text, iteration)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def message(self, text: str) -> None:
        """A line that does not break the progress bar."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def flush(self) -> None:
        if self.active:
            self._writer.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        self._writer.close()
        self._jsonl.close()
        self.active = False
