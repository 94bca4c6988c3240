"""Checkpoints of a run: DeepSpeed engine state, EMA teacher, loop state, data position and RNG, per rank.

Layout under ``<output_dir>/checkpoints``::

    latest                       tag of the newest complete checkpoint, written last (DeepSpeed's tools read it;
                                 auto-resume follows it, not the highest step number: see follow_latest)
    zero_to_fp32.py              DeepSpeed's recovery script (copied by DeepSpeed at every save)
    step_00000500/               one tag per saved step
        COMPLETE                 JSON marker, written last: every file with its size, the world size, ZeRO stage,
                                 the student's parameter shapes, the resolved config and the code version
        mp_rank_00_model_states.pt, *optim_states.pt   engine.save_checkpoint (module + buffers, optimizer,
                                 fp32 master weights, ZeRO shards)
        teacher/full.pt          replicated teacher (ZeRO-0/1/2), written by rank 0
        teacher/rank_00001.pt    or one file of fp32 shards per rank (ZeRO-3)
        trainer/rank_00001.pt    per rank: loop state (schedule position), data-loader state, RNG states

Atomicity: every rank writes into ``.tmp_step_00000500``; after a barrier rank 0 checks and lists the files,
writes ``COMPLETE``, renames the folder to its tag and replaces ``latest`` (each by an atomic rename). A crash
at any point leaves the previous checkpoint complete and named by ``latest``. Everything of ours is loaded
with ``weights_only=True``; DeepSpeed loads its own engine files itself (``weights_only=False`` inside
DeepSpeed's ``TorchCheckpointEngine``: they hold its config objects and optimizer state).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from foundation.fileio import atomic_write_text
from foundation.train.teacher import EMATeacher

log = logging.getLogger(__name__)

LATEST = "latest"
COMPLETE = "COMPLETE"
TMP_PREFIX = ".tmp_"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
FORMAT_VERSION = 1
#: config sections that must match between a checkpoint and the run resuming it
MATCHING_SECTIONS = ("model", "objective")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed here; the message names the file and the reason."""


def tag_for(iteration: int) -> str:
    return f"step_{iteration:08d}"


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def code_version() -> str:
    """``git describe`` of the source tree when it is a checkout, else the package version."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True)
        return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        from foundation import __version__

        return f"foundation {__version__}"


# ------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch generator states as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [*internal, version, gauss],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = list(state["python"])
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------ marker and checks
def read_marker(tag_dir: Path) -> dict[str, Any]:
    """The ``COMPLETE`` marker of ``tag_dir``; raises :class:`CheckpointError` when absent or unreadable."""
    marker = tag_dir / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"{marker} is missing: the checkpoint {tag_dir} is incomplete (interrupted save?)")
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{marker} is not a readable marker: {err}") from err
    if not isinstance(meta, dict) or "files" not in meta:
        raise CheckpointError(f"{marker} has no file list: not a marker of this trainer")
    return meta


def verify(tag_dir: Path) -> dict[str, Any]:
    """Check that every file the marker lists is present with its recorded size; return the marker."""
    tag_dir = Path(tag_dir)
    meta = read_marker(tag_dir)
    for name, size in meta["files"].items():
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {tag_dir / COMPLETE})")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"{path} is {actual} bytes, {size} were written: truncated or corrupt")
    return meta


def _list_files(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def write_marker(tag_dir: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``COMPLETE`` (atomically, last) into ``tag_dir``: ``meta`` plus every file there with its size."""
    full = {**meta, "files": _list_files(tag_dir)}
    atomic_write_text(tag_dir / COMPLETE, json.dumps(full, indent=1) + "\n")
    return full


def _diff_keys(saved: Any, current: Any, prefix: str) -> list[str]:
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _diff_keys(saved.get(key), current.get(key), f"{prefix}.{key}")
        return out
    return [] if saved == current else [f"{prefix}: {saved!r} in the checkpoint, {current!r} here"]


def check_compatible(tag_dir: Path, meta: Mapping[str, Any], config: Mapping[str, Any] | None,
                     param_shapes: Mapping[str, list[int]] | None) -> None:
    """Refuse a checkpoint of another architecture or objective config, before anything is loaded."""
    marker = tag_dir / COMPLETE
    saved_shapes = meta.get("param_shapes", {})
    if param_shapes is not None and saved_shapes != dict(param_shapes):
        missing = sorted(set(param_shapes) - set(saved_shapes))[:5]
        extra = sorted(set(saved_shapes) - set(param_shapes))[:5]
        shapes = [f"{k}: {saved_shapes[k]} saved, {param_shapes[k]} here" for k in sorted(param_shapes)
                  if k in saved_shapes and saved_shapes[k] != param_shapes[k]][:5]
        raise CheckpointError(f"{marker}: the checkpoint holds another model (missing here {missing}, not in the "
                              f"checkpoint {extra}, shapes differ {shapes})")
    if config is not None and meta.get("config") is not None:
        diffs = [d for s in MATCHING_SECTIONS for d in _diff_keys(meta["config"].get(s), config.get(s), s)]
        if diffs:
            raise CheckpointError(f"{marker}: written with another config: {'; '.join(diffs[:5])}")


def check_topology(tag_dir: Path, meta: Mapping[str, Any], world_size: int, zero_stage: int) -> None:
    """Refuse a (non-universal) checkpoint of another world size or ZeRO stage (``zero_stage`` < 0: any)."""
    if meta.get("universal"):
        return
    if meta["world_size"] != world_size:
        raise CheckpointError(f"{tag_dir / COMPLETE}: written by {meta['world_size']} ranks, this run has "
                              f"{world_size}; resume on {meta['world_size']} ranks or convert it with "
                              f"`foundation checkpoint universal {tag_dir}`")
    if zero_stage >= 0 and meta["zero_stage"] != zero_stage:
        raise CheckpointError(f"{tag_dir / COMPLETE}: written at ZeRO-{meta['zero_stage']}, this run is "
                              f"ZeRO-{zero_stage}; convert it with `foundation checkpoint universal {tag_dir}`")


def step_of(tag_dir: Path) -> int:
    match = TAG_PATTERN.match(tag_dir.name)
    return int(match.group(1)) if match else -1


def resolve_resume(directory: Path, spec: str) -> Path | None:
    """The tag folder to resume from: ``auto`` = the one ``latest`` under ``directory`` names (see
    :func:`follow_latest`; None when there is none), ``none``/``false`` = None, anything else a path (a tag
    folder, a universal checkpoint, or a run or checkpoints folder, whose ``latest`` is followed like auto)."""
    spec = str(spec)
    if spec.lower() in ("none", "false", "off", ""):
        return None
    if spec.lower() in ("auto", "true"):
        return follow_latest(Path(directory))
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"train.resume={spec}: no such checkpoint folder")
    if (path / COMPLETE).is_file() or TAG_PATTERN.match(path.name):
        verify(path)
        return path
    for candidate in (path / "checkpoints", path):
        if candidate.is_dir() and any(TAG_PATTERN.match(p.name) for p in candidate.iterdir()):
            found = follow_latest(candidate)
            if found is None:
                raise CheckpointError(f"train.resume={spec}: no complete checkpoint in {candidate}")
            return found
    raise CheckpointError(f"train.resume={spec}: neither a checkpoint (no {path / COMPLETE}) nor a folder of them")


def follow_latest(directory: Path) -> Path | None:
    """The complete checkpoint ``directory/latest`` names (the last one this run's folder committed, not
    necessarily the highest step: a fresh run leaves an earlier run's higher steps behind). When ``latest`` is
    missing or names no complete checkpoint, the newest complete one, with a warning; None when there is none."""
    latest = directory / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if not TAG_PATTERN.match(tag):
            reason = f"{latest} names {tag!r}, not a checkpoint tag (step_XXXXXXXX)"
        else:
            try:
                verify(directory / tag)
                return directory / tag
            except CheckpointError as err:
                reason = f"{latest} names {tag}, which cannot be resumed ({err})"
    else:
        reason = f"{latest} is missing"
    found = newest_complete(directory)
    if found is not None:
        log.warning("%s; resuming from the newest complete checkpoint %s instead", reason, found)
    return found


def tag_folders(directory: Path) -> list[Path]:
    """The ``step_XXXXXXXX`` folders in ``directory`` (complete or not), lowest step first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)), key=step_of)


def newest_complete(directory: Path) -> Path | None:
    """The complete tag folder of the highest step in ``directory`` (others skipped with a warning), or None."""
    for tag in reversed(tag_folders(directory)):
        try:
            verify(tag)
            return tag
        except CheckpointError as err:
            log.warning("skipping checkpoint %s: %s", tag, err)
    return None


# ---------------------------------------------------------------------------------------- the saver
@dataclass
class RunIdentity:
    """What a checkpoint records about the run that wrote it (and checks on resume)."""

    config: dict[str, Any] | None
    param_shapes: dict[str, list[int]]
    zero_stage: int
    teacher_shapes: dict[str, list[int]] | None = None  # what re-sharding the teacher needs


def load_engine_and_teacher(engine: Any, tag_dir: Path, what: str, load_teacher: Callable[[], None] | None,
                            teacher_path: Path) -> None:
    """DeepSpeed's engine state from ``tag_dir``, then the teacher (``load_teacher()``, if given); a failure of
    either raises :class:`CheckpointError` naming ``what`` or ``teacher_path``."""
    load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the {what} from {tag_dir}")
    if load_teacher is not None:
        try:
            load_teacher()
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{teacher_path}: {err}") from err


class Checkpointer:
    """Save and resume one run's checkpoints (every method is called on every rank)."""

    def __init__(self, directory: Path, engine: Any, teacher: EMATeacher | None, rank: int, world_size: int,
                 keep: int, keep_every: int = 0, identity: RunIdentity | None = None) -> None:
        self.directory = Path(directory)
        self.engine = engine
        self.teacher = teacher
        self.rank = rank
        self.world_size = world_size
        self.keep = keep
        self.keep_every = keep_every
        self.identity = identity or RunIdentity(None, {}, -1)
        self.version = code_version() if rank == 0 else ""

    # ----------------------------------------------------------------------------------- saving
    def save(self, iteration: int, trainer_state: Mapping[str, Any], data_state: Mapping[str, Any] | None) -> Path:
        tag = tag_for(iteration)
        tmp_tag = TMP_PREFIX + tag
        tmp_dir, tag_dir = self.directory / tmp_tag, self.directory / tag
        if self.rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)  # left by a crash mid-save
            tmp_dir.mkdir(parents=True)
        _barrier()
        self.engine.save_checkpoint(str(self.directory), tag=tmp_tag, client_state={"iteration": iteration},
                                    save_latest=False)
        if self.teacher is not None:
            if self.teacher.sharded:
                atomic_save(self.teacher.local_state(), tmp_dir / "teacher" / f"rank_{self.rank:05d}.pt")
            elif self.rank == 0:
                atomic_save(self.teacher.local_state(), tmp_dir / "teacher" / "full.pt")
        own = {"trainer": dict(trainer_state), "data": dict(data_state) if data_state is not None else None,
               "rng": rng_state(), "world_size": self.world_size, "iteration": iteration}
        atomic_save(own, tmp_dir / "trainer" / f"rank_{self.rank:05d}.pt")
        _barrier()
        if self.rank == 0:
            self._finish(iteration, tmp_dir, tag_dir)
        _barrier()
        return tag_dir

    def _finish(self, iteration: int, tmp_dir: Path, tag_dir: Path) -> None:
        """Rank 0, after every rank wrote: marker, rename, ``latest``, pruning."""
        files = _list_files(tmp_dir)
        expected = [f"trainer/rank_{r:05d}.pt" for r in range(self.world_size)]
        if self.teacher is not None:
            expected += ([f"teacher/rank_{r:05d}.pt" for r in range(self.world_size)] if self.teacher.sharded
                         else ["teacher/full.pt"])
        missing = [f for f in expected if f not in files]
        if missing:
            raise CheckpointError(f"{tmp_dir}: files {missing} were not written; the checkpoint is not committed")
        write_marker(tmp_dir, {"format": FORMAT_VERSION, "iteration": iteration, "world_size": self.world_size,
                               "zero_stage": self.identity.zero_stage, "universal": False,
                               "code_version": self.version, "param_shapes": self.identity.param_shapes,
                               "teacher_shapes": self.identity.teacher_shapes, "config": self.identity.config})
        if tag_dir.exists():  # the same step saved again (a run resumed before it): the new one replaces it
            shutil.rmtree(tag_dir)
        os.replace(tmp_dir, tag_dir)
        atomic_write_text(self.directory / LATEST, tag_dir.name)
        self._prune(keep_tag=tag_dir.name)

    def _prune(self, keep_tag: str) -> None:
        """Keep the newest ``keep`` complete tags and every ``keep_every``-th step; drop stale temporary folders."""
        tags = sorted((p.name for p in self.directory.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)),
                      key=lambda t: int(TAG_PATTERN.match(t).group(1)))
        for old in tags[:-self.keep]:
            step = int(TAG_PATTERN.match(old).group(1))
            if old != keep_tag and not (self.keep_every > 0 and step % self.keep_every == 0):
                shutil.rmtree(self.directory / old, ignore_errors=True)
        for stale in self.directory.glob(TMP_PREFIX + "step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    # ---------------------------------------------------------------------------------- loading
    def latest_tag(self) -> str | None:
        path = self.directory / LATEST
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        if not (self.directory / tag).is_dir():
            raise CheckpointError(f"{path} names {tag!r}, which is not a folder in {self.directory}")
        return tag

    def check(self, tag_dir: Path) -> dict[str, Any]:
        """Everything checkable before loading (on every rank): completeness, sizes, model, config, world size."""
        meta = verify(tag_dir)
        check_compatible(tag_dir, meta, self.identity.config, self.identity.param_shapes)
        check_topology(tag_dir, meta, self.world_size, self.identity.zero_stage)
        return meta

    def load(self, tag_dir: Path | str) -> dict[str, Any]:
        """Restore engine, teacher and RNG from ``tag_dir``; return ``{"trainer", "data", "iteration"}``."""
        tag_dir = Path(tag_dir)
        if not tag_dir.is_absolute() and not tag_dir.exists():
            tag_dir = self.directory / tag_dir
        meta = self.check(tag_dir)
        if meta.get("universal"):
            from foundation.train.universal import load_universal

            return load_universal(self, tag_dir)
        own_path = tag_dir / "trainer" / f"rank_{self.rank:05d}.pt"
        own = _torch_load(own_path)
        teacher_state = None
        if self.teacher is not None:
            name = f"rank_{self.rank:05d}.pt" if self.teacher.sharded else "full.pt"
            teacher_state = _torch_load(tag_dir / "teacher" / name)
        load_teacher = (lambda: self.teacher.load_local_state(teacher_state)) if teacher_state is not None else None
        load_engine_and_teacher(self.engine, tag_dir, "engine state", load_teacher, tag_dir / "teacher")
        set_rng_state(own["rng"])
        _barrier()
        return {"trainer": own["trainer"], "data": own["data"], "iteration": own["iteration"]}


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with an error naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is missing") from err
    except Exception as err:  # torch raises many kinds of errors for a damaged file
        raise CheckpointError(f"cannot read {path}: {type(err).__name__}: {err}") from err
