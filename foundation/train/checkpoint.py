"""Checkpoints of a run: DeepSpeed engine state, EMA teacher, loop state, data position and RNG, per rank.

Layout under ``<output_dir>/checkpoints``::

    latest                       tag of the newest complete checkpoint, written last (DeepSpeed's tools read it)
    step_00000500/               one tag per saved step
        mp_rank_00_model_states.pt, *optim_states.pt   engine.save_checkpoint (module, optimizer, ZeRO shards)
        teacher/full.pt          replicated teacher (ZeRO-0/1/2), written by rank 0
        teacher/rank_00001.pt    or one file of shards per rank (ZeRO-3)
        trainer/rank_00001.pt    per rank: loop state, data-loader state, RNG states, world size

A checkpoint counts only once ``latest`` names it: every file is written to a temporary name and renamed,
all ranks meet at a barrier, then rank 0 replaces ``latest``. A crash mid-save leaves the previous
checkpoint the one a resume picks up.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from foundation.train.teacher import EMATeacher

LATEST = "latest"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed here; the message names the file and the reason."""


def tag_for(iteration: int) -> str:
    return f"step_{iteration:08d}"


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    """Save and resume one run's checkpoints (every method is called on every rank)."""

    def __init__(self, directory: Path, engine: Any, teacher: EMATeacher | None, rank: int, world_size: int,
                 keep: int) -> None:
        self.directory = Path(directory)
        self.engine = engine
        self.teacher = teacher
        self.rank = rank
        self.world_size = world_size
        self.keep = keep

    # ----------------------------------------------------------------------------------- saving
    def save(self, iteration: int, trainer_state: Mapping[str, Any], data_state: Mapping[str, Any] | None) -> Path:
        tag = tag_for(iteration)
        tag_dir = self.directory / tag
        self.engine.save_checkpoint(str(self.directory), tag=tag, client_state={"iteration": iteration},
                                    save_latest=False)
        if self.teacher is not None:
            if self.teacher.sharded:
                atomic_save(self.teacher.local_state(), tag_dir / "teacher" / f"rank_{self.rank:05d}.pt")
            elif self.rank == 0:
                atomic_save(self.teacher.local_state(), tag_dir / "teacher" / "full.pt")
        own = {"trainer": dict(trainer_state), "data": dict(data_state) if data_state is not None else None,
               "rng": rng_state(), "world_size": self.world_size, "iteration": iteration}
        atomic_save(own, tag_dir / "trainer" / f"rank_{self.rank:05d}.pt")
        _barrier()
        if self.rank == 0:
            _atomic_write_text(self.directory / LATEST, tag)
            self._prune(keep_tag=tag)
        _barrier()
        return tag_dir

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.directory.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
        for old in tags[:-self.keep]:
            if old != keep_tag:
                shutil.rmtree(self.directory / old, ignore_errors=True)

    # ---------------------------------------------------------------------------------- loading
    def latest_tag(self) -> str | None:
        path = self.directory / LATEST
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        if not (self.directory / tag).is_dir():
            raise CheckpointError(f"{path} names {tag!r}, which is not a folder in {self.directory}")
        return tag

    def load(self, tag: str) -> dict[str, Any]:
        """Restore engine, teacher and RNG from ``tag``; return ``{"trainer", "data", "iteration"}``."""
        tag_dir = self.directory / tag
        own_path = tag_dir / "trainer" / f"rank_{self.rank:05d}.pt"
        if not own_path.is_file():
            raise CheckpointError(f"{own_path} is missing: the checkpoint was written by another number of ranks "
                                  f"(this run has {self.world_size})")
        own = torch.load(own_path, map_location="cpu", weights_only=False)
        if own["world_size"] != self.world_size:
            raise CheckpointError(f"{own_path}: written by {own['world_size']} ranks, this run has "
                                  f"{self.world_size}; resume on {own['world_size']} ranks")
        load_path, _ = self.engine.load_checkpoint(str(self.directory), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the engine state from {tag_dir}")
        if self.teacher is not None:
            name = f"rank_{self.rank:05d}.pt" if self.teacher.sharded else "full.pt"
            teacher_path = tag_dir / "teacher" / name
            if not teacher_path.is_file():
                raise CheckpointError(f"{teacher_path} is missing (teacher state of {tag})")
            self.teacher.load_local_state(torch.load(teacher_path, map_location="cpu", weights_only=True))
        set_rng_state(own["rng"])
        _barrier()
        return {"trainer": own["trainer"], "data": own["data"], "iteration": own["iteration"]}
