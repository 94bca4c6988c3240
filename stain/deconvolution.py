"""Colour deconvolution (Ruifrok & Johnston 2001): RGB <-> optical density <-> stain concentrations.

Conventions, shared by the torch reference and the DALI adapter:

* Pixels are RGB levels in ``[0, 255]`` (uint8 or float), channels last.
* Optical density is the natural-log absorbance ``OD = -ln(max(I / 255, RGB_FLOOR))``.
* Stain concentrations are in scikit-image units: ``stains = (OD / OD_SCALE) @ stain_from_rgb``, exactly what
  ``skimage.color.separate_stains`` computes *before* it clips negative concentrations to zero. We do not clip: the
  map stays linear, so a stain jitter is one 3x3 matrix on OD and zero strength is the exact identity.
* Row vectors: a matrix acts as ``x @ M`` on ``[..., 3]`` arrays.

Bases are scikit-image's matrices: ``hed`` (hematoxylin, eosin, DAB; ``rgb_from_hed``) and ``hdab``
(hematoxylin, DAB and a complementary residual channel; ``rgb_from_hdx``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from skimage.color import hdx_from_rgb, hed_from_rgb, rgb_from_hdx, rgb_from_hed

MAX_LEVEL = 255.0
#: smallest relative intensity before the log (``skimage.color.separate_stains`` uses the same floor)
RGB_FLOOR = 1e-6
#: scikit-image divides OD by ``-ln(RGB_FLOOR)`` so that concentrations are about unit scale
OD_SCALE = -math.log(RGB_FLOOR)


@dataclass(frozen=True)
class StainBasis:
    """A stain basis: ``stain_from_rgb`` maps scaled OD to concentrations, ``rgb_from_stain`` maps back."""

    name: str
    channels: tuple[str, str, str]
    stain_from_rgb: np.ndarray
    rgb_from_stain: np.ndarray


BASES: dict[str, StainBasis] = {
    "hed": StainBasis("hed", ("hematoxylin", "eosin", "dab"), hed_from_rgb, rgb_from_hed),
    "hdab": StainBasis("hdab", ("hematoxylin", "dab", "residual"), hdx_from_rgb, rgb_from_hdx),
}


def basis(name: str) -> StainBasis:
    """The stain basis called ``name`` (``hed`` or ``hdab``); raises ``KeyError`` naming the value."""
    if name not in BASES:
        raise KeyError(f"unknown stain basis {name!r}; choose one of {sorted(BASES)}")
    return BASES[name]


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density (float64) of RGB levels in ``[0, 255]``."""
    rel = np.asarray(rgb, dtype=np.float64) / MAX_LEVEL
    return -np.log(np.maximum(rel, RGB_FLOOR))


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """RGB levels (float64, ``[0, 255]``) of optical densities; brighter than white clips to 255."""
    return np.minimum(MAX_LEVEL * np.exp(-np.asarray(od, dtype=np.float64)), MAX_LEVEL)


def od_lookup_table() -> np.ndarray:
    """``OD`` of each uint8 level (float64 ``[256]``): the log step as a table lookup."""
    return rgb_to_od(np.arange(int(MAX_LEVEL) + 1))


def rgb_to_stains(rgb: np.ndarray, name: str) -> np.ndarray:
    """Stain concentrations (float64, scikit-image units, not clipped) of RGB levels in the basis ``name``."""
    return (rgb_to_od(rgb) / OD_SCALE) @ basis(name).stain_from_rgb


def stains_to_rgb(stains: np.ndarray, name: str) -> np.ndarray:
    """RGB levels (float64, ``[0, 255]``) of stain concentrations in the basis ``name``."""
    return od_to_rgb((np.asarray(stains, dtype=np.float64) * OD_SCALE) @ basis(name).rgb_from_stain)


def stain_jitter_transform(name: str, alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OD-space ``(M [N,3,3], T [N,3])`` (float64) of ``stains' = alpha * stains + beta`` in the basis ``name``.

    ``OD' = OD @ M + T`` with ``M = stain_from_rgb @ diag(alpha) @ rgb_from_stain`` and
    ``T = OD_SCALE * beta @ rgb_from_stain``; ``alpha``/``beta`` are ``[N, 3]`` (one row per sample).
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    if alpha.ndim != 2 or alpha.shape[1] != 3 or beta.shape != alpha.shape:
        raise ValueError(f"alpha and beta must both be [N, 3], got {alpha.shape} and {beta.shape}")
    b = basis(name)
    m = np.einsum("ij,nj,jk->nik", b.stain_from_rgb, alpha, b.rgb_from_stain)
    t = OD_SCALE * beta @ b.rgb_from_stain
    return m, t
