"""Segmentation demonstrator: a 1x1-conv decoder on frozen patch tokens, upsampled, trained on Ki67 masks.

Every image is cut into ``crop_size`` crops (:func:`~foundation.eval.seg_data.crop_grid`). Each feature source
(the encoder, its random twin, the per-patch colour histogram) gives a ``[h, w, D]`` grid per crop, computed
once; the decoder standardises it with the training crops' mean/std, maps it to class logits with one 1x1
convolution and upsamples them bilinearly to the crop. It is trained with (optionally class-weighted) cross
entropy, boundary pixels ignored or merged (see :mod:`~foundation.eval.seg_data`).

Splits: ``leave_one_out`` trains on all images but one and tests on that one (one fold per image); ``half``
trains on the first half of the images (by name) and tests on the rest. Dice per class is computed over all
held-out pixels of a fold; the summary is mean and std over folds, and ``mean_fg_dice`` averages the two
nucleus classes (eva reports Dice without background).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from foundation.config import ConfigError
from foundation.eval.embed import autocast
from foundation.eval.metrics import dice_per_class, summarise
from foundation.eval.seg_data import BOUNDARY_MODES, CLASSES, IGNORE, SegImage, crop_grid

SPLITS = ("leave_one_out", "half")
CLASS_WEIGHTS = ("balanced", "none")


class PatchSource(Protocol):
    name: str

    def patch_features(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SegParams:
    crop_size: int
    split: str
    boundary: str
    mask_threshold: int
    class_weights: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SegParams:
        p = cls(int(cfg["crop_size"]), str(cfg["split"]), str(cfg["boundary"]), int(cfg["mask_threshold"]),
                str(cfg["class_weights"]), int(cfg["epochs"]), int(cfg["batch_size"]), float(cfg["lr"]),
                float(cfg["weight_decay"]))
        for key, value, allowed in (("split", p.split, SPLITS), ("boundary", p.boundary, BOUNDARY_MODES),
                                    ("class_weights", p.class_weights, CLASS_WEIGHTS)):
            if value not in allowed:
                raise ConfigError(f"eval.segmentation.{key} = {value!r} is not one of {list(allowed)}")
        if min(p.crop_size, p.epochs, p.batch_size) < 1 or p.lr <= 0 or p.weight_decay < 0:
            raise ConfigError(f"eval.segmentation: crop_size, epochs, batch_size must be >= 1, lr > 0, "
                              f"weight_decay >= 0; got {p}")
        if not 1 <= p.mask_threshold <= 255:
            raise ConfigError(f"eval.segmentation.mask_threshold must lie in 1..255, got {p.mask_threshold}")
        return p


def folds(names: Sequence[str], split: str) -> list[tuple[list[int], list[int]]]:
    """``(train, test)`` image indices of each fold."""
    n = len(names)
    if n < 2:
        raise ValueError(f"the segmentation demonstrator needs at least 2 images, got {n}")
    if split == "leave_one_out":
        return [([j for j in range(n) if j != i], [i]) for i in range(n)]
    half = n // 2
    return [(list(range(half)), list(range(half, n)))]


class LinearDecoder(nn.Module):
    """Standardise the token grid, 1x1 conv to class logits, bilinear upsampling to the crop."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))
        self.conv = nn.Conv2d(mean.numel(), num_classes, kernel_size=1)

    def forward(self, tokens: torch.Tensor, size: int) -> torch.Tensor:
        """``[B, h, w, D]`` -> logits ``[B, C, size, size]``."""
        x = (tokens.permute(0, 3, 1, 2) - self.mean) / self.std
        return F.interpolate(self.conv(x), size=(size, size), mode="bilinear", align_corners=False)


def class_weights(targets: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor | None:
    """``balanced``: ``n_pixels / (C * n_pixels_of_class)`` over the scored pixels (sklearn's rule); 0 for a
    class absent from training."""
    if mode == "none":
        return None
    counts = torch.bincount(targets[targets != IGNORE].long().flatten(), minlength=num_classes)[:num_classes].float()
    weights = counts.sum() / (num_classes * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


def train_decoder(tokens: torch.Tensor, targets: torch.Tensor, params: SegParams, seed: int) -> LinearDecoder:
    """Fit a :class:`LinearDecoder` on token grids ``[N, h, w, D]`` and class maps ``[N, S, S]``."""
    flat = tokens.flatten(0, 2)
    std = flat.std(dim=0).clamp(min=torch.finfo(flat.dtype).eps)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = LinearDecoder(flat.mean(dim=0), std, len(CLASSES)).to(tokens.device)
    weight = class_weights(targets, len(CLASSES), params.class_weights)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    labels = targets.long()
    for _ in range(params.epochs):
        order = torch.randperm(len(tokens), generator=generator).to(tokens.device)
        for batch in order.split(params.batch_size):
            logits = decoder(tokens[batch], params.crop_size)
            loss = F.cross_entropy(logits, labels[batch], weight=weight, ignore_index=IGNORE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return decoder.eval()


@torch.no_grad()
def token_grids(source: PatchSource, crops: np.ndarray, batch_size: int, device: torch.device,
                bf16: bool) -> torch.Tensor:
    """``[N, h, w, D]`` float32 token grids of uint8 crops ``[N, S, S, 3]`` (on ``device``)."""
    images = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2)
    parts = []
    for batch in images.split(batch_size):
        with autocast(device, bf16):
            parts.append(source.patch_features(batch.to(device)).float())
    return torch.cat(parts)


def fold_dice(decoder: LinearDecoder, tokens: torch.Tensor, targets: np.ndarray, crop_size: int) -> np.ndarray:
    with torch.no_grad():
        pred = decoder(tokens, crop_size).argmax(dim=1).cpu().numpy()
    return dice_per_class(pred, targets, len(CLASSES), IGNORE)


def evaluate_segmentation(sources: Mapping[str, PatchSource], images: Sequence[SegImage], params: SegParams,
                          device: torch.device, seed: int, batch_size: int, bf16: bool) -> dict[str, Any]:
    """``{source: {"folds": [{test, dice per class, mean_fg_dice}], "summary": {metric: {mean, std, n}}}}``."""
    crops = [crop_grid(im.image, params.crop_size) for im in images]
    targets = [crop_grid(im.target, params.crop_size) for im in images]
    out: dict[str, Any] = {}
    for name, source in sources.items():
        grids = [token_grids(source, c, batch_size, device, bf16) for c in crops]
        runs = []
        for k, (train, test) in enumerate(folds([im.name for im in images], params.split)):
            train_tokens = torch.cat([grids[i] for i in train])
            train_targets = torch.from_numpy(np.concatenate([targets[i] for i in train])).to(device)
            decoder = train_decoder(train_tokens, train_targets, params, seed + k)
            dice = fold_dice(decoder, torch.cat([grids[i] for i in test]),
                             np.concatenate([targets[i] for i in test]), params.crop_size)
            run = {f"dice_{c}": float(d) for c, d in zip(CLASSES, dice, strict=True)}
            run["mean_fg_dice"] = float(np.nanmean(dice[1:])) if not np.isnan(dice[1:]).all() else float("nan")
            runs.append({"test": [images[i].name for i in test], **run})
        metrics = [{k: v for k, v in r.items() if k != "test"} for r in runs]
        out[name] = {"folds": runs, "summary": summarise(metrics)}
    return out
