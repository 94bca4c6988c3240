"""Backbone weights from a training run's checkpoint (layout: :mod:`foundation.train.checkpoint`).

The objective is rebuilt from the run's config and its own interface picks the encoder out of the saved
state (:meth:`~foundation.objectives.base.Objective.teacher_backbone` / ``backbone``), so no key prefix is
hard-coded here. Accepted paths: the run folder (``<run>/checkpoints/latest`` is followed), its
``checkpoints`` folder, or one ``step_XXXXXXXX`` tag folder.

* Teacher, ZeRO-0/1/2: ``teacher/full.pt`` is the teacher module's whole state dict.
* Teacher, ZeRO-3: ``teacher/rank_XXXXX.pt`` hold, per rank, ``shard.<param>`` (that rank's slice of the
  flattened parameter) and ``buffer.<name>``. DeepSpeed partitions each parameter on its own: padded to a
  multiple of the world size and cut into equal slices in rank order, so concatenating the ranks' slices and
  dropping the padding restores it.
* Student (``student=True``): the engine's ``mp_rank_00_model_states.pt`` ``module`` entry (ZeRO-0/1/2 only;
  at ZeRO-3 the student is partitioned inside the optimizer state: use the teacher or DeepSpeed's zero_to_fp32).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

LATEST = "latest"
TAG_PATTERN = re.compile(r"^step_\d{8}$")
RANK_FILE = re.compile(r"^rank_(\d{5})\.pt$")
TEACHER_FULL = "full.pt"
STUDENT_STATES = "mp_rank_00_model_states.pt"
RUN_CONFIG = "config.yaml"


class CheckpointFormatError(ValueError):
    """A path that is not a usable training checkpoint; the message names the file and what is missing."""


def is_checkpoint_path(path: Path) -> bool:
    """A run folder, a ``checkpoints`` folder or a tag folder (what :func:`tag_dir` accepts)."""
    return path.is_dir() and ((path / "checkpoints" / LATEST).is_file() or (path / LATEST).is_file()
                              or bool(TAG_PATTERN.match(path.name)))


def tag_dir(path: str | Path) -> Path:
    """The tag folder a run folder, ``checkpoints`` folder or tag folder stands for."""
    path = Path(path)
    if TAG_PATTERN.match(path.name) and path.is_dir():
        return path
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = directory / LATEST
    if not latest.is_file():
        raise CheckpointFormatError(f"{path}: no checkpoint found (no {latest}; pass a run folder, its checkpoints "
                                    "folder or a step_XXXXXXXX folder)")
    tag = directory / latest.read_text().strip()
    if not tag.is_dir():
        raise CheckpointFormatError(f"{latest} names {tag.name!r}, which is not a folder in {directory}")
    return tag


def run_config_path(tag: Path) -> Path | None:
    """``<run>/config.yaml`` of a tag folder ``<run>/checkpoints/<tag>``, when the run wrote one."""
    for candidate in (tag.parent.parent / RUN_CONFIG, tag.parent / RUN_CONFIG, tag / RUN_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def _load(path: Path, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointFormatError(f"cannot read {path}: {err}") from err


def unpartition(shards: list[torch.Tensor], shape: torch.Size, name: str) -> torch.Tensor:
    """A ZeRO-3 parameter from its per-rank slices (rank order): concatenate, drop the padding, reshape."""
    numel = shape.numel()
    world = len(shards)
    per_rank = -(-numel // world)  # ceil: the parameter is padded to world * per_rank elements
    sizes = {s.numel() for s in shards}
    if sizes != {per_rank}:
        raise CheckpointFormatError(f"teacher shard {name}: slices of {sorted(sizes)} elements on {world} ranks, "
                                    f"expected {per_rank} each for shape {list(shape)}")
    return torch.cat([s.reshape(-1) for s in shards])[:numel].reshape(shape)


def gather_teacher_state(teacher_dir: Path, teacher: nn.Module) -> dict[str, torch.Tensor]:
    """The teacher state dict from ``teacher/full.pt`` or from the per-rank ZeRO-3 files."""
    full = teacher_dir / TEACHER_FULL
    if full.is_file():
        return _load(full, weights_only=True)
    ranks = sorted((int(m.group(1)), p) for p in teacher_dir.glob("rank_*.pt") if (m := RANK_FILE.match(p.name)))
    if not ranks:
        raise CheckpointFormatError(f"{teacher_dir}: neither {TEACHER_FULL} nor rank_XXXXX.pt files")
    if [r for r, _ in ranks] != list(range(len(ranks))):
        raise CheckpointFormatError(f"{teacher_dir}: rank files {[p.name for _, p in ranks]} are not ranks "
                                    f"0..{len(ranks) - 1}")
    states = [_load(p, weights_only=True) for _, p in ranks]
    out: dict[str, torch.Tensor] = {}
    for name, param in teacher.named_parameters():
        key = f"shard.{name}"
        missing = [p.name for (_, p), s in zip(ranks, states, strict=True) if key not in s]
        if missing:
            raise CheckpointFormatError(f"{teacher_dir}: {key} missing from {missing}")
        out[name] = unpartition([s[key] for s in states], param.shape, name)
    for name, _ in teacher.named_buffers():
        key = f"buffer.{name}"
        if key not in states[0]:
            raise CheckpointFormatError(f"{ranks[0][1]}: {key} missing")
        out[name] = states[0][key]
    return out


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: Path) -> None:
    result = module.load_state_dict(dict(state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointFormatError(f"{source} does not fit the model of the run config: missing "
                                    f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


def load_backbone(tag: Path, objective: Any, student: bool = False) -> tuple[nn.Module, str]:
    """The backbone (fp32, eval mode) saved in ``tag`` and a description of its origin.

    ``objective`` is a freshly built objective of the run's config; its teacher (or, with ``student`` or an
    objective without one, its student) receives the saved weights.
    """
    teacher = None if student else objective.build_teacher()
    if teacher is not None:
        teacher_dir = tag / "teacher"
        if not teacher_dir.is_dir():
            raise CheckpointFormatError(f"{tag}: no teacher/ folder, but the objective has a teacher "
                                        "(pass --student for the student's weights)")
        _load_strict(teacher, gather_teacher_state(teacher_dir, teacher), teacher_dir)
        backbone, what = objective.teacher_backbone(teacher), "teacher"
    else:
        states = tag / STUDENT_STATES
        if not states.is_file():
            zero3 = sorted(p.name for p in tag.glob("zero_pp_rank_*_model_states.pt"))
            hint = " (a ZeRO-3 checkpoint: use the teacher or convert with DeepSpeed's zero_to_fp32)" if zero3 else ""
            raise CheckpointFormatError(f"{states} is missing{hint}")
        saved = _load(states, weights_only=False)
        if not isinstance(saved, Mapping) or "module" not in saved:
            raise CheckpointFormatError(f"{states} has no 'module' entry: not a DeepSpeed model-state file")
        _load_strict(objective, saved["module"], states)
        backbone, what = objective.backbone(), "student"
        if teacher is None and not student:
            log.info("the objective has no teacher: using the student backbone")
    return backbone.float().eval(), f"{what} of {tag}"
