"""Synthetic H&E tissue rendered from a stain model.

Every structure is a map of hematoxylin and eosin optical densities (base 10): nuclei carry
hematoxylin with a chromatin grain, stroma carries eosin along wavy fibres, cellular areas a
lighter eosin cytoplasm, lumens and fat are empty. The light through the slide follows
Beer-Lambert with the Ruifrok & Johnston stain vectors (``skimage.color.rgb_from_hed``), so colour
deconvolution (``skimage.color.rgb2hed``) separates the stains as it does on real H&E.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.color import rgb_from_hed

from foundation.demo.shapes import (
    blob,
    paste_max,
    random_harmonics,
    smooth_noise,
    soft_step,
    tissue_alpha,
)
from foundation.demo.spec import DemoSpec, HESpec

# Orders of the angular harmonics that make outlines irregular (2: ovality, 3-4: dents and lobes).
OUTLINE_ORDERS = (2, 3, 4)
UM_PER_MM = 1000.0
LN10 = float(np.log(10.0))  # optical densities are base 10
LINING_TRUNCATE = 3.0  # the lining blur is cut off this many standard deviations from a lumen


def stain_vectors() -> tuple[np.ndarray, np.ndarray]:
    """Unit optical-density vectors (R, G, B) of hematoxylin and eosin (Ruifrok & Johnston 2001)."""
    h, e = rgb_from_hed[0], rgb_from_hed[1]
    return h / np.linalg.norm(h), e / np.linalg.norm(e)


def render_od(
    h_od: np.ndarray, e_od: np.ndarray, glass_rgb: tuple[int, int, int], noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Beer-Lambert: ``glass * 10^-(H*h + E*e)`` per channel plus sensor noise, as uint8 (H, W, 3)."""
    h_vec, e_vec = stain_vectors()
    out = np.empty((*h_od.shape, 3), np.uint8)
    for c in range(3):
        od = h_od * np.float32(h_vec[c] * LN10) + e_od * np.float32(e_vec[c] * LN10)
        light = np.float32(glass_rgb[c]) * np.exp(-od)
        light += rng.standard_normal(h_od.shape, dtype=np.float32) * np.float32(noise)
        out[..., c] = np.clip(np.rint(light), 0, 255)
    return out


@dataclass(frozen=True)
class HESlide:
    """A synthetic H&E image and the ground truth of what was drawn where."""

    rgb: np.ndarray  # (H, W, 3) uint8
    tissue: np.ndarray  # (H, W) bool: tissue coverage >= 1/2 (holes included)
    nuclei: np.ndarray  # (H, W) bool: nucleus pixels
    holes: np.ndarray  # (H, W) bool: lumens and fat vacuoles inside the tissue

    @property
    def stroma(self) -> np.ndarray:
        """Tissue that is neither nucleus nor hole: eosin-dominated stroma and cytoplasm."""
        return self.tissue & ~self.nuclei & ~self.holes


def _area_mm2(shape: tuple[int, int], mpp: float) -> float:
    return shape[0] * shape[1] * (mpp / UM_PER_MM) ** 2


def _points_on(mask: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uniform random points (y, x) on the pixels where ``mask`` is true."""
    flat = np.flatnonzero(mask)
    if flat.size == 0:
        return np.empty(0), np.empty(0)
    pick = flat[rng.integers(0, flat.size, n)]
    return pick // mask.shape[1] + rng.uniform(0, 1, n), pick % mask.shape[1] + rng.uniform(0, 1, n)


def _random_blob(rng: np.random.Generator, cy: float, cx: float, radius_um: tuple[float, float],
                 elongation: tuple[float, float], wobble: float, px: float, edge: float) -> tuple[np.ndarray, int, int]:
    """A randomly sized, elongated, turned and wobbly blob at ``(cy, cx)`` (draws: radius, elongation, angle,
    outline harmonics, in that order); returns :func:`blob`'s ``(patch, y0, x0)``."""
    r = rng.uniform(*radius_um) * px
    elong = rng.uniform(*elongation)
    return blob(cy, cx, (r * np.sqrt(elong), r / np.sqrt(elong)), rng.uniform(0, np.pi),
                random_harmonics(rng, wobble, OUTLINE_ORDERS), edge)


def _holes(
    tissue: np.ndarray, he: HESpec, px: float, mpp: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lumens and fat lobules on the tissue.

    Returns coverages in [0, 1] of lumens, fat vacuoles and adipocyte membranes, and the epithelial
    lining around lumens (1 on a lumen border, fading over ``lining_um`` away from it).
    """
    shape = tissue.shape
    tissue_mm2 = float(tissue.sum()) * (mpp / UM_PER_MM) ** 2
    lumens = np.zeros(shape, np.float32)
    lining = np.zeros(shape, np.float32)
    sigma = he.lining_um * px
    pad = int(np.ceil(LINING_TRUNCATE * sigma))
    fat = np.zeros(shape, np.float32)
    membranes = np.zeros(shape, np.float32)
    edge = he.membrane_um * px
    for cy, cx in zip(*_points_on(tissue, rng.poisson(he.lumens_per_mm2 * tissue_mm2), rng), strict=True):
        patch, y0, x0 = _random_blob(rng, cy, cx, he.lumen_radius_um, he.lumen_elongation, he.hole_wobble, px, edge)
        paste_max(lumens, patch, y0, x0)
        # The blurred coverage is 1/2 on a straight border: doubling it gives 1 along the border.
        blurred = ndimage.gaussian_filter(np.pad(patch, pad), sigma, truncate=LINING_TRUNCATE, mode="constant")
        paste_max(lining, np.minimum(1.0, 2 * blurred), y0 - pad, x0 - pad)
    cell = he.adipocyte_um * px
    for cy, cx in zip(*_points_on(tissue, rng.poisson(he.fat_per_mm2 * tissue_mm2), rng), strict=True):
        r = rng.uniform(*he.fat_radius_um) * px
        lobule, y0, x0 = blob(cy, cx, (r, r), 0.0, random_harmonics(rng, he.hole_wobble, OUTLINE_ORDERS), edge)
        # Adipocytes: Voronoi cells of jittered grid seeds; membranes where two seeds are nearly equidistant.
        gy, gx = np.mgrid[0 : lobule.shape[0] + cell : cell, 0 : lobule.shape[1] + cell : cell]
        seeds = np.stack([gy.ravel(), gx.ravel()], 1) + rng.uniform(-1, 1, (gy.size, 2)) * he.adipocyte_jitter * cell
        py, px_ = np.mgrid[0 : lobule.shape[0], 0 : lobule.shape[1]]
        dist, _ = cKDTree(seeds).query(np.stack([py.ravel(), px_.ravel()], 1), k=2)
        gap = (dist[:, 1] - dist[:, 0]).reshape(lobule.shape).astype(np.float32)
        membrane = soft_step(np.float32(edge) - gap, edge)
        paste_max(fat, lobule * (1 - membrane), y0, x0)
        paste_max(membranes, lobule * membrane, y0, x0)
    return lumens, fat, membranes, lining


def _stroma_eosin(
    shape: tuple[int, int], he: HESpec, px: float, rng: np.random.Generator
) -> np.ndarray:
    """Eosin of stroma: wavy parallel fibres, broken into segments by a grain field."""
    h, w = shape
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    theta = rng.uniform(0, np.pi)
    warp = smooth_noise(shape, he.fibre_warp_scale_um * px, rng) * np.float32(he.fibre_warp_um * px)
    period = np.float32(he.fibre_period_um * px)
    phase = (xx * np.float32(np.cos(theta)) + yy * np.float32(np.sin(theta)) + warp) / period
    # Phase jitter on the scale of a few fibres makes neighbouring fibres split, merge and thin out.
    phase += smooth_noise(shape, he.fibre_jitter_scale * period, rng) * np.float32(he.fibre_jitter)
    fibre = (0.5 + 0.5 * np.sin(np.float32(2 * np.pi) * phase)) ** he.fibre_sharpness
    segments = 0.5 + 0.5 * np.tanh(smooth_noise(shape, he.fibre_jitter_scale * period, rng))
    # Isotropic grain between the fibres (ground substance, out-of-focus fibres).
    grain = 0.5 + 0.5 * np.tanh(smooth_noise(shape, he.grain_um * px, rng))
    mix = np.float32(he.grain_share)
    lo, hi = he.stroma_e_od
    return np.float32(lo) + np.float32(hi - lo) * ((1 - mix) * fibre * segments + mix * grain)


def _nuclei(
    shape: tuple[int, int],
    he: HESpec,
    px: float,
    area_mm2: float,
    accept: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei placed by thinning a Poisson process with ``accept`` (per-pixel probability in [0, 1]).

    Returns (nucleus coverage in [0, 1], hematoxylin optical density of the nuclei).
    """
    h, w = shape
    coverage = np.zeros(shape, np.float32)
    h_od = np.zeros(shape, np.float32)
    n = rng.poisson(he.nuclei_per_mm2[1] * area_mm2)
    ys, xs = rng.uniform(0, h, n), rng.uniform(0, w, n)
    keep = rng.uniform(0, 1, n) < accept[ys.astype(int), xs.astype(int)]
    edge = he.nucleus_edge_um * px
    for cy, cx in zip(ys[keep], xs[keep], strict=True):
        patch, y0, x0 = _random_blob(rng, cy, cx, he.nucleus_radius_um, he.nucleus_elongation, he.nucleus_wobble,
                                     px, edge)
        paste_max(coverage, patch, y0, x0)
        paste_max(h_od, patch, y0, x0, scale=rng.uniform(*he.nucleus_h_od))
    grain = smooth_noise(shape, he.chromatin_um * px, rng)
    h_od *= np.maximum(0.0, 1.0 + np.float32(he.chromatin) * grain)
    return coverage, h_od


def synthesize_he(size: tuple[int, int], spec: DemoSpec, rng: np.random.Generator) -> HESlide:
    """Render one H&E slide of ``size`` = (width, height) pixels at ``spec.mpp`` µm/px."""
    shape = (size[1], size[0])
    he, px = spec.he, spec.um_to_px
    area = _area_mm2(shape, spec.mpp)
    alpha = tissue_alpha(shape, spec.tissue, px, rng)
    cellularity = 0.5 + 0.5 * np.tanh(smooth_noise(shape, he.cellularity_um * px, rng))
    lumens, fat, membranes, lining = _holes(alpha >= 0.5, he, px, spec.mpp, rng)
    holes = np.maximum(lumens, fat) * alpha
    lo, hi = he.nuclei_per_mm2
    # Epithelium lines the lumens at the full (cellular) nucleus density.
    density = np.maximum(lo + (hi - lo) * cellularity, hi * lining)
    accept = density / hi * alpha * (1 - holes)
    nucleus, nucleus_h = _nuclei(shape, he, px, area, accept, rng)
    nucleus *= 1 - holes

    eosin = _stroma_eosin(shape, he, px, rng)
    eosin += (np.float32(he.cytoplasm_e_od) - eosin) * cellularity
    eosin += (np.float32(he.nucleus_e_od) - eosin) * nucleus
    hema = np.float32(he.background_h_od) + nucleus_h
    solid = alpha * (1 - holes)
    hema *= solid
    eosin = eosin * solid + np.float32(he.stroma_e_od[1]) * membranes * alpha
    for od in (hema, eosin):
        od *= 1 + np.float32(he.od_noise) * rng.standard_normal(shape, dtype=np.float32)
        np.maximum(od, 0, out=od)

    tissue = alpha >= 0.5
    hole_mask = tissue & (holes >= 0.5)
    return HESlide(
        rgb=render_od(hema, eosin, spec.glass_rgb, spec.glass_noise, rng),
        tissue=tissue,
        nuclei=tissue & ~hole_mask & (nucleus >= 0.5),
        holes=hole_mask,
    )
