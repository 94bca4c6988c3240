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
    u = rng.random((scales.shape[0], max_tries, 4))
    return windows_from_uniforms(u[None], np.array([height]), np.array([width]), scales, ratio)[0]


def windows_from_uniforms(u: np.ndarray, heights: np.ndarray, widths: np.ndarray, scales: np.ndarray,
                          ratio: tuple[float, float]) -> np.ndarray:
    """:func:`crop_windows` of ``B`` regions from their uniforms ``u`` ``[B, C, max_tries, 4]``: ``[B, C, 4]``.

    ``heights`` and ``widths`` are ``[B]`` ints. Every value is computed element by element as in the one-region
    case, so a batch gives exactly the windows of its regions drawn one at a time.
    """
    heights = np.asarray(heights, dtype=np.int64)[:, None, None]
    widths = np.asarray(widths, dtype=np.int64)[:, None, None]
    area = heights * widths * (scales[:, None, 0] + (scales[:, None, 1] - scales[:, None, 0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= widths) & (h > 0) & (h <= heights)
    first = ok.argmax(axis=-1)[..., None]  # the first valid try (0 where none is: fixed below)
    hh = np.take_along_axis(h, first, axis=-1)[..., 0]
    ww = np.take_along_axis(w, first, axis=-1)[..., 0]
    u_first = np.take_along_axis(u, first[..., None], axis=-2)[..., 0, :]
    out = np.empty((*hh.shape, 4), dtype=np.int64)
    out[..., 0] = (u_first[..., 2] * (heights[..., 0] - hh + 1)).astype(np.int64)
    out[..., 1] = (u_first[..., 3] * (widths[..., 0] - ww + 1)).astype(np.int64)
    out[..., 2], out[..., 3] = hh, ww
    for b, c in zip(*np.nonzero(~ok.any(axis=-1)), strict=True):
        out[b, c] = _fallback_window(int(heights[b, 0, 0]), int(widths[b, 0, 0]), ratio)
    return out


def _fallback_window(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's window when no try is valid: centred, the nearest allowed aspect ratio."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        ww, hh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        hh, ww = height, round(height * ratio[1])
    else:
        hh, ww = height, width
    return (height - hh) // 2, (width - ww) // 2, hh, ww


@dataclass(frozen=True)
class CropParams:
    """Geometry of the ``C`` crops of one sample (or ``[B, C, ...]`` of a batch), as the pipeline consumes it."""

    roi_start: np.ndarray  # [C, 2] float32 (y, x) in region pixels; start > end flips that axis
    roi_end: np.ndarray    # [C, 2] float32
    angle: np.ndarray      # [C] float32 degrees, a multiple of 90


def crop_uniform_count(cfg: CropConfig) -> int:
    """Uniforms :func:`draw_crops` takes in one call before its quarter turns: the windows', then the flips'."""
    return cfg.num_crops * (4 * cfg.max_tries + 2)


def draw_crops(rng: np.random.Generator, height: int, width: int, cfg: CropConfig) -> CropParams:
    """Windows, flips and quarter turns of every crop of a ``height x width`` region."""
    # one call for the windows' and the flips' uniforms: the same numbers as two calls in that order
    u = rng.random(crop_uniform_count(cfg))
    turns = rng.integers(0, 4, size=cfg.num_crops) if cfg.rot90 else np.zeros(cfg.num_crops, dtype=np.int64)
    batch = crops_from_draws(u[None], turns[None], np.array([height]), np.array([width]), cfg)
    return CropParams(roi_start=batch.roi_start[0], roi_end=batch.roi_end[0], angle=batch.angle[0])


def crops_from_draws(u: np.ndarray, turns: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                     cfg: CropConfig) -> CropParams:
    """:func:`draw_crops` of ``B`` regions from their draws: ``u`` ``[B, crop_uniform_count]``, ``turns``
    ``[B, C]``, region sides ``[B]``; the parameters are ``[B, C, ...]``."""
    n = cfg.num_crops
    windows = windows_from_uniforms(u[:, :4 * cfg.max_tries * n].reshape(-1, n, cfg.max_tries, 4), heights, widths,
                                    np.array(cfg.crop_scales(), dtype=np.float64), cfg.ratio)
    flips = u[:, 4 * cfg.max_tries * n:].reshape(-1, n, 2)
    y0, x0, h, w = np.moveaxis(windows, -1, 0)
    start = np.stack([y0, x0], axis=-1).astype(np.float32)
    end = np.stack([y0 + h, x0 + w], axis=-1).astype(np.float32)
    flip = np.stack([flips[..., 0] < cfg.vflip_p, flips[..., 1] < cfg.hflip_p], axis=-1)
    start, end = np.where(flip, end, start), np.where(flip, start, end)
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
