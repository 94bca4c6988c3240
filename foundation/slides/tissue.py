"""Tissue mask of a low-resolution slide image (config ``tissue:``).

A pixel is tissue when it is stained and absorbs light: HSV saturation and summed optical density
both above their thresholds. That keeps H&E (pink/purple) and IHC (brown DAB, blue hematoxylin) and
rejects glass (bright and grey). Near-black pixels (dust, folds, scanner edges) are rejected, and so
is marker-pen ink: hue ranges (green, blue) at saturations that stain does not reach, grown by a
margin to swallow the ink's pale fringe. A closing joins stained nuclei and stroma into tissue
regions and components below a size fraction are dropped.

The mask is meant for thumbnails (~8 µm/px): the morphology radii are in mask pixels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

_MAX_8BIT = 255.0
_HUE_SECTORS = 6.0


@dataclass(frozen=True)
class PenInk:
    """A marker-pen ink: a hue interval (HSV hue in [0, 1]) and the saturation at which ink starts."""

    hue: tuple[float, float]
    min_saturation: float


@dataclass(frozen=True)
class TissueParams:
    """The ``tissue:`` section of the config, validated."""

    thumbnail_mpp: float
    max_thumbnail_side: int
    max_read_pixels: int
    min_saturation: float
    min_optical_density: float
    dark_max_brightness: float
    pen: tuple[PenInk, ...]
    pen_margin: int
    closing_radius: int
    min_component_fraction: float

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> TissueParams:
        """Build from ``cfg.tissue``; a value out of range raises ``ValueError`` naming the key."""
        inks = []
        for i, ink in enumerate(cfg["pen"]):
            lo, hi = (float(v) for v in ink["hue"])
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"tissue.pen[{i}].hue must be [lo, hi] with 0 <= lo < hi <= 1, got {[lo, hi]}")
            inks.append(PenInk((lo, hi), float(ink["min_saturation"])))
        params = cls(
            thumbnail_mpp=float(cfg["thumbnail_mpp"]),
            max_thumbnail_side=int(cfg["max_thumbnail_side"]),
            max_read_pixels=int(cfg["max_read_pixels"]),
            min_saturation=float(cfg["min_saturation"]),
            min_optical_density=float(cfg["min_optical_density"]),
            dark_max_brightness=float(cfg["dark_max_brightness"]),
            pen=tuple(inks),
            pen_margin=int(cfg["pen_margin"]),
            closing_radius=int(cfg["closing_radius"]),
            min_component_fraction=float(cfg["min_component_fraction"]),
        )
        for key in ("thumbnail_mpp", "max_thumbnail_side", "max_read_pixels"):
            if getattr(params, key) <= 0:
                raise ValueError(f"tissue.{key} must be positive, got {getattr(params, key)!r}")
        for key in ("pen_margin", "closing_radius", "min_component_fraction", "min_optical_density"):
            if getattr(params, key) < 0:
                raise ValueError(f"tissue.{key} must be >= 0, got {getattr(params, key)!r}")
        for key in ("min_saturation", "dark_max_brightness"):
            if not 0.0 <= getattr(params, key) <= 1.0:
                raise ValueError(f"tissue.{key} must lie in [0, 1], got {getattr(params, key)!r}")
        return params


# Optical density of each 8-bit value, -log10(I / 255), with 0 clamped to 1 (the darkest measurable).
_OD_LUT = (-np.log10(np.maximum(np.arange(256), 1) / _MAX_8BIT)).astype(np.float32)


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in [0, 1) of an ...x3 uint8 array (0 for grey pixels), computed in float32."""
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx, mn = x.max(-1), x.min(-1)
    delta = np.where(mx > mn, mx - mn, 1.0)
    h = np.where(mx == r, (g - b) / delta, np.where(mx == g, 2.0 + (b - r) / delta, 4.0 + (r - g) / delta))
    h = (h / _HUE_SECTORS) % 1.0
    return np.where(mx > mn, h, 0.0).astype(np.float32)


def pixel_classes(rgb: np.ndarray, params: TissueParams) -> dict[str, np.ndarray]:
    """Per-pixel boolean maps before morphology: ``stained`` (saturated, absorbing, not dark) and ``pen``."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"tissue detection needs an HxWx3 uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = np.maximum(np.maximum(r, g), b).astype(np.float32)
    mn = np.minimum(np.minimum(r, g), b).astype(np.float32)
    saturation = (mx - mn) / np.maximum(mx, 1.0)  # 0 for black, like HSV
    density = _OD_LUT[r] + _OD_LUT[g] + _OD_LUT[b]
    stained = ((saturation >= params.min_saturation) & (density >= params.min_optical_density)
               & (mx > params.dark_max_brightness * _MAX_8BIT))
    pen = np.zeros(rgb.shape[:2], dtype=bool)
    if params.pen:
        floor = min(ink.min_saturation for ink in params.pen)
        candidates = saturation >= floor
        if candidates.any():
            h = hue(rgb[candidates])
            s = saturation[candidates]
            hit = np.zeros(h.shape, dtype=bool)
            for ink in params.pen:
                hit |= (h >= ink.hue[0]) & (h <= ink.hue[1]) & (s >= ink.min_saturation)
            pen[candidates] = hit
    return {"stained": stained, "pen": pen}


def _close(mask: np.ndarray, radius: int) -> np.ndarray:
    # Edge padding keeps tissue touching the image border from being eroded away.
    padded = np.pad(mask, radius, mode="edge")
    return ndi.binary_closing(padded, structure=_disk(radius))[radius:-radius, radius:-radius]


def _drop_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    labels, count = ndi.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def pen_mask(pen: np.ndarray, margin: int) -> np.ndarray:
    """Ink regions: specks thinner than 3 px removed (stain can reach ink colours pixel-wise), then grown."""
    pen = ndi.binary_opening(pen, structure=_disk(1))
    if margin > 0 and pen.any():
        pen = ndi.binary_dilation(pen, structure=_disk(margin))
    return pen


def tissue_mask(rgb: np.ndarray, params: TissueParams) -> np.ndarray:
    """Boolean HxW tissue mask of an HxWx3 uint8 RGB image (a slide thumbnail)."""
    classes = pixel_classes(rgb, params)
    pen = pen_mask(classes["pen"], params.pen_margin)
    mask = classes["stained"] & ~pen
    if params.closing_radius > 0:
        mask = _close(mask, params.closing_radius) & ~pen
    if params.min_component_fraction > 0:
        mask = _drop_small(mask, params.min_component_fraction * mask.size)
    return mask


def tissue_fraction(rgb: np.ndarray, params: TissueParams) -> float:
    """Share of an image's pixels that are tissue."""
    return float(tissue_mask(rgb, params).mean())

