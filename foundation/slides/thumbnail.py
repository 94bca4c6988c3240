"""A slide's low-resolution image at about a target µm/px, read from one pyramid level.

The coarsest level at or below the target pixel size is read (in horizontal bands, so a slide
without a small level never needs its full level in memory) and block-averaged by an integer factor.
Integer blocks keep the geometry exact: thumbnail pixel (i, j) covers level-0 pixels
``[j * scale, (j + 1) * scale) x [i * scale, (i + 1) * scale)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from foundation.slides.readers import SlideReader
from foundation.slides.tiff_tiles import FILL

_REL_EPS = 1e-6  # float slack when comparing pixel sizes that are equal on paper


@dataclass(frozen=True)
class Thumbnail:
    """An RGB thumbnail and where it came from."""

    image: np.ndarray  # HxWx3 uint8
    level: int  # pyramid level read
    factor: int  # level pixels per thumbnail pixel (per axis)
    scale: float  # level-0 pixels per thumbnail pixel (per axis)
    mpp: float  # µm per thumbnail pixel


def thumbnail_plan(reader: SlideReader, target_mpp: float, max_side: int) -> tuple[int, int]:
    """(level, factor) for a thumbnail of about ``target_mpp`` whose longer side is at most ``max_side``."""
    w0, h0 = reader.level_dimensions[0]
    target = max(target_mpp, reader.mpp * max(w0, h0) / max_side)
    fine_enough = [lvl for lvl in range(reader.level_count) if reader.level_mpp(lvl) <= target * (1 + _REL_EPS)]
    level = max(fine_enough, key=reader.level_mpp) if fine_enough else 0
    w, h = reader.level_dimensions[level]
    factor = max(1, round(target / reader.level_mpp(level)),
                 math.ceil(w / max_side), math.ceil(h / max_side))
    return level, factor


def _block_mean(band: np.ndarray, factor: int) -> np.ndarray:
    h, w = band.shape[:2]
    ph, pw = -h % factor, -w % factor
    if ph or pw:
        band = np.pad(band, ((0, ph), (0, pw), (0, 0)), constant_values=FILL)
    h, w = band.shape[:2]
    sums = band.reshape(h // factor, factor, w // factor, factor, 3).sum(axis=(1, 3), dtype=np.uint32)
    return ((sums + factor * factor // 2) // (factor * factor)).astype(np.uint8)


def read_thumbnail(reader: SlideReader, target_mpp: float, max_side: int, max_read_pixels: int) -> Thumbnail:
    """Read and block-average the thumbnail level, ``max_read_pixels`` level pixels at a time."""
    level, factor = thumbnail_plan(reader, target_mpp, max_side)
    w, h = reader.level_dimensions[level]
    rows_per_band = max(factor, (max_read_pixels // max(w, 1)) // factor * factor)
    bands = []
    for y in range(0, h, rows_per_band):
        band = reader.read_rect(level, 0, y, w, min(rows_per_band, h - y))
        bands.append(band if factor == 1 else _block_mean(band, factor))
    image = np.concatenate(bands, axis=0)
    scale = factor * reader.level_downsamples[level]
    return Thumbnail(image=image, level=level, factor=factor, scale=scale, mpp=reader.mpp * scale)
