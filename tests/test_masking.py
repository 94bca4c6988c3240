"""iBOT block masks: ratios, share of masked crops, block geometry, determinism."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage

from foundation.config import load_config, to_dict
from foundation.data.masking import MaskingGenerator, ibot_masks, mask_targets

GRID = (14, 14)  # ViT-*/16 at 224 px
N = GRID[0] * GRID[1]


@pytest.fixture(scope="module")
def cfg() -> dict[str, Any]:
    return to_dict(load_config().data.masking)


def test_shape_dtype_and_share_of_masked_crops(cfg: dict) -> None:
    masks = ibot_masks(2, 64, GRID, np.random.default_rng(0), cfg)
    assert masks.shape == (2, 64, N) and masks.dtype == torch.bool
    counts = masks.reshape(128, N).sum(1)
    assert int((counts > 0).sum()) == int(128 * cfg["mask_sample_probability"])


def test_targets_spread_over_the_ratio_range(cfg: dict) -> None:
    images = 128
    targets = mask_targets(images, N, np.random.default_rng(1), cfg)
    masked = int(images * cfg["mask_sample_probability"])
    assert (targets > 0).sum() == masked and (targets == 0).sum() == images - masked
    lo, hi = cfg["ratio_min_max"]
    edges = np.linspace(lo, hi, masked + 1)
    ordered = np.sort(targets[targets > 0])
    # the k-th smallest target comes from the k-th bin of the linspace
    assert np.all(ordered >= np.floor(N * edges[:-1])) and np.all(ordered <= np.floor(N * edges[1:]))
    # shuffled: masked crops are not all first
    assert not np.all(targets[:masked] > 0)


def test_mask_counts_follow_their_targets(cfg: dict) -> None:
    ratios, fractions = [], []
    for seed in range(40):
        targets = mask_targets(64, N, np.random.default_rng(seed), cfg)
        masks = ibot_masks(2, 32, GRID, np.random.default_rng(seed), cfg).reshape(64, N).numpy()
        counts = masks.sum(1)
        assert np.all(counts <= targets)  # never more than asked
        assert np.all(counts[targets == 0] == 0)
        assert np.all(counts[targets > 0] > 0)
        ratios += list(counts[targets > 0] / targets[targets > 0])
        fractions += list(counts[targets > 0] / N)
    # blocks nearly always reach the target: measured mean 0.998, min 0.96
    assert np.mean(ratios) > 0.98 and np.min(ratios) > 0.85
    lo, hi = cfg["ratio_min_max"]
    assert min(fractions) >= 0.85 * lo and max(fractions) <= hi
    assert abs(np.mean(fractions) - (lo + hi) / 2) < 0.02


class FixedDraws:
    """A stand-in generator returning chosen quantiles, to check the block geometry exactly."""

    def __init__(self, u: float, aspect_q: float) -> None:
        self.u, self.aspect_q = u, aspect_q

    def random(self) -> float:
        return self.u

    def uniform(self, low: float, high: float) -> float:
        return low + self.aspect_q * (high - low)

    def integers(self, low: int, high: int) -> int:
        return high - 1


@pytest.mark.parametrize("u, aspect_q", [(0.3, 1.0), (0.3, 0.0), (0.0, 0.5), (0.5, 0.25)])
def test_block_geometry_is_area_and_log_aspect(cfg: dict, u: float, aspect_q: float) -> None:
    gen = MaskingGenerator(GRID, cfg)
    cap = 0.5 * N
    lo, hi = cfg["aspect_ratio"]
    area = cfg["min_num_patches"] + u * (cap - cfg["min_num_patches"])
    aspect = math.exp(math.log(lo) + aspect_q * (math.log(hi) - math.log(lo)))
    block = gen.propose_block(FixedDraws(u, aspect_q), cap)
    assert block is not None
    assert (block.height, block.width) == (round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect)))
    assert block.top + block.height == GRID[0] and block.left + block.width == GRID[1]  # last start position


def test_blocks_never_span_a_whole_side(cfg: dict) -> None:
    gen = MaskingGenerator((4, 40), cfg)
    # area 80 at aspect 3.33 needs 16 rows on a 4-row grid: rejected
    assert gen.propose_block(FixedDraws(1.0, 1.0), 80.0) is None
    # area 98 at aspect 3.33 needs 18 rows on the 14x14 grid: rejected too
    assert MaskingGenerator(GRID, cfg).propose_block(FixedDraws(1.0, 1.0), 0.5 * N) is None
    rng = np.random.default_rng(3)
    for _ in range(2000):
        block = gen.propose_block(rng, 80.0)
        if block is not None:
            assert 0 < block.height < 4 and 0 < block.width < 40
            assert block.top + block.height <= 4 and block.left + block.width <= 40


def test_every_mask_is_a_union_of_capped_blocks(cfg: dict) -> None:
    gen = MaskingGenerator(GRID, cfg)
    rng = np.random.default_rng(4)
    cap = cfg["max_patches_fraction"] * N
    for _ in range(300):
        mask = np.zeros(GRID, dtype=bool)
        added = gen.add_block(mask, rng, cap)
        # one block on an empty grid: a single filled rectangle of at most cap patches
        rows, cols = np.nonzero(mask)
        assert added == mask.sum() <= cap
        assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    # a full-target mask grows from blocks: its connected pieces are few and large
    mask = gen(int(0.5 * N), np.random.default_rng(5))
    _, pieces = ndimage.label(mask)
    assert pieces <= mask.sum() / cfg["min_num_patches"]


def test_same_seed_same_masks(cfg: dict) -> None:
    a = ibot_masks(2, 16, GRID, np.random.default_rng(7), cfg)
    b = ibot_masks(2, 16, GRID, np.random.default_rng(7), cfg)
    c = ibot_masks(2, 16, GRID, np.random.default_rng(8), cfg)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_probability_extremes_and_non_square_grids(cfg: dict) -> None:
    none = copy.deepcopy(cfg)
    none["mask_sample_probability"] = 0.0
    assert not ibot_masks(2, 8, GRID, np.random.default_rng(0), none).any()
    every = copy.deepcopy(cfg)
    every["mask_sample_probability"] = 1.0
    masks = ibot_masks(1, 16, (6, 10), np.random.default_rng(0), every)
    assert masks.shape == (1, 16, 60) and bool((masks.sum(-1) > 0).all())


@pytest.mark.parametrize("key, value, pattern", [
    ("mask_sample_probability", 1.5, "mask_sample_probability=1.5"),
    ("ratio_min_max", [0.6, 0.2], "ratio_min_max"),
    ("aspect_ratio", [0.0, 3.0], "aspect_ratio"),
    ("min_num_patches", 0, "min_num_patches=0"),
    ("max_patches_fraction", 0.0, "max_patches_fraction=0.0"),
    ("max_attempts", 0, "max_attempts=0"),
])
def test_bad_configuration_is_named(cfg: dict, key: str, value: Any, pattern: str) -> None:
    bad = copy.deepcopy(cfg)
    bad[key] = value
    with pytest.raises(ValueError, match=pattern):
        ibot_masks(2, 4, GRID, np.random.default_rng(0), bad)
