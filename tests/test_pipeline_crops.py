"""Crop geometry: windows, flips and quarter turns as DALI applies them, magnification plans, raw-tile pieces."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def, types
from omegaconf import OmegaConf
from PIL import Image

from foundation.config import load_config
from foundation.data.crops import (
    CropConfig,
    Region,
    crop_uniform_count,
    crop_windows,
    crops_from_draws,
    draw_crops,
    plan_region,
)
from foundation.data.reading import SlideHandles, SlideInfo, split_span
from foundation.slides.readers import open_slide


def crop_cfg(**kw) -> CropConfig:
    base = OmegaConf.to_container(load_config().data.crops)
    base.update(kw)
    return CropConfig.from_config(base)


def test_crop_windows_follow_scale_and_ratio():
    rng = np.random.default_rng(0)
    scales = np.array([[0.32, 1.0]] * 200 + [[0.05, 0.32]] * 200)
    windows = crop_windows(rng, 224, 224, scales, (3 / 4, 4 / 3), 10)
    y0, x0, h, w = windows.T
    assert np.all((y0 >= 0) & (x0 >= 0) & (y0 + h <= 224) & (x0 + w <= 224) & (h > 0) & (w > 0))
    area = h * w / 224**2
    # rounding the sides to pixels moves the area share a little outside the drawn range
    assert np.all(area[:200] > 0.30) and np.all(area[200:] < 0.34) and np.all(area[200:] > 0.04)
    assert np.all(w / h > 0.74) and np.all(w / h < 1.36)
    assert np.array_equal(windows, crop_windows(np.random.default_rng(0), 224, 224, scales, (3 / 4, 4 / 3), 10))


def test_impossible_windows_fall_back_to_the_centre():
    # a 20x200 region cannot hold a near-square window of a large share: torchvision's centred fallback
    windows = crop_windows(np.random.default_rng(1), 20, 200, np.array([[0.9, 1.0]]), (0.9, 1.1), 3)
    assert windows.tolist() == [[0, 89, 20, 22]]  # width = round(20 * 1.1), centred


def run_geometry(image: np.ndarray, start: np.ndarray, end: np.ndarray, angle: float, size: int) -> np.ndarray:
    """Resize + NN rotate exactly as the pipeline does, on one image."""

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        img = fn.external_source(lambda: [image], batch=True, layout="HWC")
        s = fn.external_source(lambda: [start], batch=True)
        e = fn.external_source(lambda: [end], batch=True)
        a = fn.external_source(lambda: [np.float32(angle)], batch=True)
        x = fn.resize(img, roi_start=s, roi_end=e, size=[size, size], interp_type=types.INTERP_LINEAR,
                      antialias=True)
        return fn.rotate(x, angle=a, interp_type=types.INTERP_NN, keep_size=True)

    p = pipe()
    p.build()
    return np.asarray(p.run()[0][0])


@pytest.fixture(scope="module")
def tissue(data_dir: Path) -> np.ndarray:
    path = next((data_dir / "tiles" / "nct_crc_he").rglob("*.tif"))
    return np.asarray(Image.open(path).convert("RGB"))[:128, :160].copy()


def test_flips_and_quarter_turns_are_exact_pixel_permutations(tissue: np.ndarray):
    """A window read at its own size comes back bit for bit: mirrored by a reversed window, turned by rotate."""
    y0, x0, s = 10, 20, 96
    window = tissue[y0:y0 + s, x0:x0 + s]
    start, end = np.array([y0, x0], np.float32), np.array([y0 + s, x0 + s], np.float32)
    assert np.array_equal(run_geometry(tissue, start, end, 0, s), window)
    assert np.array_equal(run_geometry(tissue, np.array([y0, x0 + s], np.float32),
                                       np.array([y0 + s, x0], np.float32), 0, s), window[:, ::-1])
    assert np.array_equal(run_geometry(tissue, np.array([y0 + s, x0], np.float32),
                                       np.array([y0, x0 + s], np.float32), 0, s), window[::-1])
    turned = {k: run_geometry(tissue, start, end, 90 * k, s) for k in range(4)}
    rotations = [np.rot90(window, k) for k in range(4)]
    for k in range(4):
        assert any(np.array_equal(turned[k], r) for r in rotations), f"{90 * k} degrees is not a pixel permutation"
    assert len({turned[k].tobytes() for k in range(4)}) == 4  # four distinct orientations


def test_drawn_crops_cover_all_eight_orientations():
    cfg = crop_cfg()
    seen = set()
    for seed in range(40):
        p = draw_crops(np.random.default_rng(seed), 224, 224, cfg)
        flips = p.roi_start > p.roi_end  # (vertical, horizontal) per crop
        for c in range(cfg.num_crops):
            seen.add((bool(flips[c, 0]), bool(flips[c, 1]), float(p.angle[c])))
    assert len(seen) == 16  # 2 x 2 flips x 4 turns: every one of the 8 orientations, each reachable two ways
    fixed = draw_crops(np.random.default_rng(0), 224, 224, crop_cfg(hflip_p=0.0, vflip_p=0.0, rot90=False))
    assert np.all(fixed.roi_start < fixed.roi_end) and np.all(fixed.angle == 0)


@pytest.mark.parametrize("kw", [{}, {"rot90": False}, {"ratio": [3.0, 4.0], "global_scale": [0.9, 1.0]}])
def test_batched_crops_equal_one_region_at_a_time(kw: dict):
    """The source turns a whole batch's draws into crops at once: bit for bit what draw_crops gives per region,
    with regions of different sides, torchvision's fallback windows (no valid try) included."""
    cfg = crop_cfg(**kw)
    sides = np.array([7, 30, 224, 448, 1000, 96])
    rngs = [np.random.default_rng(seed) for seed in range(len(sides))]
    single = [draw_crops(np.random.default_rng(seed), int(s), int(s), cfg) for seed, s in enumerate(sides)]
    u = np.stack([rng.random(crop_uniform_count(cfg)) for rng in rngs])
    turns = (np.stack([rng.integers(0, 4, size=cfg.num_crops) for rng in rngs]) if cfg.rot90
             else np.zeros((len(sides), cfg.num_crops), np.int64))
    batch = crops_from_draws(u, turns, sides, sides, cfg)
    for b, one in enumerate(single):
        for field in ("roi_start", "roi_end", "angle"):
            got, want = getattr(batch, field)[b], getattr(one, field)
            assert got.dtype == want.dtype and np.array_equal(got, want), (b, field)
    if "ratio" in kw:  # every window of the 7 px region is a fallback one: centred, nearest allowed ratio
        windows = crop_windows(np.random.default_rng(0), 7, 7, np.array(cfg.crop_scales()), cfg.ratio, cfg.max_tries)
        assert np.array_equal(windows[0], [2, 0, 2, 7])


def test_continuous_magnification_reads_the_right_level(wsi: dict[str, Path]):
    reader = open_slide(wsi["ome_tiff"])  # levels at about 0.5, 1, 2 and 4 µm/px
    slide = SimpleNamespace(mpp=reader.mpp, level_dimensions=reader.level_dimensions,
                            level_downsamples=reader.level_downsamples)
    entry = {"level": 0, "x": 1000, "y": 1200, "size": 224, "mpp": reader.mpp}  # a 224 px tile at level 0
    cfg = crop_cfg(magnification="continuous", mpp_range=[0.3, 3.0])
    levels = set()
    for seed in range(200):
        rng = np.random.default_rng(seed)
        target = float(np.exp(np.log(0.3) + (np.log(3.0) - np.log(0.3)) * np.random.default_rng(seed).random()))
        region = plan_region(entry, slide, cfg, rng)
        level_mpp = reader.mpp * reader.level_downsamples[region.level]
        assert level_mpp <= target * (1 + 1e-6) or region.level == 0  # never read coarser than the target
        finer = [lvl for lvl in range(reader.level_count) if reader.mpp * reader.level_downsamples[lvl] <= target]
        assert region.level == (max(finer) if finer else 0)  # ... and never finer than needed
        # the field of view is the entry's, at the new pixel size
        assert region.side == pytest.approx(224 * target / level_mpp, abs=1)
        ds = reader.level_downsamples[region.level]
        w, h = reader.level_dimensions[region.level]
        assert region.x >= 0 and region.x + region.side * ds <= w * ds + 1 and region.y >= 0
        assert region.y + region.side * ds <= h * ds + 1
        levels.add(region.level)
    assert levels == {0, 1, 2}
    reader.close()
    assert plan_region(entry, slide, crop_cfg(), np.random.default_rng(0)).side == 224  # index mode: as indexed


@pytest.mark.parametrize(("start", "length", "tile", "slots"), [(250, 224, 240, 2), (240, 224, 240, 2),
                                                                (5, 449, 240, 3), (0, 240, 240, 2), (479, 3, 240, 3)])
def test_split_span_pieces_tile_the_span(start, length, tile, slots):
    pieces = split_span(start, length, tile, slots)
    assert pieces is not None and len(pieces) == slots
    pos = start
    for index, offset, size in pieces:
        assert size >= 1 and offset >= 0 and offset + size <= tile
        assert index * tile + offset == pos  # contiguous, in order
        pos += size
    assert pos == start + length


def test_split_span_refuses_what_does_not_fit():
    assert split_span(230, 500, 240, 2) is None  # spans 3 tiles
    assert split_span(0, 1, 240, 2) is None      # shorter than the number of pieces
    assert math.prod(p[2] for p in split_span(0, 4, 240, 2)) == 4


def test_bad_crop_settings_are_named():
    with pytest.raises(ValueError, match="global_scale"):
        crop_cfg(global_scale=[0.5, 0.2])
    with pytest.raises(ValueError, match="magnification"):
        crop_cfg(magnification="zoom")
    with pytest.raises(ValueError, match="hflip_p"):
        crop_cfg(hflip_p=1.5)


def test_slide_handles_stay_bounded_and_read_the_same_pixels(wsi: dict[str, Path]):
    paths = [wsi["svs_jpeg"], wsi["ome_tiff"], wsi["ihc_tiff"]]
    slides = []
    for i, path in enumerate(paths):
        with open_slide(path, mpp=0.25) as r:
            slides.append(SlideInfo(f"s{i}", str(path), r.mpp, tuple(r.level_dimensions),
                                    tuple(r.level_downsamples), 1, 0))
    region = Region(level=0, x=300, y=200, side=64)
    expected = []
    for path in paths:
        with open_slide(path, mpp=0.25) as r:
            expected.append(r.read_region((region.x, region.y), 0, (region.side, region.side)))
    handles = SlideHandles(slides, max_open=2)
    for _ in range(2):
        for s in range(len(paths)):
            assert np.array_equal(handles.read_region(s, region), expected[s])
            assert handles.open_count <= 2
    handles.close()
    assert handles.open_count == 0
