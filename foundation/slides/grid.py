"""The tile grid of one slide at one target pixel size, scored by tissue fraction from a thumbnail mask.

A tile of ``tile_size`` pixels at ``target_mpp`` is read as a ``size``-pixel square at the pyramid
level chosen by :func:`choose_level` and resized to ``tile_size``. Its level-0 footprint is
``size * downsample``; the grid steps by ``stride_fraction`` footprints and keeps only whole tiles.

The tissue fraction of a tile is the exact area share of tissue under its footprint, with the mask
taken as piecewise constant over its pixels: the summed-area table of a piecewise-constant image is
bilinear inside each pixel, so bilinear interpolation of the table at fractional corners is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_EPS = 1e-9  # float slack: a tile that ends exactly on the slide edge still fits


@dataclass(frozen=True)
class Grid:
    """Top-left level-0 corners of a slide's tiles at one target pixel size (all of them, before scoring)."""

    level: int
    size: int  # square side read at ``level``, in level pixels
    footprint: float  # square side in level-0 pixels
    xs: np.ndarray  # int64 column positions
    ys: np.ndarray  # int64 row positions


def choose_level(level_mpps: Sequence[float], target_mpp: float, tolerance: float) -> int | None:
    """The coarsest level whose µm/px is at most ``target_mpp * (1 + tolerance)``; None if even level 0 is coarser.

    Reading finer and downscaling is exact enough; upscaling would invent detail, so it is never chosen.
    """
    limit = target_mpp * (1.0 + tolerance)
    fine_enough = [i for i, mpp in enumerate(level_mpps) if mpp <= limit]
    return max(fine_enough, key=lambda i: level_mpps[i]) if fine_enough else None


def _positions(extent: int, footprint: float, stride: float) -> np.ndarray:
    if footprint > extent:
        return np.zeros(0, dtype=np.int64)
    count = math.floor((extent - footprint) / stride + _EPS) + 1
    return np.floor(np.arange(count) * stride).astype(np.int64)


def make_grid(level0_size: tuple[int, int], mpp: float, level_downsamples: Sequence[float], target_mpp: float,
              tile_size: int, stride_fraction: float, tolerance: float) -> Grid | None:
    """The full grid of whole tiles at ``target_mpp``, or None when the slide is coarser than the target."""
    level = choose_level([mpp * ds for ds in level_downsamples], target_mpp, tolerance)
    if level is None:
        return None
    ds = level_downsamples[level]
    size = max(1, round(tile_size * target_mpp / (mpp * ds)))
    footprint = size * ds
    stride = footprint * stride_fraction
    w0, h0 = level0_size
    return Grid(level=level, size=size, footprint=footprint,
                xs=_positions(w0, footprint, stride), ys=_positions(h0, footprint, stride))


def summed_area(mask: np.ndarray) -> np.ndarray:
    """(H+1)x(W+1) float64 table: ``S[i, j]`` = sum of ``mask[:i, :j]``."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
    table[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    return table


def _interp(table: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of ``table`` at column coords ``u`` (1-D) x row coords ``v`` (1-D) -> len(v) x len(u)."""
    h, w = table.shape[0] - 1, table.shape[1] - 1
    u = np.clip(u, 0, w)
    v = np.clip(v, 0, h)
    j = np.minimum(np.floor(u).astype(np.int64), w - 1)
    i = np.minimum(np.floor(v).astype(np.int64), h - 1)
    a = (u - j)[None, :]
    b = (v - i)[:, None]
    s00 = table[i[:, None], j[None, :]]
    s01 = table[i[:, None], j[None, :] + 1]
    s10 = table[i[:, None] + 1, j[None, :]]
    s11 = table[i[:, None] + 1, j[None, :] + 1]
    return s00 * (1 - a) * (1 - b) + s01 * a * (1 - b) + s10 * (1 - a) * b + s11 * a * b


def tissue_fractions(table: np.ndarray, scale: float, xs: np.ndarray, ys: np.ndarray, footprint: float) -> np.ndarray:
    """len(ys) x len(xs) float64 tissue share of each square tile, from the mask's summed-area table.

    ``scale`` is level-0 pixels per mask pixel; outside the mask counts as no tissue.
    """
    x0, x1 = xs / scale, (xs + footprint) / scale
    y0, y1 = ys / scale, (ys + footprint) / scale
    area = (footprint / scale) ** 2
    total = _interp(table, x1, y1) - _interp(table, x0, y1) - _interp(table, x1, y0) + _interp(table, x0, y0)
    return np.clip(total / area, 0.0, 1.0)
