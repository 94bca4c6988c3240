"""Generic photometric augmentation (DINOv2 recipe): parameter sampling and the torch reference.

Per crop, on float RGB levels in ``[0, 255]`` (``HWC``), in DINOv2's order:

1. colour jitter, with probability ``color_jitter_p`` (all four factors at once, like torchvision's
   ``RandomApply(ColorJitter)``), in the fixed order brightness ``b * x``, contrast ``c * x + (1 - c) * mean grey``,
   saturation ``s * x + (1 - s) * grey`` (torchvision's definitions), hue: a rotation about the grey axis by ``h``
   turns (linear; equal to the HSV hue shift at every third of a turn);
2. grayscale (every channel the grey level), with probability ``grayscale_p``;
3. Gaussian blur (``blur_window`` separable taps, mirrored borders; window 1 = no blur);
4. solarize ``255 - x`` where ``x >= threshold``.

Steps 1-2 are linear in ``x`` and its mean grey level ``m``, so they compose into one affine map per crop,
``clip(x @ A + k * m)``: DALI then pays one 3x3 colour transform instead of five passes. Unlike torchvision's PIL
path we clip once at the end, not after each step, and the jitter order is fixed (torchvision draws one per call)
so one static DALI graph runs it. Parameters are drawn on the host from the pipeline's own
``numpy.random.Generator``; the same arrays drive :func:`apply_photometric` and
:func:`stain.dali_ops.photometric_augment`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stain.deconvolution import MAX_LEVEL

#: ITU-R 601 luma, PIL's ``convert("L")`` weights (DINOv2 jitters PIL images; torchvision tensors use 0.2989 for red)
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
CROP_TYPES = ("global1", "global2", "local")
#: uniforms drawn per crop: jitter?, brightness, contrast, saturation, hue, gray?, blur?, blur sigma, solarize?
PHOTOMETRIC_DRAWS_PER_CROP = 9


@dataclass(frozen=True)
class PhotometricParams:
    """Per-crop parameters (identity values mean "not applied") and the derived affine colour map."""

    brightness: np.ndarray    # [N] float32, 1 = unchanged
    contrast: np.ndarray      # [N] float32, 1 = unchanged
    saturation: np.ndarray    # [N] float32, 1 = unchanged
    hue: np.ndarray           # [N] float32, turns, 0 = unchanged
    grayscale: np.ndarray     # [N] bool
    blur_window: np.ndarray   # [N] int32, 1 = no blur
    blur_sigma: np.ndarray    # [N] float32
    solarize: np.ndarray      # [N] float32, 1 = solarize, 0 = not
    solarize_threshold: float

    def __len__(self) -> int:
        return len(self.brightness)

    @property
    def color_matrix(self) -> np.ndarray:
        """``A`` [N,3,3] float32 (row vectors): ``b * c * S(s) @ R(h) @ G``."""
        gray = np.where(self.grayscale[:, None, None], grayscale_matrix(len(self)), np.eye(3))
        scale = (self.brightness.astype(np.float64) * self.contrast)[:, None, None]
        m = scale * saturation_matrix(self.saturation) @ hue_matrix(self.hue) @ gray
        return np.ascontiguousarray(m, dtype=np.float32)

    @property
    def mean_weight(self) -> np.ndarray:
        """``k`` [N] float32: ``(1 - c) * b``, the weight of the input's mean grey level in every channel.

        (The grey axis ``(1,1,1)`` passes through ``S``, ``R`` and ``G`` unchanged, so the contrast offset stays
        grey.)"""
        return ((1.0 - self.contrast.astype(np.float64)) * self.brightness).astype(np.float32)


def saturation_matrix(s: np.ndarray) -> np.ndarray:
    """``[N,3,3]``: ``x @ S = s * x + (1 - s) * grey(x)`` for each factor in ``s``."""
    s = np.asarray(s, dtype=np.float64)[:, None, None]
    return s * np.eye(3) + (1.0 - s) * LUMA_WEIGHTS[None, :, None] * np.ones((1, 1, 3))


def hue_matrix(h: np.ndarray) -> np.ndarray:
    """``[N,3,3]``: rotation about the grey axis ``(1,1,1)`` by ``h`` turns (Rodrigues), red -> green positive."""
    theta = 2.0 * math.pi * np.asarray(h, dtype=np.float64)[:, None, None]
    k = np.ones(3) / math.sqrt(3.0)
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    rot = np.cos(theta) * np.eye(3) + np.sin(theta) * cross + (1.0 - np.cos(theta)) * np.outer(k, k)
    # rot acts on column vectors; our convention is x @ M
    return np.transpose(rot, (0, 2, 1))


def grayscale_matrix(n: int) -> np.ndarray:
    """``[n,3,3]``: every output channel is the luma of the input."""
    return np.tile(LUMA_WEIGHTS[:, None] * np.ones((1, 3)), (n, 1, 1))


def _probability(cfg: Mapping[str, Any], key: str, crop: str | None = None) -> float:
    value = cfg[key] if crop is None else cfg[key][crop]
    where = f"augmentation.generic.{key}" + (f".{crop}" if crop else "")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}={value} must lie in [0, 1]")
    return value


class PhotometricPolicy:
    """The ``data.augmentation.generic`` section, validated once for the crop types in ``crops``.

    :meth:`params` then turns uniforms into parameters with no validation and no config lookups.
    """

    def __init__(self, cfg: Mapping[str, Any], crops: Sequence[str] = CROP_TYPES) -> None:
        for crop in crops:
            if crop not in CROP_TYPES:
                raise KeyError(f"unknown crop type {crop!r}; choose one of {CROP_TYPES}")
        self.jitter_p = _probability(cfg, "color_jitter_p")
        self.gray_p = _probability(cfg, "grayscale_p")
        self.blur_p = {crop: _probability(cfg, "blur_p", crop) for crop in crops}
        self.solarize_p = {crop: _probability(cfg, "solarize_p", crop) for crop in crops}
        self.strengths = {k: float(cfg[k]) for k in ("brightness", "contrast", "saturation", "hue")}
        for key, value in self.strengths.items():
            if value < 0.0 or (key != "hue" and value > 1.0) or (key == "hue" and value > 0.5):
                raise ValueError(f"augmentation.generic.{key}={value} out of range ([0, 1], hue [0, 0.5])")
        self.sigma_lo, self.sigma_hi = (float(v) for v in cfg["blur_sigma"])
        if not 0.0 < self.sigma_lo <= self.sigma_hi:
            raise ValueError(f"augmentation.generic.blur_sigma={[self.sigma_lo, self.sigma_hi]} must be "
                             "0 < lo <= hi")
        self.window = int(cfg["blur_window"])
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"augmentation.generic.blur_window={self.window} must be a positive odd integer")
        self.solarize_threshold = float(cfg["solarize_threshold"])

    def params(self, crop: str, u: np.ndarray) -> PhotometricParams:
        """The parameters of ``N`` crops of type ``crop`` from their uniforms ``u`` ``[N, 9]``."""
        jitter = u[:, 0] < self.jitter_p

        def factor(col: int, key: str) -> np.ndarray:
            return np.where(jitter, 1.0 + self.strengths[key] * (2.0 * u[:, col] - 1.0), 1.0)

        return PhotometricParams(
            brightness=factor(1, "brightness").astype(np.float32),
            contrast=factor(2, "contrast").astype(np.float32),
            saturation=factor(3, "saturation").astype(np.float32),
            hue=np.where(jitter, self.strengths["hue"] * (2.0 * u[:, 4] - 1.0), 0.0).astype(np.float32),
            grayscale=u[:, 5] < self.gray_p,
            blur_window=np.where(u[:, 6] < self.blur_p[crop], self.window, 1).astype(np.int32),
            blur_sigma=(self.sigma_lo + (self.sigma_hi - self.sigma_lo) * u[:, 7]).astype(np.float32),
            solarize=(u[:, 8] < self.solarize_p[crop]).astype(np.float32),
            solarize_threshold=self.solarize_threshold,
        )


def sample_photometric_params(crop: str, n: int, rng: np.random.Generator,
                              cfg: Mapping[str, Any]) -> PhotometricParams:
    """Draw the generic-op parameters of ``n`` crops of type ``crop`` (``global1``, ``global2``, ``local``).

    ``cfg`` is the ``data.augmentation.generic`` section. Exactly ``9 * n`` uniforms are drawn from ``rng``.
    """
    policy = PhotometricPolicy(cfg, (crop,))
    return policy.params(crop, rng.random((n, PHOTOMETRIC_DRAWS_PER_CROP)))


def _clip(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, 0.0, MAX_LEVEL)


def _per_sample(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(-1, 1, 1, 1)


def mean_grey(x: torch.Tensor) -> torch.Tensor:
    """Mean grey level per sample, ``[N]``."""
    return (x @ torch.as_tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device)).mean(dim=(1, 2))


# The single steps, clipped like torchvision's (the chain itself uses the fused map of apply_color_affine).


def adjust_brightness(x: torch.Tensor, b: np.ndarray) -> torch.Tensor:
    """``clip(b * x)`` per sample of ``[N,H,W,3]`` float levels."""
    return _clip(x * _per_sample(b, x))


def adjust_contrast(x: torch.Tensor, c: np.ndarray) -> torch.Tensor:
    """``clip(c * x + (1 - c) * mean grey level)`` per sample."""
    c = _per_sample(c, x)
    return _clip(c * x + (1.0 - c) * mean_grey(x).reshape(-1, 1, 1, 1))


def apply_color_matrix(x: torch.Tensor, m: np.ndarray) -> torch.Tensor:
    """``clip(x @ M)`` per sample (``M`` ``[N,3,3]``, row vectors)."""
    m = torch.as_tensor(m, dtype=x.dtype, device=x.device)
    return _clip(torch.einsum("nhwc,ncd->nhwd", x, m))


def gaussian_kernel(window: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps of odd length ``window`` (float64)."""
    r = np.arange(window, dtype=np.float64) - (window - 1) / 2
    k = np.exp(-(r**2) / (2.0 * sigma**2))
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, window: np.ndarray, sigma: np.ndarray) -> torch.Tensor:
    """Separable Gaussian blur per sample with mirrored borders (``reflect``, edge not repeated)."""
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        w = int(window[i])
        if w == 1:
            out[i] = x[i]
            continue
        k = torch.as_tensor(gaussian_kernel(w, float(sigma[i])), dtype=x.dtype, device=x.device)
        img = x[i].permute(2, 0, 1)[:, None]  # [3,1,H,W]
        pad = w // 2
        img = F.conv2d(F.pad(img, (pad, pad, 0, 0), mode="reflect"), k.reshape(1, 1, 1, w))
        img = F.conv2d(F.pad(img, (0, 0, pad, pad), mode="reflect"), k.reshape(1, 1, w, 1))
        out[i] = img[:, 0].permute(1, 2, 0)
    return out


def solarize(x: torch.Tensor, flags: np.ndarray, threshold: float) -> torch.Tensor:
    """``255 - x`` where ``x >= threshold``, for the samples whose flag is 1."""
    on = _per_sample(flags, x) > 0
    return torch.where(on & (x >= threshold), MAX_LEVEL - x, x)


def apply_color_affine(x: torch.Tensor, params: PhotometricParams) -> torch.Tensor:
    """Colour jitter and grayscale as one map: ``clip(x @ A + k * mean_grey(x))``."""
    m = torch.as_tensor(params.color_matrix, dtype=x.dtype, device=x.device)
    offset = _per_sample(params.mean_weight, x) * mean_grey(x).reshape(-1, 1, 1, 1)
    return _clip(torch.einsum("nhwc,ncd->nhwd", x, m) + offset)


def apply_photometric(images: torch.Tensor, params: PhotometricParams) -> torch.Tensor:
    """Torch reference of the whole chain on ``[N,H,W,3]`` levels in ``[0, 255]`` (uint8 or float)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got {tuple(images.shape)}")
    if images.shape[0] != len(params):
        raise ValueError(f"{images.shape[0]} images but parameters for {len(params)}")
    x = images if images.is_floating_point() else images.to(torch.float32)
    x = apply_color_affine(x, params)
    x = gaussian_blur(x, params.blur_window, params.blur_sigma)
    return solarize(x, params.solarize, params.solarize_threshold)
