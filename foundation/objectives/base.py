"""The one interface every self-supervised objective implements (MAE, iBOT, DINO, SimCLR, BYOL, ...).

The split follows DINOv2's meta-architecture: the objective owns every model-specific step
(student forward over all crops, the teacher forward, the loss terms, which parameters the EMA
teacher tracks, parameter-group tags); the trainer owns only the engine, schedules, the loop,
checkpoints and logs.

Batch contract (produced by ``foundation.data``; crop-major so ``flatten(0, 1)`` gives one call):

=================  =============================  ==============================================
key                shape / dtype                  meaning
=================  =============================  ==============================================
``global_crops``   ``[G, B, 3, H, W]`` float      normalised global crops (G >= 1)
``local_crops``    ``[L, B, 3, h, w]`` float      normalised local crops (L may be 0)
``masks``          ``[G, B, N]`` bool             iBOT masks over the N patches of each global crop
``stain_ids``      ``[B]`` long                   stain-vocabulary id per sample (0 = unknown)
``marker_ids``     ``[B]`` long                   IHC marker id per sample (0 = unknown / none)
``sample_ids``     ``[B]`` long, optional         global sample position, for debugging
=================  =============================  ==============================================

Schedule values arrive in ``step_values`` (``teacher_temp``, ``mae_weight``, ``ibot_weight``, ...):
they are functions of the iteration computed by the trainer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import nn

Batch = Mapping[str, torch.Tensor]

#: dimensions of each batch key (``sample_ids`` is optional and never required)
_BATCH_DIMS = {"global_crops": 5, "local_crops": 5, "masks": 3, "stain_ids": 1, "marker_ids": 1}


def validate_batch(batch: Batch, keys: Sequence[str]) -> None:
    """Raise ``KeyError``/``ValueError`` naming the key when ``batch`` breaks the contract for ``keys``.

    Checks presence, rank, the common batch size B and the mask grid against the global crops;
    shapes only, so it never synchronises with the device.
    """
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing} (has {sorted(batch)}); this objective reads {list(keys)}")
    for key in keys:
        value = batch[key]
        dims = _BATCH_DIMS.get(key)
        if dims is not None and value.dim() != dims:
            raise ValueError(f"batch[{key!r}] must have {dims} dimensions, got shape {list(value.shape)}")
    batch_size = batch["stain_ids"].shape[0] if "stain_ids" in keys else None
    for key in ("global_crops", "local_crops", "masks"):
        if key in keys and batch_size is not None and batch[key].shape[1] != batch_size:
            raise ValueError(f"batch[{key!r}] has batch size {batch[key].shape[1]}, stain_ids has {batch_size}")
    if "marker_ids" in keys and "stain_ids" in keys and batch["marker_ids"].shape != batch["stain_ids"].shape:
        raise ValueError(f"batch['marker_ids'] {list(batch['marker_ids'].shape)} differs from "
                         f"batch['stain_ids'] {list(batch['stain_ids'].shape)}")
    if "masks" in keys:
        masks, crops = batch["masks"], batch["global_crops"]
        if masks.dtype != torch.bool or masks.shape[:2] != crops.shape[:2]:
            raise ValueError(f"batch['masks'] must be bool [G, B, N] matching global_crops {list(crops.shape[:2])}, "
                             f"got {masks.dtype} {list(masks.shape)}")


def step_value(step_values: Mapping[str, float], name: str) -> float:
    """A required schedule value; ``KeyError`` naming it when the trainer did not provide it."""
    if name not in step_values:
        raise KeyError(f"step_values lacks {name!r} (has {sorted(step_values)}): the trainer must schedule it")
    return float(step_values[name])


class Objective(nn.Module, ABC):
    """A self-supervised objective. Its own parameters are the student (what the optimizer trains).

    The trainer wraps the objective in the DeepSpeed engine, so ``forward`` must run the student
    **once** over all crops and return **one** scalar loss: a single backward then works at every
    ZeRO stage. The EMA teacher, where the objective has one, is a separate module built by
    :meth:`build_teacher` and passed back into :meth:`forward`; the trainer partitions it like the
    student and updates it shard-locally (``teacher_param <- m * teacher_param + (1 - m) * student_param``
    over the pairs given by :meth:`teacher_pairs`).
    """

    #: batch keys this objective reads (the data pipeline produces only what is needed)
    required_batch_keys: tuple[str, ...] = ("global_crops", "stain_ids", "marker_ids")
    #: schedule names this objective reads from ``step_values``
    schedule_names: tuple[str, ...] = ()

    @abstractmethod
    def forward(self, batch: Batch, teacher: nn.Module | None,
                step_values: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(total_loss, terms)``: the scalar to backpropagate and each term, detached, for logging."""

    def build_teacher(self) -> nn.Module | None:
        """A fresh module holding the teacher's copy of the tracked student parts, or ``None``."""
        return None

    def teacher_pairs(self, teacher: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """``(student_param, teacher_param)`` pairs in a fixed order, for the EMA update."""
        return []

    @abstractmethod
    def backbone(self) -> nn.Module:
        """The student encoder (what ``export`` writes when asked for the student)."""

    @staticmethod
    def teacher_backbone(teacher: nn.Module) -> nn.Module:
        """The teacher's encoder inside the module returned by :meth:`build_teacher`."""
        return teacher.backbone

    @staticmethod
    def teacher_head(teacher: nn.Module) -> nn.Module | None:
        """The teacher's prototype head (CLS -> logits softmaxed at ``teacher_temp``), or ``None`` (the default:
        no such head). The in-training monitor reads its entropy."""
        return None

    @torch.no_grad()
    def pictures(self, batch: Batch, teacher: nn.Module | None) -> dict[str, torch.Tensor]:
        """Images for logging, computed on ``global_crops[0]``: name -> ``[B, C, H, W]`` float.

        Here: ``attention`` (values in [0, 1]), the CLS-to-patch attention of the last block of the teacher's backbone
        (the student's where there is no teacher), one channel per head, each map scaled to max 1.
        Objectives add their own (MAE: ``mae_input``, ``mae_masked``, ``mae_reconstruction``, which
        stay in the normalised input space: the trainer un-normalises them with the data mean/std).
        Call it with the objective in eval mode (no stain-token dropout, no drop path).
        """
        backbone = self.teacher_backbone(teacher) if teacher is not None else self.backbone()
        images = batch["global_crops"][0]
        maps = backbone.cls_attention_map(images, batch["stain_ids"], batch["marker_ids"]).float()
        return {"attention": maps / maps.amax(dim=(-2, -1), keepdim=True).clamp(min=torch.finfo(maps.dtype).tiny)}

    def param_group_tags(self, name: str) -> dict[str, float | bool]:
        """Extra tags for one named parameter (``is_last_layer`` for prototype freezing, ...).

        State that must survive a resume (DINO centre, queues) lives in registered buffers, so it
        is saved with the engine's module state.
        """
        return {}
