"""Per-sample geometry: which region to read (magnification) and the crop windows, flips and rotations.

Everything is drawn on the host from the sample's own Generator (:func:`foundation.data.sampler.sample_rng`), so a
sample's crops depend only on ``(seed, position)``. The pipeline applies them as:

* crop window + both flips in one ``resize`` (a window whose start lies after its end is read mirrored);
* a multiple of 90 degrees with nearest-neighbour ``rotate`` (a pure pixel permutation on square crops).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGNIFICATION_MODES = ("index", "continuous")


def _pair(cfg: Mapping[str, Any], key: str, lo_min: float = 0.0) -> tuple[float, float]:
    value = cfg[key]
    if len(value) != 2 or not lo_min <= float(value[0]) <= float(value[1]):
        raise ValueError(f"data.crops.{key}={list(value)} must be [lo, hi] with {lo_min} <= lo <= hi")
    return float(value[0]), float(value[1])


@dataclass(frozen=True)
class CropConfig:
    """The ``data.crops`` section, validated."""

    global_count: int
    global_size: int
    global_scale: tuple[float, float]
    local_count: int
    local_size: int
    local_scale: tuple[float, float]
    ratio: tuple[float, float]
    max_tries: int
    hflip_p: float
    vflip_p: float
    rot90: bool
    magnification: str
    mpp_range: tuple[float, float]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> CropConfig:
        out = cls(
            global_count=int(cfg["global_count"]), global_size=int(cfg["global_size"]),
            global_scale=_pair(cfg, "global_scale"), local_count=int(cfg["local_count"]),
            local_size=int(cfg["local_size"]), local_scale=_pair(cfg, "local_scale"),
            ratio=_pair(cfg, "ratio", lo_min=1e-6), max_tries=int(cfg["max_tries"]),
            hflip_p=float(cfg["hflip_p"]), vflip_p=float(cfg["vflip_p"]), rot90=bool(cfg["rot90"]),
            magnification=str(cfg["magnification"]), mpp_range=_pair(cfg, "mpp_range", lo_min=1e-6),
            mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]),
        )
        if out.global_count < 1 or out.local_count < 0:
            raise ValueError(f"data.crops: global_count={out.global_count} must be >= 1 and "
                             f"local_count={out.local_count} >= 0")
        for key in ("global_size", "local_size", "max_tries"):
            if getattr(out, key) < 1:
                raise ValueError(f"data.crops.{key}={getattr(out, key)} must be >= 1")
        for key in ("global_scale", "local_scale"):
            if getattr(out, key)[1] > 1.0 or getattr(out, key)[0] <= 0:
                raise ValueError(f"data.crops.{key}={list(getattr(out, key))} must lie in (0, 1]")
        for key in ("hflip_p", "vflip_p"):
            if not 0.0 <= getattr(out, key) <= 1.0:
                raise ValueError(f"data.crops.{key}={getattr(out, key)} must lie in [0, 1]")
        if out.magnification not in MAGNIFICATION_MODES:
            raise ValueError(f"data.crops.magnification={out.magnification!r}; choose one of {MAGNIFICATION_MODES}")
        if len(out.mean) != 3 or len(out.std) != 3 or min(out.std) <= 0:
            raise ValueError(f"data.crops.mean/std must be 3 values each with std > 0, got {out.mean} / {out.std}")
        return out

    @property
    def num_crops(self) -> int:
        return self.global_count + self.local_count

    def crop_sizes(self) -> list[int]:
        return [self.global_size] * self.global_count + [self.local_size] * self.local_count

    def crop_scales(self) -> list[tuple[float, float]]:
        return [self.global_scale] * self.global_count + [self.local_scale] * self.local_count


def crop_windows(rng: np.random.Generator, height: int, width: int, scales: np.ndarray,
                 ratio: tuple[float, float], max_tries: int) -> np.ndarray:
    """torchvision ``RandomResizedCrop.get_params`` for several crops at once: ``[C, 4]`` int (y0, x0, h, w).

    ``scales`` is ``[C, 2]`` (area share range per crop). A fixed ``4 * max_tries * C`` uniforms are drawn; the
    first valid try wins, else the centred window of the nearest allowed aspect ratio (torchvision's fallback).
    """
    n = scales.shape[0]
    u = rng.random((n, max_tries, 4))
    area = height * width * (scales[:, None, 0] + (scales[:, None, 1] - scales[:, None, 0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    out = np.empty((n, 4), dtype=np.int64)
    for c in range(n):
        tries = np.flatnonzero(ok[c])
        if tries.size:
            t = tries[0]
            hh, ww = int(h[c, t]), int(w[c, t])
            y0 = int(u[c, t, 2] * (height - hh + 1))
            x0 = int(u[c, t, 3] * (width - ww + 1))
        else:
            in_ratio = width / height
            if in_ratio < ratio[0]:
                ww, hh = width, round(width / ratio[0])
            elif in_ratio > ratio[1]:
                hh, ww = height, round(height * ratio[1])
            else:
                hh, ww = height, width
            y0, x0 = (height - hh) // 2, (width - ww) // 2
        out[c] = (y0, x0, hh, ww)
    return out


@dataclass(frozen=True)
class CropParams:
    """Geometry of the ``C`` crops of one sample, in the form the pipeline consumes."""

    roi_start: np.ndarray  # [C, 2] float32 (y, x) in region pixels; start > end flips that axis
    roi_end: np.ndarray    # [C, 2] float32
    angle: np.ndarray      # [C] float32 degrees, a multiple of 90


def draw_crops(rng: np.random.Generator, height: int, width: int, cfg: CropConfig) -> CropParams:
    """Windows, flips and quarter turns of every crop of a ``height x width`` region."""
    windows = crop_windows(rng, height, width, np.array(cfg.crop_scales(), dtype=np.float64), cfg.ratio,
                           cfg.max_tries)
    n = windows.shape[0]
    u = rng.random((n, 2))
    turns = rng.integers(0, 4, size=n) if cfg.rot90 else np.zeros(n, dtype=np.int64)
    y0, x0, h, w = windows.T
    start = np.stack([y0, x0], axis=1).astype(np.float32)
    end = np.stack([y0 + h, x0 + w], axis=1).astype(np.float32)
    vflip, hflip = u[:, 0] < cfg.vflip_p, u[:, 1] < cfg.hflip_p
    for axis, flip in ((0, vflip), (1, hflip)):
        start[flip, axis], end[flip, axis] = end[flip, axis].copy(), start[flip, axis].copy()
    return CropParams(roi_start=start, roi_end=end, angle=(90.0 * turns).astype(np.float32))


@dataclass(frozen=True)
class Region:
    """A square region to read: ``side`` pixels at ``level``, top-left ``(x, y)`` in level-0 pixels."""

    level: int
    x: int
    y: int
    side: int


def plan_region(entry: Mapping[str, Any], slide: Any, cfg: CropConfig, rng: np.random.Generator) -> Region:
    """The region of one index entry at this sample's magnification.

    ``index`` mode reads the entry as indexed. ``continuous`` mode draws a target µm/px log-uniformly over
    ``mpp_range``, keeps the entry's centre and field size in output pixels, reads at the coarsest level that is
    not coarser than the target (so the pipeline only ever downsamples, except below level 0's pixel size), and
    clamps the region inside the slide.
    """
    level, x, y, side = int(entry["level"]), int(entry["x"]), int(entry["y"]), int(entry["size"])
    if cfg.magnification == "index":
        return Region(level, x, y, side)
    downsamples = np.asarray(slide.level_downsamples, dtype=np.float64)
    slide_mpp = float(slide.mpp)
    out_side = side * slide_mpp * downsamples[level] / float(entry["mpp"])  # the entry's side in output pixels
    lo, hi = np.log(cfg.mpp_range)
    target = float(np.exp(lo + (hi - lo) * rng.random()))
    level_mpp = slide_mpp * downsamples
    usable = np.flatnonzero(level_mpp <= target * (1 + 1e-6))
    new_level = int(usable[np.argmax(level_mpp[usable])]) if usable.size else 0
    new_side = max(1, round(out_side * target / level_mpp[new_level]))
    ds = downsamples[new_level]
    width, height = (int(v) for v in slide.level_dimensions[new_level])
    new_side = min(new_side, width, height)
    centre_x = x + side * downsamples[level] / 2
    centre_y = y + side * downsamples[level] / 2
    max_x, max_y = (width - new_side) * ds, (height - new_side) * ds
    new_x = int(min(max(centre_x - new_side * ds / 2, 0), max_x))
    new_y = int(min(max(centre_y - new_side * ds / 2, 0), max_y))
    return Region(new_level, new_x, new_y, new_side)
