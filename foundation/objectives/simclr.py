"""SimCLR (Chen et al. 2020): NT-Xent on projected CLS embeddings, negatives gathered across ranks.

Every crop of the multi-crop batch is a view (G global + L local). For an anchor view of sample i,
the positives are the other views of sample i; the denominator runs over every other view of every
sample on every rank. With two views this is exactly SimCLR's NT-Xent; with more it is the
multi-positive form (mean log-probability over the positives, SupCon "out").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from foundation.models import cfgutil
from foundation.models.backbone import StainViT, build_backbone
from foundation.models.heads import ProjectionMLP
from foundation.objectives import distributed as D
from foundation.objectives.base import Batch, Objective, validate_batch
from stain.vocabulary import StainVocabulary


def nt_xent(z: torch.Tensor, temperature: float, distributed: bool = False) -> torch.Tensor:
    """NT-Xent over ``z [V, B, d]`` (V views of B samples); see the module docstring.

    ``distributed=True`` takes negatives (and the other views) from every rank through a
    gradient-preserving all-gather; each rank averages over its own anchors.
    """
    V, B, _ = z.shape
    if V < 2:
        raise ValueError(f"NT-Xent needs at least 2 views per sample, got {V}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = F.normalize(z.float(), dim=-1)
        per_sample = z.transpose(0, 1)                                   # [B, V, d]
        offset = 0
        if distributed and D.is_distributed():
            offset = D.rank() * B
            per_sample = D.all_gather_with_grad(per_sample.contiguous())  # [W*B, V, d]
        n_samples = per_sample.shape[0]
        candidates = per_sample.reshape(n_samples * V, -1)               # index = sample * V + view
        anchors = z.reshape(V * B, -1)                                   # index = view * B + b
        logits = anchors @ candidates.t() / temperature                  # [V*B, W*B*V]

        dev = z.device
        anchor_sample = torch.arange(B, device=dev).repeat(V) + offset
        anchor_view = torch.arange(V, device=dev).repeat_interleave(B)
        cand_sample = torch.arange(n_samples, device=dev).repeat_interleave(V)
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[torch.arange(V * B, device=dev), anchor_sample * V + anchor_view] = True
        positive = (anchor_sample[:, None] == cand_sample[None]) & ~is_self

        log_prob = logits - torch.logsumexp(logits.masked_fill(is_self, -torch.inf), dim=1, keepdim=True)
        per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(dim=1) / positive.sum(dim=1)
        return per_anchor.mean()


class SimCLR(Objective):
    """SimCLR on the stain-token backbone: projector on the CLS embedding, NT-Xent, no teacher."""

    required_batch_keys = ("global_crops", "local_crops", "stain_ids", "marker_ids")
    schedule_names = ("simclr_weight",)

    def __init__(self, model_cfg: Mapping[str, Any], obj_cfg: Mapping[str, Any], vocab: StainVocabulary) -> None:
        super().__init__()
        g = lambda key: cfgutil.get(obj_cfg, key, "objective")  # noqa: E731
        backbone = build_backbone(model_cfg, vocab.num_stains, vocab.num_markers, mask_token=False)
        projector = ProjectionMLP(backbone.embed_dim, int(g("projection.hidden_dim")), int(g("projection.out_dim")),
                                  int(g("projection.nlayers")), str(g("projection.norm")))
        self.student = nn.ModuleDict({"backbone": backbone, "projector": projector})
        self.temperature = cfgutil.positive(g("simclr.temperature"), "objective.simclr.temperature")
        self.gather_distributed = bool(g("simclr.gather_distributed"))
        self.default_weight = float(g("weights.simclr"))

    def backbone(self) -> StainViT:
        return self.student["backbone"]

    def forward(self, batch: Batch, teacher: nn.Module | None,
                step_values: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        validate_batch(batch, self.required_batch_keys)
        B = batch["stain_ids"].shape[0]
        crops = [batch["global_crops"].flatten(0, 1)]
        if batch["local_crops"].shape[0] > 0:
            crops.append(batch["local_crops"].flatten(0, 1))
        outs = self.backbone().forward_features_list(crops, batch["stain_ids"], batch["marker_ids"])
        z = self.student["projector"](torch.cat([o["cls"] for o in outs]))
        loss = nt_xent(z.view(-1, B, z.shape[-1]), self.temperature, self.gather_distributed)
        weight = float(step_values.get("simclr_weight", self.default_weight))
        return weight * loss, {"simclr": loss.detach()}
