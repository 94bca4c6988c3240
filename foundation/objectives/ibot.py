"""iBOT as in DINOv2: CLS self-distillation over crops + masked-patch distillation + KoLeo/KDE on the student CLS.

Per step (one student call over all crops, one teacher call over the global crops):

- ``dino``: teacher global views vs student global + local views, same-view pairs excluded,
  averaged over pairs (:func:`~foundation.objectives.losses.cross_view_cross_entropy`).
- ``ibot``: the student sees the global crops with masked patches replaced by the mask token and
  matches the teacher's (unmasked) patch distributions there, each image weighted equally.
- ``koleo`` / ``kde``: on the student's global CLS embeddings, per global crop (never between two
  crops of one image), summed over crops as DINOv2; skipped while their weight is 0.

Teacher targets are centred by an EMA centre or by Sinkhorn-Knopp (``objective.dino.centering``)
at temperature ``step_values["teacher_temp"]``. Term weights come from ``objective.weights`` and
are overridden per step by ``step_values["<term>_weight"]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from foundation.models import cfgutil
from foundation.models.backbone import Features, StainViT, build_backbone
from foundation.models.heads import DINOHead
from foundation.objectives.base import Batch, Objective, step_value, validate_batch
from foundation.objectives.koleo import kde_loss, koleo_loss
from foundation.objectives.losses import (
    CenterEMA,
    cross_view_cross_entropy,
    masked_patch_cross_entropy,
    sinkhorn_knopp,
)
from foundation.objectives.teacher import EMATeacherMixin
from stain.vocabulary import StainVocabulary

CENTERINGS = ("centering", "sinkhorn_knopp")


class TeacherTargets(NamedTuple):
    cls: torch.Tensor                 # [G, B, K] centred teacher distributions of the global crops
    patch: torch.Tensor | None        # [M, K'] at the masked patches (iBOT only)


class Groups(NamedTuple):
    crops: list[torch.Tensor]
    masks: list[torch.Tensor | None]
    ids_keep: list[torch.Tensor | None]


class IBOT(EMATeacherMixin, Objective):
    """iBOT / DINOv2 objective with stain tokens (see the module docstring)."""

    required_batch_keys = ("global_crops", "local_crops", "masks", "stain_ids", "marker_ids")
    schedule_names = ("teacher_temp", "dino_weight", "ibot_weight", "koleo_weight", "kde_weight")
    terms: tuple[str, ...] = ("dino", "ibot", "koleo", "kde")
    use_patch_loss = True

    def __init__(self, model_cfg: Mapping[str, Any], obj_cfg: Mapping[str, Any], vocab: StainVocabulary) -> None:
        super().__init__()
        g = lambda key: cfgutil.get(obj_cfg, key, "objective")  # noqa: E731
        backbone = build_backbone(model_cfg, vocab.num_stains, vocab.num_markers, mask_token=self.use_patch_loss)
        norm_last_layer = bool(g("dino.norm_last_layer"))
        parts: dict[str, nn.Module] = {
            "backbone": backbone,
            "dino_head": DINOHead.from_config(backbone.embed_dim, g("dino"), "objective.dino", norm_last_layer),
        }
        self.separate_head = self.use_patch_loss and bool(g("ibot.separate_head"))
        if self.separate_head:
            parts["ibot_head"] = DINOHead.from_config(backbone.embed_dim, g("ibot"), "objective.ibot",
                                                      norm_last_layer)
        self.student = nn.ModuleDict(parts)

        self.student_temp = cfgutil.positive(g("dino.student_temp"), "objective.dino.student_temp")
        self.centering = cfgutil.choice(g("dino.centering"), CENTERINGS, "objective.dino.centering")
        self.sinkhorn_iterations = int(g("dino.sinkhorn_iterations"))
        if self.centering == "centering":
            momentum = float(g("dino.center_momentum"))
            self.dino_center = CenterEMA(int(g("dino.head_n_prototypes")), momentum)
            if self.use_patch_loss:
                patch_cfg = "ibot" if self.separate_head else "dino"
                self.ibot_center = CenterEMA(int(g(f"{patch_cfg}.head_n_prototypes")), momentum)
        self.koleo_eps = cfgutil.positive(g("koleo.eps"), "objective.koleo.eps")
        self.koleo_distributed = bool(g("koleo.distributed"))
        self.kde_kappa = cfgutil.positive(g("koleo.kde_kappa"), "objective.koleo.kde_kappa")
        self.kde_distributed = bool(g("koleo.kde_distributed"))
        self.default_weights = {t: float(g(f"weights.{t}")) for t in self.terms}

    # ------------------------------------------------------------------------------ interface parts
    def backbone(self) -> StainViT:
        return self.student["backbone"]

    @staticmethod
    def teacher_head(teacher: nn.Module) -> nn.Module:
        return getattr(teacher, "module", teacher)["dino_head"]

    def param_group_tags(self, name: str) -> dict[str, float | bool]:
        return {"is_last_layer": ".last_layer." in name}

    def weight(self, term: str, step_values: Mapping[str, float]) -> float:
        return float(step_values.get(f"{term}_weight", self.default_weights[term]))

    # ------------------------------------------------------------------------------------- teacher
    def _centre(self, logits: torch.Tensor, temp: float, center: str) -> torch.Tensor:
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, self.sinkhorn_iterations)
        module: CenterEMA = getattr(self, center)
        probs = module.probs(logits, temp)
        module.update(logits)
        return probs

    @torch.no_grad()
    def teacher_targets(self, teacher: nn.Module, batch: Batch, temp: float) -> TeacherTargets:
        """Centred teacher distributions for the CLS of each global crop and (iBOT) its masked patches."""
        crops = batch["global_crops"]
        G, B = crops.shape[:2]
        out = teacher.backbone.forward_features(crops.flatten(0, 1), batch["stain_ids"], batch["marker_ids"])
        if not self.use_patch_loss:
            return TeacherTargets(self._centre(teacher.dino_head(out["cls"]), temp, "dino_center").view(G, B, -1), None)
        masked = out["patch"][batch["masks"].flatten(0, 1)]                       # [M, D]
        if self.separate_head:
            cls_logits, patch_logits = teacher.dino_head(out["cls"]), teacher.ibot_head(masked)
        else:  # one head call for both, as DINOv2
            cls_logits, patch_logits = teacher.dino_head(torch.cat([out["cls"], masked])).split([G * B, len(masked)])
        return TeacherTargets(self._centre(cls_logits, temp, "dino_center").view(G, B, -1),
                              self._centre(patch_logits, temp, "ibot_center"))

    # ------------------------------------------------------------------------------------- student
    def distillation_groups(self, batch: Batch) -> Groups:
        """Student crop groups: the global crops (masked for iBOT), then the local crops if any."""
        crops = [batch["global_crops"].flatten(0, 1)]
        masks = [batch["masks"].flatten(0, 1) if self.use_patch_loss else None]
        if batch["local_crops"].shape[0] > 0:
            crops.append(batch["local_crops"].flatten(0, 1))
            masks.append(None)
        return Groups(crops, masks, [None] * len(crops))

    def distillation_terms(self, outs: Sequence[Features], batch: Batch, targets: TeacherTargets,
                           step_values: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """Loss terms from the student outputs of :meth:`distillation_groups` (global, then local)."""
        G, B = batch["global_crops"].shape[:2]
        cls_inputs = [o["cls"] for o in outs]
        head_inputs = list(cls_inputs)
        masks = batch["masks"].flatten(0, 1) if self.use_patch_loss else None
        masked = outs[0]["patch"][masks] if masks is not None else None              # [M, D]
        if masked is not None and not self.separate_head:
            head_inputs.append(masked)
        logits = self.student["dino_head"](torch.cat(head_inputs)).split([len(x) for x in head_inputs])
        cls_logits = torch.cat(logits[:len(cls_inputs)]).view(-1, B, logits[0].shape[-1])   # [V, B, K]
        terms = {"dino": cross_view_cross_entropy(cls_logits, targets.cls, self.student_temp)}
        if masked is not None:
            patch_logits = self.student["ibot_head"](masked) if self.separate_head else logits[-1]
            terms["ibot"] = masked_patch_cross_entropy(patch_logits, targets.patch, masks, self.student_temp)
        global_cls = outs[0]["cls"].chunk(G)
        if self.weight("koleo", step_values):
            terms["koleo"] = sum(koleo_loss(c, self.koleo_eps, self.koleo_distributed) for c in global_cls)
        if self.weight("kde", step_values):
            terms["kde"] = sum(kde_loss(c, self.kde_kappa, self.kde_distributed) for c in global_cls)
        return terms

    def total(self, terms: Mapping[str, torch.Tensor],
              step_values: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``sum_t weight_t * term_t`` and the unweighted terms, detached, for logging."""
        loss = sum(self.weight(name, step_values) * value for name, value in terms.items())
        return loss, {name: value.detach() for name, value in terms.items()}

    def check_teacher(self, teacher: nn.Module | None) -> nn.Module:
        if teacher is None:
            raise ValueError(f"{type(self).__name__} needs the EMA teacher from build_teacher(); got None")
        return getattr(teacher, "module", teacher)

    def forward(self, batch: Batch, teacher: nn.Module | None,
                step_values: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        validate_batch(batch, self.required_batch_keys)
        targets = self.teacher_targets(self.check_teacher(teacher), batch, step_value(step_values, "teacher_temp"))
        groups = self.distillation_groups(batch)
        outs = self.backbone().forward_features_list(groups.crops, batch["stain_ids"], batch["marker_ids"],
                                                     groups.masks, groups.ids_keep)
        return self.total(self.distillation_terms(outs, batch, targets, step_values), step_values)
