"""BYOL (Grill et al. 2020) on multi-crop batches: online projector + predictor, EMA target (the teacher).

The online network sees every crop (global + local) and predicts, for each of them, the target's
projection of each *other* global crop of the same image: the loss is
``mean over pairs (v, u), v != u, of mean_b (2 - 2 cos(p_v,b, z_u,b))`` with u over global crops.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from foundation.config import ConfigError
from foundation.models import cfgutil
from foundation.models.backbone import StainViT, build_backbone
from foundation.models.heads import ProjectionMLP
from foundation.objectives.base import Batch, Objective, validate_batch
from foundation.objectives.teacher import EMATeacherMixin
from stain.vocabulary import StainVocabulary


def byol_loss(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``online [V, B, d]`` predictions (global views first) vs ``target [G, B, d]`` projections; see above."""
    V, G = online.shape[0], target.shape[0]
    n_pairs = V * G - min(V, G)
    if n_pairs == 0:
        raise ValueError(f"BYOL needs two views: got {V} online and {G} target views")
    with torch.autocast(device_type=online.device.type, enabled=False):  # the einsum must stay fp32
        p = F.normalize(online.float(), dim=-1)
        z = F.normalize(target.float(), dim=-1)
        cos = torch.einsum("vbd,ubd->vu", p, z) / online.shape[1]            # [V, G] mean cosine per pair
        same_view = torch.eye(V, G, dtype=torch.bool, device=cos.device)
        return (2.0 - 2.0 * cos).masked_fill(same_view, 0.0).sum() / n_pairs


class BYOL(EMATeacherMixin, Objective):
    """BYOL with the stain-token backbone; the teacher tracks backbone + projector."""

    required_batch_keys = ("global_crops", "local_crops", "stain_ids", "marker_ids")
    schedule_names = ("byol_weight",)

    def __init__(self, model_cfg: Mapping[str, Any], obj_cfg: Mapping[str, Any], vocab: StainVocabulary) -> None:
        super().__init__()
        g = lambda key: cfgutil.get(obj_cfg, key, "objective")  # noqa: E731
        norm = str(g("projection.norm"))
        if norm == "batch":
            raise ConfigError("objective.projection.norm = 'batch' is not supported for BYOL: the EMA target runs "
                              "in eval mode, where batch norm would use running statistics the EMA never updates")
        backbone = build_backbone(model_cfg, vocab.num_stains, vocab.num_markers, mask_token=False)
        hidden, out = int(g("projection.hidden_dim")), int(g("projection.out_dim"))
        nlayers = int(g("projection.nlayers"))
        projector = ProjectionMLP(backbone.embed_dim, hidden, out, nlayers, norm)
        self.student = nn.ModuleDict({"backbone": backbone, "projector": projector})
        self.predictor = ProjectionMLP(out, int(g("projection.predictor_hidden_dim")), out, nlayers, norm)
        self.default_weight = float(g("weights.byol"))

    def backbone(self) -> StainViT:
        return self.student["backbone"]

    def forward(self, batch: Batch, teacher: nn.Module | None,
                step_values: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        validate_batch(batch, self.required_batch_keys)
        if teacher is None:
            raise ValueError("BYOL needs the EMA target from build_teacher(); got None")
        teacher = getattr(teacher, "module", teacher)
        B = batch["stain_ids"].shape[0]
        global_crops = batch["global_crops"].flatten(0, 1)
        with torch.no_grad():
            t_cls = teacher.backbone.forward_features(global_crops, batch["stain_ids"], batch["marker_ids"])["cls"]
            target = teacher.projector(t_cls)
        crops = [global_crops]
        if batch["local_crops"].shape[0] > 0:
            crops.append(batch["local_crops"].flatten(0, 1))
        outs = self.backbone().forward_features_list(crops, batch["stain_ids"], batch["marker_ids"])
        online = self.predictor(self.student["projector"](torch.cat([o["cls"] for o in outs])))
        loss = byol_loss(online.view(-1, B, online.shape[-1]), target.view(-1, B, target.shape[-1]))
        weight = float(step_values.get("byol_weight", self.default_weight))
        return weight * loss, {"byol": loss.detach()}
