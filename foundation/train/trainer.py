"""One training run: validate, build the engine and the teacher, resume, loop, log.

:func:`validate` runs before any work (the CLI calls it first); :func:`run_training` takes an already built
objective, its parameter groups and a data iterator, so tests drive it with a tiny objective and
synthetic batches and the CLI with the real ones.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foundation.config import ConfigError, to_dict
from foundation.eval.monitor import KnnMonitor
from foundation.objectives.base import Objective
from foundation.train.build import build_engines
from foundation.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    RunIdentity,
    check_compatible,
    check_topology,
    read_marker,
    resolve_resume,
    tag_folders,
)
from foundation.train.engine import (
    DistInfo,
    autocast_dtype,
    deepspeed_config,
    global_batch_size,
    keeps_grad_norm,
    micro_batch_size,
    validate_engine_config,
)
from foundation.train.logging import RunLogger
from foundation.train.loop import LoopParts, LoopState, train_loop
from foundation.train.metrics import WindowMeter
from foundation.train.monitoring import TrainMonitor
from foundation.train.schedules import Schedules
from foundation.train.signals import StopRequest
from foundation.train.teacher import EMATeacher
from foundation.train.visuals import CapturingIterator, PictureMaker
from stain.vocabulary import StainVocabulary

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"


def run_dir(cfg: Any) -> Path:
    return Path(str(cfg.meta.output_dir))


WEIGHT_SUFFIX = "_weight"  # loss-term weight schedules: <term>_weight


def objective_weight_defaults(cfg: Any) -> dict[str, float]:
    """``objective.weights.<term>`` as ``<term>_weight``: the constants behind ``null`` weight schedules."""
    weights = cfg.objective.get("weights") if "objective" in cfg else None
    if not weights:
        return {}
    return {f"{term}{WEIGHT_SUFFIX}": float(value) for term, value in to_dict(weights).items()}


def build_schedules(cfg: Any, world_size: int) -> Schedules:
    try:
        return Schedules(to_dict(cfg.train), int(cfg.train.iterations), global_batch_size(cfg, world_size),
                         null_defaults=objective_weight_defaults(cfg))
    except ValueError as err:
        raise ConfigError(str(err)) from err


def validate(cfg: Any) -> None:
    """Every trainer setting that can be checked without building anything."""
    validate_engine_config(cfg)
    build_schedules(cfg, world_size=1)
    if int(cfg.train.image_every) > 0 and int(cfg.train.image_count) < 1:
        raise ConfigError(f"train.image_count must be >= 1 when train.image_every > 0, got {cfg.train.image_count}")
    if cfg.eval.monitor.tiles is not None and int(cfg.eval.monitor.every) < 1:
        raise ConfigError(f"eval.monitor.every must be >= 1 when eval.monitor.tiles is set, "
                          f"got {cfg.eval.monitor.every}")


def check_objective_schedules(objective: Objective, schedules: Schedules) -> None:
    """The objective's ``schedule_names`` must all be scheduled (and so logged)."""
    missing = [n for n in objective.schedule_names if n not in schedules.names]
    if missing:
        raise ConfigError(f"{type(objective).__name__} reads the schedules {missing}: set train.schedules.<name> "
                          f"(or objective.weights.<term> for a null *_weight)")


def check_unused_weights(objective: Objective, schedules: Schedules) -> None:
    """A loss term the objective does not compute must not be given a weight: it would be logged as if it were
    trained (``foundation train`` checks this before any work)."""
    idle = [n for n, spec in schedules.specs.items() if n.endswith(WEIGHT_SUFFIX)
            and n not in objective.schedule_names and (spec.start, spec.peak, spec.end) != (0.0, 0.0, 0.0)]
    if idle:
        terms = [n.removesuffix(WEIGHT_SUFFIX) for n in idle]
        raise ConfigError(f"{type(objective).__name__} computes no {terms} loss term, but it has a weight "
                          f"({', '.join(f'objective.weights.{t} / train.schedules.{t}{WEIGHT_SUFFIX}' for t in terms)}"
                          f"): set it to 0 or choose an objective with that term")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _write_run_info(directory: Path, ds_config: Mapping[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / DEEPSPEED_CONFIG_FILE).write_text(json.dumps(ds_config, indent=2) + "\n")


def launch_world_size() -> int:
    """The world size the launcher set, read as :func:`~foundation.train.engine.init_distributed` will read it
    (``WORLD_SIZE``; one process without launcher variables), before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def find_resume(cfg: Any, directory: Path, world_size: int | None = None) -> Path | None:
    """The checkpoint ``train.resume`` names (see :func:`~foundation.train.checkpoint.resolve_resume`), checked
    before anything is built or written: complete, same model and objective config, and (unless universal)
    written by ``world_size`` ranks (default: :func:`launch_world_size`) at this ZeRO stage. Every rank resolves
    it alike from the shared folder."""
    try:
        found = resolve_resume(directory, str(cfg.train.resume))
        if found is not None:
            meta = read_marker(found)
            check_compatible(found, meta, to_dict(cfg), None)
            check_topology(found, meta, launch_world_size() if world_size is None else world_size,
                           int(cfg.deepspeed.zero_optimization.stage))
        return found
    except CheckpointError as err:
        raise ConfigError(str(err)) from err


def resume_notes(cfg: Any, resume_dir: Path | None, directory: Path) -> list[str]:
    """Warnings about where a run starts: a checkpoint already at ``train.iterations`` (nothing left to train),
    or a fresh start beside an earlier run's checkpoints in ``directory`` (left alone, never deleted)."""
    total = int(cfg.train.iterations)
    if resume_dir is not None:
        step = int(read_marker(resume_dir)["iteration"])
        if step < total:
            return []
        return [f"{resume_dir} is at step {step} and train.iterations={total}: nothing left to train (raise "
                f"train.iterations to train on, or set train.resume=false to start afresh)"]
    tags = tag_folders(directory)
    if not tags:
        return []
    return [f"{directory} holds {len(tags)} checkpoints of an earlier run ({tags[0].name} .. {tags[-1].name}); "
            f"this run starts afresh (train.resume={cfg.train.resume}): `latest` will name its own checkpoints, which "
            f"replace those of the same step; the others stay and count towards train.keep_checkpoints (pruning "
            f"keeps the highest steps): move them away or use another meta.output_dir"]


@dataclass
class TrainResult:
    """The finished run: loop state, the engine (student) and the EMA teacher, for export and checks."""

    state: LoopState
    engine: Any
    teacher: EMATeacher | None
    checkpoints: Path


def run_training(cfg: Any, objective: Objective, param_groups: Sequence[Mapping[str, Any]],
                 data: Iterator[Mapping[str, torch.Tensor]], dist: DistInfo) -> TrainResult:
    """Train ``objective`` on ``data`` as ``cfg`` says.

    ``data`` is this rank's batch iterator; when it has ``state_dict``/``load_state_dict`` (the DALI
    loader does) its position is saved in every checkpoint and restored on resume. The model must
    have been built with the same seed on every rank.
    """
    out_dir = run_dir(cfg)
    ds_config = deepspeed_config(cfg, dist.world_size)
    schedules = build_schedules(cfg, dist.world_size)
    check_objective_schedules(objective, schedules)
    resume_dir = find_resume(cfg, out_dir / CHECKPOINT_DIR, dist.world_size)  # a bad one: nothing written
    if dist.rank == 0:
        _write_run_info(out_dir, ds_config)
        lr = schedules.specs["lr"]
        log.info("global batch %d (%d per rank x %d accumulation x %d ranks): peak LR %.4g, ZeRO-%d, %s",
                 global_batch_size(cfg, dist.world_size), micro_batch_size(cfg), int(cfg.train.grad_accum_steps),
                 dist.world_size, lr.peak, ds_config["zero_optimization"]["stage"], cfg.train.precision)
        for note in resume_notes(cfg, resume_dir, out_dir / CHECKPOINT_DIR):
            log.warning("%s", note)

    knn = KnnMonitor.from_config(cfg)  # decodes the monitor's tiles (a bad folder fails before any build)
    if resume_dir is not None and read_marker(resume_dir).get("universal"):
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    engines = build_engines(objective, param_groups, cfg, ds_config, dist)
    engine, teacher, zero3_gathered = engines.engine, engines.teacher, engines.zero3_gathered
    identity = RunIdentity(to_dict(cfg), {n: list(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
                                          for n, p in objective.named_parameters()},
                           int(ds_config["zero_optimization"]["stage"]), engines.teacher_shapes)
    # Model init used the shared seed; from here each rank draws its own randomness (drop path, token dropout).
    seed_everything(int(cfg.meta.seed) + dist.rank)

    checkpointer = Checkpointer(out_dir / CHECKPOINT_DIR, engine, teacher, dist.rank, dist.world_size,
                                keep=int(cfg.train.keep_checkpoints), keep_every=int(cfg.train.keep_checkpoints_every),
                                identity=identity)
    state = LoopState()
    if resume_dir is not None:
        restored = checkpointer.load(resume_dir)
        state = LoopState.from_state_dict(restored["trainer"])
        if restored["data"] is not None and hasattr(data, "load_state_dict"):
            data.load_state_dict(restored["data"])
        log.info("resumed from %s at step %d", resume_dir, state.iteration)

    total = int(cfg.train.iterations)
    logger = RunLogger(out_dir, dist.rank == 0, total, state.iteration, bool(cfg.train.progress_bar))
    compute_dtype = autocast_dtype(str(cfg.train.precision))
    capture = CapturingIterator(iter(data), int(cfg.train.image_count))
    pictures = None
    if int(cfg.train.image_every) > 0:
        pictures = PictureMaker(engine, teacher.module if teacher is not None else None, capture, logger,
                                StainVocabulary.from_config(cfg.get("stain")), list(cfg.data.crops.mean),
                                list(cfg.data.crops.std), out_dir, dist.rank, dist.device, compute_dtype,
                                gather=zero3_gathered)
    monitor = None
    if knn is not None:
        monitor = TrainMonitor(knn, int(cfg.eval.monitor.every), engine,
                               teacher.module if teacher is not None else None, compute_dtype, dist.device,
                               gather=zero3_gathered)
        if dist.rank == 0:
            log.info("kNN monitor: %d tiles of %s every %d steps", len(knn), cfg.eval.monitor.tiles, monitor.every)
    parts = LoopParts(
        engine=engine, teacher=teacher, data=capture, schedules=schedules, logger=logger,
        meter=WindowMeter(dist.device, dist.world_size, global_batch_size(cfg, dist.world_size)),
        checkpointer=checkpointer, device=dist.device, compute_dtype=compute_dtype,
        grad_accum_steps=int(cfg.train.grad_accum_steps), log_every=int(cfg.train.log_every),
        checkpoint_every=int(cfg.train.checkpoint_every), image_every=int(cfg.train.image_every),
        max_nonfinite_in_row=int(cfg.train.max_nonfinite_in_row),
        data_state=(lambda: data.state_dict()) if hasattr(data, "state_dict") else (lambda: None),
        pictures=pictures, monitor=monitor, grad_norm_before_step=not keeps_grad_norm(ds_config),
    )
    try:
        if bool(cfg.train.stop_on_signal):
            with StopRequest() as stop:
                parts.stop = stop.requested
                state = train_loop(parts, state, total)
        else:
            state = train_loop(parts, state, total)
    finally:
        logger.close()
    return TrainResult(state, engine, teacher, checkpointer.directory)
