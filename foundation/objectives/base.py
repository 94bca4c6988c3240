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
from collections.abc import Mapping

import torch
from torch import nn

Batch = Mapping[str, torch.Tensor]


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

    def param_group_tags(self, name: str) -> dict[str, float | bool]:
        """Extra tags for one named parameter (``is_last_layer`` for prototype freezing, ...).

        State that must survive a resume (DINO centre, queues) lives in registered buffers, so it
        is saved with the engine's module state.
        """
        return {}
