"""Student engine + EMA teacher from an objective: the one construction the trainer and the benchmarks share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from foundation.objectives.base import Objective
from foundation.train.engine import (
    DistInfo,
    autocast_dtype,
    autocast_inside_engine,
    build_optimizer,
    compile_blocks,
    compile_blocks_enabled,
    container_parameters,
    enable_activation_checkpointing,
    initialize_engine,
    register_container_parameters,
    zero_stage,
)
from foundation.train.grad_norm import use_foreach_clipping
from foundation.train.teacher import EMATeacher, init_teacher_weights, wrap_teacher
from foundation.train.zero3_fetch import use_in_place_fetch
from foundation.train.zero3_leaf import mark_leaf_blocks


@dataclass
class Engines:
    """The DeepSpeed student engine, the EMA teacher (``None`` without one), and at ZeRO-3 the container-held
    parameters (ViT tokens, position embedding) that code outside the engine's forward must gather itself."""

    engine: Any
    teacher: EMATeacher | None
    teacher_shapes: dict[str, list[int]] | None = None  # full (unpartitioned) shapes, for checkpoint identity
    zero3_gathered: list[torch.nn.Parameter] = field(default_factory=list)


def build_engines(objective: Objective, param_groups: Sequence[Mapping[str, Any]], cfg: Any,
                  ds_config: Mapping[str, Any], dist: DistInfo) -> Engines:
    """Teacher copied from the student, optimizer over ``param_groups``, engine, and the ZeRO-3 registration.

    At ZeRO-3 each transformer block is one leaf unit for DeepSpeed (``train.zero3_leaf_modules``,
    :mod:`foundation.train.zero3_leaf`). The tokens and position embedding live on the backbone itself, not on
    a submodule whose call DeepSpeed hooks; objectives call backbone methods directly, so those parameters are
    registered as external parameters of the engine's module (gathered when its forward starts), for the teacher
    as well.
    """
    teacher_module = objective.build_teacher()
    teacher_shapes = ({n: list(p.shape) for n, p in teacher_module.named_parameters()}
                      if teacher_module is not None else None)
    pairs = objective.teacher_pairs(teacher_module) if teacher_module is not None else []
    init_teacher_weights(pairs)
    if bool(cfg.train.activation_checkpointing):
        enable_activation_checkpointing(objective.backbone().blocks)
    stage = zero_stage(ds_config)
    zero3 = stage == 3
    if zero3:
        use_in_place_fetch(bool(cfg.train.zero3_in_place_fetch))
    if zero3 and bool(cfg.train.zero3_leaf_modules):
        mark_leaf_blocks(objective, step_root=objective)
        if teacher_module is not None:
            mark_leaf_blocks(teacher_module)
    optimizer = build_optimizer(param_groups, cfg, dist.device)
    engine = initialize_engine(objective, optimizer, dict(ds_config))
    use_foreach_clipping(engine.optimizer)  # ZeRO-1/2: clipping norm and scale without host work
    autocast_inside_engine(engine.module, dist.device, autocast_dtype(str(cfg.train.precision)))
    teacher = wrap_teacher(teacher_module, pairs, ds_config, dist.device) if teacher_module is not None else None
    if compile_blocks_enabled(cfg.train.compile_blocks, dist.device, stage):
        compile_blocks(engine.module)
        if teacher is not None:
            compile_blocks(teacher.module)
    gathered: list[torch.nn.Parameter] = []
    if zero3:
        modules = [objective, *([teacher.module] if teacher is not None else [])]
        register_container_parameters(objective, *modules)
        gathered = [p for m in modules for p in container_parameters(m)]
    return Engines(engine, teacher, teacher_shapes, gathered)
