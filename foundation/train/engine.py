"""The DeepSpeed engine from the config: distributed init, DeepSpeed config, AdamW with parameter groups.

``cfg.deepspeed`` (a group file under ``configs/deepspeed/``) holds what DeepSpeed itself tunes (ZeRO
stage and buckets, gradient communication dtype, fp16 loss scaling); ``cfg.train`` holds what the trainer
decides (batch, accumulation, precision, clipping). :func:`deepspeed_config` merges both into the dict
``deepspeed.initialize`` takes; the trainer owns every key it writes and rejects a group file that sets one.

The optimizer is a client ``torch.optim.AdamW`` (fused where the device has it): DeepSpeed's own
``cpu_adam``/``fused_adam`` are JIT-compiled on first use (~85 s each). Its parameter groups come from
the model (``foundation.models.param_groups``) and carry ``lr_multiplier``, ``wd_multiplier`` and
``is_last_layer``; :func:`apply_schedule` writes the scheduled LR and weight decay into every group
before each step, so no DeepSpeed LR scheduler is used.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from foundation.config import AUTO, ConfigError, to_dict

log = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp16", "fp32")
ZERO_STAGES = (0, 1, 2, 3)
AUTO_OR_BOOL = (AUTO, True, False)  # train.fused_adamw, train.compile_blocks, deepspeed...overlap_comm
# Keys of the DeepSpeed config that the trainer derives from cfg.train; a deepspeed group file must not set them.
TRAINER_OWNED_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "bf16", "optimizer", "scheduler",
)
GROUP_REQUIRED_KEYS = ("zero_optimization", "fp16")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed() -> DistInfo:
    """Join the process group the launcher described (deepspeed, torchrun, or none: a single process).

    Without launcher variables this is a one-process job on this machine. The backend is the
    accelerator's (nccl on GPUs, gloo on the CPU).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed 0.19's ZeRO-3 calls torch.distributed collectives under their deprecated names, and torch warns at
    # every call: one line per step. Nothing for the user to change.
    warnings.filterwarnings(
        "ignore", category=FutureWarning,
        message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ["WORLD_SIZE"])
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(local_rank))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def micro_batch_size(cfg: Any) -> int:
    """Samples per rank per micro-step: what the data loader yields (``data.pipeline.batch_size``)."""
    return int(cfg.data.pipeline.batch_size)


def global_batch_size(cfg: Any, world_size: int) -> int:
    """Samples per optimizer step over all ranks."""
    return micro_batch_size(cfg) * int(cfg.train.grad_accum_steps) * world_size


def validate_engine_config(cfg: Any) -> None:
    """Reject engine settings DeepSpeed would only refuse after the model is built."""
    train = cfg.train
    if train.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {train.precision!r}")
    if train.fused_adamw not in AUTO_OR_BOOL:
        raise ConfigError(f"train.fused_adamw must be one of {AUTO_OR_BOOL}, got {train.fused_adamw!r}")
    for key in ("grad_accum_steps", "iterations", "log_every", "max_nonfinite_in_row", "keep_checkpoints"):
        if int(train[key]) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {train[key]!r}")
    for key in ("image_every", "checkpoint_every", "freeze_last_layer_iters", "keep_checkpoints_every"):
        if int(train[key]) < 0:
            raise ConfigError(f"train.{key} must be >= 0, got {train[key]!r}")
    if micro_batch_size(cfg) < 1:
        raise ConfigError(f"data.pipeline.batch_size must be >= 1, got {cfg.data.pipeline.batch_size!r}")
    if float(train.grad_clip) < 0:
        raise ConfigError(f"train.grad_clip must be >= 0 (0 disables clipping), got {train.grad_clip!r}")
    group = to_dict(cfg.deepspeed)
    for key in GROUP_REQUIRED_KEYS:
        if key not in group:
            raise ConfigError(f"deepspeed config {cfg.defaults.deepspeed!r}: missing key {key!r}")
    owned = sorted(set(group) & set(TRAINER_OWNED_KEYS))
    if owned:
        raise ConfigError(f"deepspeed config {cfg.defaults.deepspeed!r}: {owned} are set from cfg.train; remove them")
    stage = group["zero_optimization"].get("stage")
    if stage not in ZERO_STAGES:
        raise ConfigError(f"deepspeed.zero_optimization.stage must be one of {ZERO_STAGES}, got {stage!r}")
    overlap = group["zero_optimization"].get("overlap_comm")
    if overlap not in AUTO_OR_BOOL:
        raise ConfigError(f"deepspeed.zero_optimization.overlap_comm must be one of {AUTO_OR_BOOL}, got {overlap!r}")
    for key in ("grad_overflow_check", "zero3_leaf_modules", "zero3_in_place_fetch"):
        if not isinstance(train[key], bool):
            raise ConfigError(f"train.{key} must be true or false, got {train[key]!r}")
    if train.compile_blocks not in AUTO_OR_BOOL:
        raise ConfigError(f"train.compile_blocks must be one of {AUTO_OR_BOOL}, got {train.compile_blocks!r}")
    if train.compile_blocks is True and stage == 3:
        raise ConfigError("train.compile_blocks=true needs ZeRO 0-2: ZeRO-3 gathers each weight in module hooks "
                          "that break the compiled graphs; use deepspeed=zero1/zero2 or train.compile_blocks=false")


def overlap_comm(stage: int, world_size: int, choice: str | bool) -> bool:
    """``overlap_comm: auto``: on with several ranks (gradient reduction hides behind the backward) and at ZeRO-3
    (its parameter prefetch uses it); off for ZeRO 0-2 on one rank, where there is nothing to overlap and it costs a
    device synchronisation at the end of every backward (one H100, MAE ViT-L ZeRO-1: 0.51 -> 0.61 of the plain
    step; ZeRO-3 without it: 0.28 -> 0.15; benchmarks/RESULTS.md)."""
    if choice != AUTO:
        return bool(choice)
    return world_size > 1 or stage == 3


def deepspeed_config(cfg: Any, world_size: int) -> dict[str, Any]:
    """The student engine's DeepSpeed config for ``world_size`` ranks: the deepspeed group plus cfg.train.

    ``bf16.check_grad_overflow`` is ``train.grad_overflow_check``: DeepSpeed's check reduces every gradient on its
    own (about 14 kernel launches per parameter tensor) and reads the result on the host before each step.
    """
    train = cfg.train
    out = to_dict(cfg.deepspeed)
    out["fp16"] = {**out["fp16"], "enabled": train.precision == "fp16"}
    zero = out["zero_optimization"]
    zero["overlap_comm"] = overlap_comm(int(zero["stage"]), world_size, zero["overlap_comm"])
    out.update(
        train_micro_batch_size_per_gpu=micro_batch_size(cfg),
        gradient_accumulation_steps=int(train.grad_accum_steps),
        gradient_clipping=float(train.grad_clip),
        bf16={"enabled": train.precision == "bf16", "check_grad_overflow": bool(train.grad_overflow_check)},
    )
    return out


def teacher_deepspeed_config(student_config: Mapping[str, Any]) -> dict[str, Any]:
    """ZeRO-3 config of the EMA teacher's engine: partitioned like the student, fp32, no optimizer.

    Parameter persistence is off (threshold 0): a persistent parameter stays gathered between forwards,
    so a shard-local EMA update of it would never reach the full copy the forward uses.
    """
    zero = dict(student_config["zero_optimization"])
    zero.update(stage=3, stage3_param_persistence_threshold=0)
    return {
        "train_micro_batch_size_per_gpu": student_config["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": student_config["gradient_accumulation_steps"],
        "zero_optimization": zero,
        **({"timers": student_config["timers"]} if "timers" in student_config else {}),
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }


def zero_stage(ds_config: Mapping[str, Any]) -> int:
    return int(ds_config["zero_optimization"]["stage"])


def keeps_grad_norm(ds_config: Mapping[str, Any]) -> bool:
    """Whether ``engine.get_global_grad_norm()`` gives the step's norm: not at ZeRO-0 in fp32, where DeepSpeed clips
    with torch's ``clip_grad_norm_`` and keeps nothing (the loop then measures the norm itself)."""
    return zero_stage(ds_config) > 0 or any(ds_config[key]["enabled"] for key in ("bf16", "fp16"))


def autocast_dtype(precision: str) -> torch.dtype | None:
    """Compute dtype of the forward (None: full fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def build_optimizer(groups: Sequence[Mapping[str, Any]], cfg: Any, device: torch.device) -> torch.optim.AdamW:
    """A client AdamW over the model's parameter groups (LR and WD are set per step by :func:`apply_schedule`)."""
    required = {"params", "lr_multiplier", "wd_multiplier", "is_last_layer", "name"}
    torch_groups = []
    for group in groups:
        missing = required - set(group)
        if missing:
            raise ValueError(f"parameter group {group.get('name', '?')!r} lacks {sorted(missing)}")
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            torch_groups.append({**group, "params": params, "lr": 0.0, "weight_decay": 0.0})
    if not torch_groups:
        raise ValueError("the objective has no trainable parameters")
    choice = cfg.train.fused_adamw
    fused = device.type == "cuda" if choice == AUTO else bool(choice)
    betas = tuple(float(b) for b in cfg.train.adamw_betas)
    return torch.optim.AdamW(torch_groups, lr=0.0, betas=betas, eps=float(cfg.train.adamw_eps), fused=fused)


def apply_schedule(param_groups: Sequence[dict[str, Any]], values: Mapping[str, float]) -> None:
    """Write this iteration's LR and weight decay into every optimizer group (multipliers applied)."""
    for group in param_groups:
        lr = values["last_layer_lr"] if group["is_last_layer"] else values["lr"]
        group["lr"] = lr * group["lr_multiplier"]
        group["weight_decay"] = values["weight_decay"] * group["wd_multiplier"]


_CHECKPOINTED_CLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` whose forward is recomputed in backward (one per block class)."""
    if cls not in _CHECKPOINTED_CLASSES:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return cls.forward(self, *args, **kwargs)
            return checkpoint(cls.forward, self, *args, use_reentrant=False, **kwargs)

        _CHECKPOINTED_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward})
    return _CHECKPOINTED_CLASSES[cls]


def enable_activation_checkpointing(blocks: nn.ModuleList) -> int:
    """Recompute each block's activations in backward instead of storing them.

    Each block's class is swapped for a checkpointing subclass: no wrapper module, so parameter names and
    state-dict keys stay those of the plain model, and a deep copy (the EMA teacher) keeps running its own
    weights (a patched ``forward`` attribute would be copied as a closure over the student's block).
    Non-reentrant checkpointing calls the submodules again in backward, so ZeRO-3's module hooks gather
    their parameters for the recomputation too. Without grad (the teacher) the block runs plainly.
    """
    for block in blocks:
        block.__class__ = _checkpointed_class(type(block))
    return len(blocks)


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """Every transformer block under ``module``: the members of each ``*blocks`` list (backbone, MAE decoder)."""
    return [block for name, seq in module.named_modules()
            if name.split(".")[-1].endswith("blocks") and isinstance(seq, nn.ModuleList | nn.Sequential)
            for block in seq]


def compile_blocks_enabled(choice: str | bool, device: torch.device, stage: int) -> bool:
    """``train.compile_blocks: auto``: on with CUDA at ZeRO 0-2, off on the CPU and at ZeRO-3.

    One H200, ZeRO-1, our step against the plain eager step: iBOT ViT-L/16 1.27x with compiled blocks (MFU 46 %)
    against 0.97x without, MAE ViT-L/16 1.04x against 0.96x (benchmarks/RESULTS.md); compiling takes about a
    minute at the start. On the CPU compiled blocks were slower than eager ones; ZeRO-3's hooks break the graphs.
    """
    if choice == AUTO:
        return device.type == "cuda" and stage != 3
    return bool(choice)


def compile_blocks(module: nn.Module) -> int:
    """``torch.compile`` every transformer block under ``module`` in place; returns how many.

    ``Module.compile`` keeps the block object, so parameter names, state-dict keys and DeepSpeed's ZeRO-1/2
    gradient hooks are unchanged. One compiled graph serves every block of a model (same code, parameters as
    inputs); crops of another size recompile once.
    """
    blocks = transformer_blocks(module)
    for block in blocks:
        block.compile()
    return len(blocks)


def autocast_inside_engine(module: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """Run ``module.forward`` under ``torch.autocast(dtype)``, also when the DeepSpeed engine calls it.

    DeepSpeed's engine switches an outer autocast off around its module's forward unless its own
    ``torch_autocast`` mode is configured, and that mode keeps fp32 weights. In our bf16/fp16 mode the student's
    weights are already low precision, but the fp32 EMA teacher, which the objective runs inside that forward,
    ran in fp32 (one H100, iBOT ViT-L/16: ours 0.50x the plain autocast step), and norms and softmaxes ran in
    bf16. Re-entering autocast inside restores what the reference and ``foundation train`` on the CPU do.
    """
    if dtype is None:
        return
    plain = module.forward

    @functools.wraps(plain)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=device.type, dtype=dtype):
            return plain(*args, **kwargs)

    module.forward = forward


def container_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters held directly by modules that also have children (a ViT's ``pos_embed``, ``cls_token``...).

    Under ZeRO-3 a parameter is gathered when its owner's ``forward`` is entered through ``__call__``; these
    are used by methods of their owner (``backbone.forward_features(...)``) whose ``forward`` never runs, so
    nothing would gather them.
    """
    out = []
    for sub in module.modules():
        if next(sub.children(), None) is not None:
            out.extend(p for p in sub._parameters.values() if p is not None)
    return out


def register_container_parameters(root: nn.Module, *modules: nn.Module) -> int:
    """ZeRO-3: have ``root``'s forward (the engine's call) gather the container parameters of ``modules``.

    Registered as external parameters of ``root``, they are gathered when the engine's forward starts and
    released when it ends, including the teacher's (the objective runs the teacher inside its forward).
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    count = 0
    for module in modules:
        for param in container_parameters(module):
            register_external_parameter(root, param)
            count += 1
    return count


def initialize_engine(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                      ds_config: Mapping[str, Any]) -> Any:
    """``deepspeed.initialize`` with a client optimizer (or none, for the teacher); returns the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=dict(ds_config))
    return engine
