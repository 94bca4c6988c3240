"""Tile grid geometry, level choice, exact tissue shares and thumbnails, against float64 references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from foundation.slides.grid import choose_level, make_grid, summed_area, tissue_fractions
from foundation.slides.readers import open_slide
from foundation.slides.thumbnail import read_thumbnail, thumbnail_plan


def _overlap_share(mask: np.ndarray, scale: float, x: float, y: float, side: float) -> float:
    """Area share of tissue under a level-0 square, summing exact pixel overlaps (the definition)."""
    h, w = mask.shape
    edges_x = np.arange(w + 1) * scale
    edges_y = np.arange(h + 1) * scale
    ox = np.clip(np.minimum(edges_x[1:], x + side) - np.maximum(edges_x[:-1], x), 0, None)
    oy = np.clip(np.minimum(edges_y[1:], y + side) - np.maximum(edges_y[:-1], y), 0, None)
    return float((oy[:, None] * ox[None, :] * mask).sum() / side**2)


@pytest.mark.parametrize("scale", [16.0, 7.3, 1.0])
def test_tissue_fractions_equal_exact_overlaps(scale: float) -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((23, 31)) < 0.4
    table = summed_area(mask)
    footprint = 3.7 * scale
    xs = np.array([0, 5, int(2.5 * scale), int(20 * scale), int(29 * scale)], dtype=np.int64)  # the last one overhangs
    ys = np.array([0, 3, int(11.2 * scale), int(19 * scale)], dtype=np.int64)
    got = tissue_fractions(table, scale, xs, ys, footprint)
    expected = np.array([[_overlap_share(mask, scale, x, y, footprint) for x in xs] for y in ys])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_choose_level_takes_the_coarsest_fine_enough_level() -> None:
    mpps = [0.25, 1.0, 4.0, 16.0]
    assert choose_level(mpps, 0.5, 0.1) == 0
    assert choose_level(mpps, 1.0, 0.1) == 1
    assert choose_level(mpps, 1.05, 0.1) == 1
    assert choose_level(mpps, 0.95, 0.1) == 1  # 1.0 is within 10 % of 0.95
    assert choose_level(mpps, 0.9, 0.1) == 0
    assert choose_level(mpps, 100.0, 0.1) == 3
    assert choose_level([28.97], 0.5, 0.1) is None  # never upsample
    assert choose_level([28.97], 32.0, 0.1) == 0


def test_grid_covers_whole_tiles_inside_the_slide() -> None:
    # 40x-like slide: 0.25 µm/px, levels 1, 4, 16; tiles of 224 px at 0.5 µm/px are read at level 0 as 448 px.
    grid = make_grid((10_000, 7_000), 0.25, [1.0, 4.0, 16.0], 0.5, 224, 1.0, 0.1)
    assert (grid.level, grid.size, grid.footprint) == (0, 448, 448.0)
    assert grid.xs.tolist() == list(range(0, 10_000 - 448 + 1, 448))
    assert grid.ys.tolist() == list(range(0, 7_000 - 448 + 1, 448))
    # At 2 µm/px the coarsest level finer than the target is level 1 (1 µm/px): 448 px read there.
    grid = make_grid((10_000, 7_000), 0.25, [1.0, 4.0, 16.0], 2.0, 224, 0.5, 0.1)
    assert (grid.level, grid.size, grid.footprint) == (1, 448, 1792.0)
    assert np.all(np.diff(grid.xs) == 896) and grid.xs[-1] + 1792 <= 10_000 < grid.xs[-1] + 896 + 1792
    assert make_grid((1152, 700), 28.97, [1.0], 0.5, 224, 1.0, 0.1) is None
    assert make_grid((100, 100), 0.5, [1.0], 0.5, 224, 1.0, 0.1).xs.size == 0  # smaller than one tile


def test_thumbnail_is_the_block_mean_of_the_chosen_level(wsi: dict[str, Path]) -> None:
    with open_slide(wsi["ome_tiff"]) as slide:
        level, factor = thumbnail_plan(slide, 8.0, 4096)
        assert (level, factor) == (3, 2)  # level 3 is ~4 µm/px: 2x2 blocks make ~8 µm/px
        thumb = read_thumbnail(slide, 8.0, 4096, 1 << 24)
        pixels = slide.read_level(level).astype(np.float64)
        banded = read_thumbnail(slide, 8.0, 4096, 277 * 4)  # bands of 4 rows
    h, w = pixels.shape[:2]
    padded = np.full((h + h % 2, w + w % 2, 3), 255.0)
    padded[:h, :w] = pixels
    expected = np.floor(padded.reshape((h + 1) // 2, 2, (w + 1) // 2, 2, 3).mean(axis=(1, 3)) + 0.5)
    assert np.array_equal(thumb.image, expected.astype(np.uint8))
    assert np.array_equal(banded.image, thumb.image)
    assert thumb.scale == pytest.approx(2 * slide.level_downsamples[3])
    assert thumb.mpp == pytest.approx(0.499 * thumb.scale)


def test_thumbnail_respects_the_side_cap(wsi: dict[str, Path]) -> None:
    with open_slide(wsi["svs_jpeg"]) as slide:
        thumb = read_thumbnail(slide, 1.0, 300, 1 << 24)
    assert max(thumb.image.shape[:2]) <= 300
    assert thumb.level == 0 and thumb.factor == 10  # ceil(2967 / 300)
