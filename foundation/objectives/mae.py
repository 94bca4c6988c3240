"""MAE (He et al. 2022): per-sample random masking, encoder on visible patches only, light decoder, pixel loss.

Runs on ``global_crops[0]``. Reads ``objective.mae`` (mask ratio, decoder size, ``norm_pix_loss``)
and ``objective.weights.mae`` (overridable per step by ``step_values["mae_weight"]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from foundation.models import cfgutil
from foundation.models.backbone import StainViT, build_backbone
from foundation.models.heads import MAEDecoder
from foundation.objectives.base import Batch, Objective, validate_batch
from stain.vocabulary import StainVocabulary


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, N, patch * patch * C]``, row-major patches, pixels ordered (p, q, c) as MAE."""
    B, C, H, W = images.shape
    h, w = H // patch, W // patch
    x = images.reshape(B, C, h, patch, w, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, patch * patch * C)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, N, patch * patch * C]`` -> ``[B, C, H, W]``."""
    B, _, L = patches.shape
    h, w = grid
    C = L // (patch * patch)
    x = patches.reshape(B, h, w, patch, patch, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, h * patch, w * patch)


def random_masking(batch: int, n_patches: int, mask_ratio: float,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking by argsort of uniform noise.

    Returns:
        ids_keep ``[B, K]`` (K = int(N * (1 - mask_ratio))), the kept patches in shuffled order;
        mask ``[B, N]`` float, 1 = masked, in the original patch order;
        ids_restore ``[B, N]``, where each original patch sits in the (kept, masked) order.
    """
    n_keep = int(n_patches * (1 - mask_ratio))
    noise = torch.rand(batch, n_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, n_patches, device=device)
    mask[:, :n_keep] = 0
    return ids_shuffle[:, :n_keep], torch.gather(mask, 1, ids_restore), ids_restore


def pixel_targets(images: torch.Tensor, patch: int, norm_pix: bool, eps: float) -> torch.Tensor:
    """Per-patch targets ``[B, N, p*p*C]``; with ``norm_pix`` each patch is standardised by its own mean/var."""
    target = patchify(images.float(), patch)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
        target = (target - mean) / (var + eps) ** 0.5
    return target


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error (``mask`` 1 = masked)."""
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


class MAEParts:
    """The MAE settings of ``cfg.objective.mae``: masking, decoder construction, loss and pictures."""

    def __init__(self, obj_cfg: Mapping[str, Any], backbone: StainViT) -> None:
        g = lambda key: cfgutil.get(obj_cfg, f"mae.{key}", "objective")  # noqa: E731
        self.mask_ratio = float(g("mask_ratio"))
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"objective.mae.mask_ratio must lie in [0, 1), got {self.mask_ratio}")
        self.norm_pix = bool(g("norm_pix_loss"))
        self.norm_pix_eps = cfgutil.positive(g("norm_pix_eps"), "objective.mae.norm_pix_eps")
        self.patch = backbone.patch_embed.patch_size[0]
        self.decoder_args = (backbone.embed_dim, int(g("decoder_embed_dim")), int(g("decoder_depth")),
                             int(g("decoder_num_heads")), float(g("decoder_mlp_ratio")), self.patch)

    def build_decoder(self) -> MAEDecoder:
        return MAEDecoder(*self.decoder_args)

    def masking(self, backbone: StainViT, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, w = backbone.patch_grid(images.shape[-2], images.shape[-1])
        return random_masking(images.shape[0], h * w, self.mask_ratio, images.device)

    def loss(self, decoder: MAEDecoder, backbone: StainViT, images: torch.Tensor, features: dict[str, Any],
             mask: torch.Tensor, ids_restore: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, pred [B, N, p*p*C])`` from the encoder output of the visible patches."""
        grid = backbone.patch_grid(images.shape[-2], images.shape[-1])
        pred = decoder(features["tokens"], features["num_prefix_tokens"], ids_restore, grid)
        target = pixel_targets(images, self.patch, self.norm_pix, self.norm_pix_eps)
        return mae_loss(pred, target, mask), pred

    def run(self, decoder: MAEDecoder, backbone: StainViT,
            batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """MAE alone on ``global_crops[0]``: ``(loss, pred, mask, images)``."""
        images = batch["global_crops"][0]
        ids_keep, mask, ids_restore = self.masking(backbone, images)
        features = backbone.forward_features(images, batch["stain_ids"], batch["marker_ids"], ids_keep=ids_keep)
        loss, pred = self.loss(decoder, backbone, images, features, mask, ids_restore)
        return loss, pred, mask, images

    @torch.no_grad()
    def pictures(self, decoder: MAEDecoder, backbone: StainViT, batch: Batch) -> dict[str, torch.Tensor]:
        """Input, masked input (masked patches set to 0) and reconstruction (visible patches pasted in)."""
        _, pred, mask, images = self.run(decoder, backbone, batch)
        grid = backbone.patch_grid(images.shape[-2], images.shape[-1])
        patches = patchify(images.float(), self.patch)
        pred = pred.float()
        if self.norm_pix:  # undo the per-patch standardisation with the true patch statistics
            mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
            pred = pred * (var + self.norm_pix_eps) ** 0.5 + mean
        m = mask.unsqueeze(-1)
        return {
            "mae_input": images.float(),
            "mae_masked": unpatchify(patches * (1 - m), self.patch, grid),
            "mae_reconstruction": unpatchify(patches * (1 - m) + pred * m, self.patch, grid),
        }


class MAE(Objective):
    """Masked autoencoder on ``global_crops[0]``; no teacher."""

    required_batch_keys = ("global_crops", "stain_ids", "marker_ids")
    schedule_names = ("mae_weight",)

    def __init__(self, model_cfg: Mapping[str, Any], obj_cfg: Mapping[str, Any], vocab: StainVocabulary) -> None:
        super().__init__()
        backbone = build_backbone(model_cfg, vocab.num_stains, vocab.num_markers, mask_token=False)
        self.mae = MAEParts(obj_cfg, backbone)
        self.student = nn.ModuleDict({"backbone": backbone})
        self.decoder = self.mae.build_decoder()
        self.default_weight = float(cfgutil.get(obj_cfg, "weights.mae", "objective"))

    def backbone(self) -> StainViT:
        return self.student["backbone"]

    def forward(self, batch: Batch, teacher: nn.Module | None,
                step_values: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        validate_batch(batch, self.required_batch_keys)
        loss, _, _, _ = self.mae.run(self.decoder, self.backbone(), batch)
        weight = float(step_values.get("mae_weight", self.default_weight))
        return weight * loss, {"mae": loss.detach()}

    @torch.no_grad()
    def pictures(self, batch: Batch, teacher: nn.Module | None) -> dict[str, torch.Tensor]:
        return {**super().pictures(batch, teacher), **self.mae.pictures(self.decoder, self.backbone(), batch)}
