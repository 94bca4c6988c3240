"""Pictures for TensorBoard: augmented crops labelled with their stain, and the objective's own pictures
(teacher CLS attention maps, MAE input / masked / reconstruction) on a fixed set of real tiles.

The fixed tiles are the first ``train.image_count`` samples of the first batch this run trained on; rank 0
keeps them in ``<output_dir>/picture_batch.pt`` so a resumed run draws the same tiles. Every rank calls
:meth:`PictureMaker.__call__` (at ZeRO-3 the forward gathers weights collectively); rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from foundation.train.checkpoint import atomic_save
from foundation.train.logging import RunLogger
from stain.vocabulary import StainVocabulary

PICTURE_BATCH_FILE = "picture_batch.pt"
GRID_PADDING = 2  # pixels between tiles
LABEL_COLOUR = (255, 255, 0)
LABEL_SHADOW = (0, 0, 0)
LABEL_OFFSET = 3  # pixels from the tile corner


def unnormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``[N, 3, H, W]`` normalised crops back to RGB in [0, 1]."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() * s + m).clamp(0, 1)


def labelled_grid(images: torch.Tensor, labels: Sequence[str | None], ncol: int) -> torch.Tensor:
    """A ``[3, H, W]`` grid of ``[N, 3, h, w]`` images in [0, 1], each non-empty label drawn on its tile."""
    grid = make_grid(images.detach().float().cpu(), nrow=ncol, padding=GRID_PADDING)
    if not any(labels):
        return grid
    canvas = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    h, w = images.shape[-2:]
    for i, label in enumerate(labels):
        if not label:
            continue
        x = (i % ncol) * (w + GRID_PADDING) + GRID_PADDING + LABEL_OFFSET
        y = (i // ncol) * (h + GRID_PADDING) + GRID_PADDING + LABEL_OFFSET
        draw.text((x + 1, y + 1), label, fill=LABEL_SHADOW)
        draw.text((x, y), label, fill=LABEL_COLOUR)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255


def stain_labels(batch: Mapping[str, torch.Tensor], vocab: StainVocabulary) -> list[str]:
    """``"H&E"`` or ``"IHC Ki67"`` per sample."""
    out = []
    for stain, marker in zip(batch["stain_ids"].tolist(), batch["marker_ids"].tolist(), strict=True):
        name = vocab.stain_name(int(stain))
        out.append(f"{name} {vocab.marker_name(int(marker))}" if marker else name)
    return out


def crop_grids(batch: Mapping[str, torch.Tensor], vocab: StainVocabulary, mean: Sequence[float],
               std: Sequence[float]) -> dict[str, torch.Tensor]:
    """One row per sample: its global crops (``crops/global``) and its local crops (``crops/local``)."""
    labels = stain_labels(batch, vocab)
    out = {}
    for key in ("global_crops", "local_crops"):
        crops = batch.get(key)
        if crops is None or crops.shape[0] == 0:
            continue
        n_views, n = crops.shape[:2]
        rows = unnormalize(crops.transpose(0, 1).flatten(0, 1), mean, std)  # sample-major: [B*V, 3, h, w]
        tile_labels = [labels[i // n_views] if i % n_views == 0 else None for i in range(n * n_views)]
        out[f"crops/{key.split('_')[0]}"] = labelled_grid(rows, tile_labels, ncol=n_views)
    return out


def objective_grids(pictures: Mapping[str, torch.Tensor], images: torch.Tensor, mean: Sequence[float],
                    std: Sequence[float]) -> dict[str, torch.Tensor]:
    """Grids of the objective's pictures: attention heads next to their tile, MAE input/masked/reconstruction."""
    out = {}
    rgb = unnormalize(images, mean, std)
    if "attention" in pictures:
        maps = pictures["attention"].float()  # [B, heads, h, w] in [0, 1]
        heads = maps.shape[1]
        up = F.interpolate(maps, size=rgb.shape[-2:], mode="nearest").unsqueeze(2).expand(-1, -1, 3, -1, -1)
        rows = torch.cat([rgb.unsqueeze(1).cpu(), up.cpu()], dim=1).flatten(0, 1)  # [B*(1+heads), 3, H, W]
        out["pictures/teacher_attention"] = labelled_grid(rows, [None] * len(rows), ncol=1 + heads)
    mae = [k for k in ("mae_input", "mae_masked", "mae_reconstruction") if k in pictures]
    if mae:
        views = torch.stack([unnormalize(pictures[k], mean, std).cpu() for k in mae], dim=1)  # [B, V, 3, H, W]
        out["pictures/mae"] = labelled_grid(views.flatten(0, 1), [None] * views.shape[0] * views.shape[1],
                                            ncol=len(mae))
    return out


def _head(batch: Mapping[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """The first ``count`` samples of a batch (crop tensors are crop-major: slice dim 1)."""
    out = {}
    for key, value in batch.items():
        out[key] = value[:, :count] if key in ("global_crops", "local_crops", "masks") else value[:count]
    return {k: v.detach().clone() for k, v in out.items()}


class CapturingIterator:
    """Passes batches through and keeps a copy of the first ``count`` samples of the first one."""

    def __init__(self, data: Iterator[Mapping[str, torch.Tensor]], count: int) -> None:
        self.data = data
        self.count = count
        self.captured: dict[str, torch.Tensor] | None = None

    def __iter__(self) -> CapturingIterator:
        return self

    def __next__(self) -> Mapping[str, torch.Tensor]:
        batch = next(self.data)
        if self.captured is None:
            self.captured = _head(batch, self.count)
        return batch


class PictureMaker:
    """Draws the picture grids at a step (a collective at ZeRO-3: every rank calls it)."""

    def __init__(self, engine: Any, teacher_module: torch.nn.Module | None, capture: CapturingIterator,
                 logger: RunLogger, vocab: StainVocabulary, mean: Sequence[float], std: Sequence[float],
                 run_dir: Path, rank: int, device: torch.device, compute_dtype: torch.dtype | None,
                 gather: Sequence[torch.nn.Parameter] = ()) -> None:
        self.engine = engine
        self.teacher_module = teacher_module
        self.capture = capture
        self.logger = logger
        self.vocab = vocab
        self.mean, self.std = list(mean), list(std)
        self.path = run_dir / PICTURE_BATCH_FILE
        self.rank = rank
        self.device = device
        self.compute_dtype = compute_dtype
        self.gather = list(gather)  # ZeRO-3: parameters no module hook gathers outside the engine's forward
        self._batch: dict[str, torch.Tensor] | None = None

    def _fixed_batch(self) -> dict[str, torch.Tensor]:
        if self._batch is None:
            if self.capture.captured is None:
                raise RuntimeError("pictures asked for before the first training batch")
            batch = self.capture.captured
            if self.rank == 0:
                if self.path.is_file():
                    batch = torch.load(self.path, map_location="cpu", weights_only=True)
                else:
                    atomic_save({k: v.cpu() for k, v in batch.items()}, self.path)
            self._batch = {k: v.to(self.device) for k, v in batch.items()}
        return self._batch

    def __call__(self, iteration: int) -> None:
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        batch = self._fixed_batch()
        module = self.engine.module
        was_training = module.training
        self.engine.eval()
        try:
            dtype = self.compute_dtype
            with torch.no_grad(), GatheredParameters(self.gather, modifier_rank=None, enabled=bool(self.gather)), \
                    torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                pictures = module.pictures(batch, self.teacher_module)
        finally:
            self.engine.train(was_training)
        if self.rank != 0:
            return
        images = crop_grids(batch, self.vocab, self.mean, self.std)
        images.update(objective_grids(pictures, batch["global_crops"][0], self.mean, self.std))
        self.logger.images(iteration, images)
