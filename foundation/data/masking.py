"""iBOT block-wise masks for the global crops (BEiT's ``MaskingGenerator`` with DINOv2's collate policy).

Per batch of ``G x B`` global crops: ``int(G * B * mask_sample_probability)`` crops are masked; their target
counts ``int(N * r)`` take ``r ~ U(lo_k, hi_k)`` over consecutive bins of ``linspace(min, max, masked + 1)``, so
the ratios spread over the whole range; the other crops get an empty mask; the list is shuffled. Each mask is
grown from rectangular blocks (area ``U(min_num_patches, cap)``, aspect ratio log-uniform over
``aspect_ratio``), never more patches than its target. Everything is drawn from the caller's
``numpy.random.Generator``, so masks are deterministic given its state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Block:
    """A rectangle of patches: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int


class MaskingGenerator:
    """Block-wise masks over an ``(rows, cols)`` patch grid, configured by the ``data.masking`` section."""

    def __init__(self, grid: tuple[int, int], cfg: Mapping[str, Any]) -> None:
        self.rows, self.cols = (int(v) for v in grid)
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"patch grid must be positive, got {grid}")
        self.num_patches = self.rows * self.cols
        self.min_num_patches = int(cfg["min_num_patches"])
        if self.min_num_patches < 1:
            raise ValueError(f"masking.min_num_patches={self.min_num_patches} must be >= 1")
        fraction = float(cfg["max_patches_fraction"])
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"masking.max_patches_fraction={fraction} must lie in (0, 1]")
        self.max_num_patches = fraction * self.num_patches
        lo, hi = (float(v) for v in cfg["aspect_ratio"])
        if not 0.0 < lo <= hi:
            raise ValueError(f"masking.aspect_ratio={[lo, hi]} must be 0 < lo <= hi")
        self.log_aspect = (math.log(lo), math.log(hi))
        self.max_attempts = int(cfg["max_attempts"])
        if self.max_attempts < 1:
            raise ValueError(f"masking.max_attempts={self.max_attempts} must be >= 1")

    def propose_block(self, rng: np.random.Generator, cap: float) -> Block | None:
        """A random block, area uniform between ``min_num_patches`` and ``cap``; ``None`` if it does not fit."""
        block = self._propose(rng, cap)
        return Block(*block) if block is not None else None

    def _propose(self, rng: np.random.Generator, cap: float) -> tuple[int, int, int, int] | None:
        """:meth:`propose_block` as a plain ``(top, left, height, width)`` (the hot loop of a batch's masks)."""
        # between the two bounds even when cap < min_num_patches (then small blocks finish the mask), as in BEiT
        area = self.min_num_patches + (cap - self.min_num_patches) * rng.random()
        aspect = math.exp(rng.uniform(*self.log_aspect))
        height = round(math.sqrt(area * aspect))
        width = round(math.sqrt(area / aspect))
        # strictly smaller than the grid, as in BEiT: a block never spans a whole side
        if not (0 < height < self.rows and 0 < width < self.cols):
            return None
        top = int(rng.integers(0, self.rows - height + 1))
        left = int(rng.integers(0, self.cols - width + 1))
        return top, left, height, width

    def add_block(self, mask: np.ndarray, rng: np.random.Generator, cap: float) -> int:
        """Try up to ``max_attempts`` blocks; mark the first adding 1..cap new patches. Returns patches added."""
        for _ in range(self.max_attempts):
            block = self._propose(rng, cap)
            if block is None:
                continue
            top, left, height, width = block
            window = mask[top:top + height, left:left + width]
            new = height * width - np.count_nonzero(window)
            if 0 < new <= cap:
                window[...] = True
                return new
        return 0

    def __call__(self, target: int, rng: np.random.Generator) -> np.ndarray:
        """A ``[rows, cols]`` bool mask with at most ``target`` patches (fewer when no block fits any more)."""
        mask = np.zeros((self.rows, self.cols), dtype=bool)
        self.fill(mask, target, rng)
        return mask

    def fill(self, mask: np.ndarray, target: int, rng: np.random.Generator) -> None:
        """Grow blocks into the empty ``mask`` in place, as :meth:`__call__` does."""
        count = 0
        while count < target:
            added = self.add_block(mask, rng, min(target - count, self.max_num_patches))
            if added == 0:
                break
            count += added


def mask_targets(num_images: int, num_patches: int, rng: np.random.Generator,
                 cfg: Mapping[str, Any]) -> np.ndarray:
    """Target masked-patch count per image (``[num_images]`` int, 0 = unmasked), shuffled (DINOv2 collate)."""
    p = float(cfg["mask_sample_probability"])
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"masking.mask_sample_probability={p} must lie in [0, 1]")
    lo, hi = (float(v) for v in cfg["ratio_min_max"])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"masking.ratio_min_max={[lo, hi]} must be 0 <= min <= max <= 1")
    masked = int(num_images * p)
    edges = np.linspace(lo, hi, masked + 1)
    ratios = rng.uniform(edges[:-1], edges[1:])
    targets = np.zeros(num_images, dtype=np.int64)
    targets[:masked] = (num_patches * ratios).astype(np.int64)
    return targets[rng.permutation(num_images)]


def ibot_masks(num_global: int, batch_size: int, grid: tuple[int, int], rng: np.random.Generator,
               cfg: Mapping[str, Any]) -> torch.Tensor:
    """Bool masks ``[G, B, N]`` (crop-major, as in the batch contract) for ``G`` global crops of ``B`` samples."""
    generator = MaskingGenerator(grid, cfg)
    targets = mask_targets(num_global * batch_size, generator.num_patches, rng, cfg)
    masks = np.zeros((len(targets), generator.rows, generator.cols), dtype=bool)
    for mask, target in zip(masks, targets.tolist(), strict=True):
        generator.fill(mask, target, rng)
    return torch.from_numpy(masks.reshape(num_global, batch_size, generator.num_patches))
