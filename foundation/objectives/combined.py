"""MAE + iBOT as one objective: one student call over the iBOT crops and the MAE visible patches, one loss.

The student backbone runs once over three crop groups: the masked global crops and the local crops
(iBOT), and ``global_crops[0]`` reduced to its MAE-visible patches (a fresh random mask, ratio
``objective.mae.mask_ratio``). The MAE decoder reconstructs the hidden patches; the total is
``sum_t weight_t * term_t`` over ``mae``, ``dino``, ``ibot``, ``koleo``, ``kde``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from foundation.objectives.base import Batch, step_value, validate_batch
from foundation.objectives.ibot import IBOT
from foundation.objectives.mae import MAEParts
from stain.vocabulary import StainVocabulary


class MAEIBOT(IBOT):
    """iBOT's teacher, heads and terms plus an MAE decoder on the same backbone."""

    schedule_names = (*IBOT.schedule_names, "mae_weight")
    terms = (*IBOT.terms, "mae")

    def __init__(self, model_cfg: Mapping[str, Any], obj_cfg: Mapping[str, Any], vocab: StainVocabulary) -> None:
        super().__init__(model_cfg, obj_cfg, vocab)
        self.mae = MAEParts(obj_cfg, self.backbone())
        self.decoder = self.mae.build_decoder()

    def forward(self, batch: Batch, teacher: nn.Module | None,
                step_values: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        validate_batch(batch, self.required_batch_keys)
        targets = self.teacher_targets(self.check_teacher(teacher), batch, step_value(step_values, "teacher_temp"))
        groups = self.distillation_groups(batch)
        images = batch["global_crops"][0]
        ids_keep, mask, ids_restore = self.mae.masking(self.backbone(), images)
        outs = self.backbone().forward_features_list([*groups.crops, images], batch["stain_ids"],
                                                     batch["marker_ids"], [*groups.masks, None],
                                                     [*groups.ids_keep, ids_keep])
        terms = self.distillation_terms(outs[:-1], batch, targets, step_values)
        terms["mae"], _ = self.mae.loss(self.decoder, self.backbone(), images, outs[-1], mask, ids_restore)
        return self.total(terms, step_values)

    @torch.no_grad()
    def pictures(self, batch: Batch, teacher: nn.Module | None) -> dict[str, torch.Tensor]:
        return {**super().pictures(batch, teacher), **self.mae.pictures(self.decoder, self.backbone(), batch)}
