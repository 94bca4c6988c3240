"""IHC slides built from the real DAB + hematoxylin image that scikit-image ships.

``skimage.data.immunohistochemistry()`` (colonic glands, FHL2 revealed with DAB, hematoxylin
counterstain; CMMI, no known copyright restrictions) is upsampled with Lanczos, mirrored into an
endless plane, and a slide-sized window of that plane at a random offset is cut into tissue pieces
on glass. Inside a piece the pixels are exactly those of the upsampled image.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from skimage import data

from foundation.demo.shapes import tissue_alpha
from foundation.demo.spec import DemoSpec


@lru_cache(maxsize=2)
def upsampled_source(scale: int) -> np.ndarray:
    """The scikit-image IHC image (512 x 512 RGB) upsampled ``scale`` times with Lanczos, uint8 (read-only)."""
    source = data.immunohistochemistry()
    h, w = source.shape[:2]
    image = Image.fromarray(source).resize((w * scale, h * scale), Image.Resampling.LANCZOS)
    out = np.asarray(image)
    out.flags.writeable = False
    return out


def mirror_index(n: int, period: int, offset: int) -> np.ndarray:
    """Source indices of ``n`` plane positions from ``offset`` on, the source mirrored at every edge."""
    i = (np.arange(n) + offset) % (2 * period)
    return np.where(i < period, i, 2 * period - 1 - i)


@dataclass(frozen=True)
class IHCSlide:
    """A composed IHC image and where its pixels come from."""

    rgb: np.ndarray  # (H, W, 3) uint8
    tissue: np.ndarray  # (H, W) bool: tissue coverage >= 1/2
    core: np.ndarray  # (H, W) bool: pixels copied unchanged from the upsampled source (coverage 1)
    offset: tuple[int, int]  # (y, x) of slide pixel (0, 0) in the mirrored plane of the upsampled source


def synthesize_ihc(size: tuple[int, int], spec: DemoSpec, rng: np.random.Generator) -> IHCSlide:
    """Compose one IHC slide of ``size`` = (width, height) pixels: source crops in tissue pieces on glass."""
    width, height = size
    source = upsampled_source(spec.ihc_scale)
    sh, sw = source.shape[:2]
    oy, ox = int(rng.integers(0, 2 * sh)), int(rng.integers(0, 2 * sw))
    plane = source[mirror_index(height, sh, oy)[:, None], mirror_index(width, sw, ox)[None, :]]
    alpha = tissue_alpha((height, width), spec.tissue, spec.um_to_px, rng)
    glass = np.asarray(spec.glass_rgb, np.float32) + rng.standard_normal((height, width, 3), dtype=np.float32) * (
        np.float32(spec.glass_noise)
    )
    a = alpha[..., None]
    rgb = np.clip(np.rint(a * plane + (1 - a) * glass), 0, 255).astype(np.uint8)
    core = alpha >= 1.0
    rgb[core] = plane[core]  # exact source pixels, free of float round-off
    return IHCSlide(rgb=rgb, tissue=alpha >= 0.5, core=core, offset=(oy, ox))
