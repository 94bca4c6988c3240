"""Quality-control picture of one indexed slide: thumbnail, tissue mask tinted, sampled tile boxes drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_TINT = np.array([0, 200, 60], dtype=np.float32)  # tissue shows greenish
_TINT_ALPHA = 0.35
_PALETTE = ((230, 25, 75), (0, 90, 230), (245, 130, 48), (145, 30, 180), (70, 240, 240))  # one colour per µm/px


def sample_evenly(count: int, limit: int) -> np.ndarray:
    """At most ``limit`` indices spread evenly over ``range(count)`` (deterministic)."""
    if count <= limit:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(np.int64))


def render_qc(image: np.ndarray, mask: np.ndarray, scale: float, boxes: Sequence[tuple[np.ndarray, np.ndarray, float]],
              side: int) -> Image.Image:
    """The thumbnail (``scale`` level-0 px per pixel) with the mask tinted and, per target µm/px,
    ``(xs, ys, footprint)`` level-0 boxes outlined; enlarged (nearest) so its longer side is about ``side``."""
    tinted = image.astype(np.float32)
    tinted[mask] = tinted[mask] * (1 - _TINT_ALPHA) + _TINT * _TINT_ALPHA
    picture = Image.fromarray(tinted.round().astype(np.uint8))
    zoom = max(1, side // max(image.shape[:2]))
    if zoom > 1:
        picture = picture.resize((image.shape[1] * zoom, image.shape[0] * zoom), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    px = zoom / scale  # picture pixels per level-0 pixel
    for k, (xs, ys, footprint) in enumerate(boxes):
        colour = _PALETTE[k % len(_PALETTE)]
        for x, y in zip(xs, ys, strict=True):
            draw.rectangle([x * px, y * px, (x + footprint) * px - 1, (y + footprint) * px - 1], outline=colour)
    return picture


def write_qc(path: Path, picture: Image.Image) -> None:
    """Write atomically (a half-written PNG would be taken for a finished one on the next run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    picture.save(tmp, format="PNG")
    tmp.replace(path)
