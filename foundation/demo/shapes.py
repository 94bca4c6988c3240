"""Random fields and tissue outlines shared by the H&E and IHC synthesis."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from foundation.demo.spec import TissueSpec

# Smooth fields are drawn on a grid with this many nodes per correlation length, blurred, then
# interpolated to full resolution.
COARSE_STEPS_PER_SCALE = 4


def _linear_resample(values: np.ndarray, n: int, step: float, axis: int) -> np.ndarray:
    """Linear interpolation of ``values`` (samples every ``step`` output pixels along ``axis``) at 0..n-1."""
    pos = np.arange(n, dtype=np.float64) / step
    i0 = np.minimum(pos.astype(np.int64), values.shape[axis] - 2)
    frac = (pos - i0).astype(np.float32)
    shape = [1, 1]
    shape[axis] = n
    frac = frac.reshape(shape)
    lo, hi = np.take(values, i0, axis=axis), np.take(values, i0 + 1, axis=axis)
    return lo + (hi - lo) * frac


def smooth_noise(shape: tuple[int, int], scale_px: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with correlation length ``scale_px`` (float32).

    Drawn and blurred on a grid with ``COARSE_STEPS_PER_SCALE`` nodes per ``scale_px`` (never finer
    than a pixel), then linearly interpolated: large scales cost no more than a resize.
    """
    step = max(1.0, scale_px / COARSE_STEPS_PER_SCALE)
    coarse_shape = (int(np.ceil(shape[0] / step)) + 2, int(np.ceil(shape[1] / step)) + 2)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), scale_px / step, mode="wrap")
    coarse = (coarse - coarse.mean()) / max(float(coarse.std()), np.finfo(np.float32).tiny)
    if step == 1.0:
        return np.ascontiguousarray(coarse[: shape[0], : shape[1]])
    rows = _linear_resample(coarse, shape[0], step, axis=0)
    return _linear_resample(rows, shape[1], step, axis=1)


def soft_step(signed_distance: np.ndarray, width: float) -> np.ndarray:
    """0 outside, 1 inside, a linear ramp ``width`` wide across the boundary (``signed_distance`` > 0 inside)."""
    return np.clip(signed_distance / width + 0.5, 0.0, 1.0).astype(np.float32)


def tissue_alpha(shape: tuple[int, int], spec: TissueSpec, px_per_um: float, rng: np.random.Generator) -> np.ndarray:
    """Coverage in [0, 1] of a few tissue pieces: perturbed ellipses with soft, irregular edges."""
    h, w = shape
    short = min(h, w)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    # tanh bounds the outline perturbation to +-roughness, so a piece never leaves its margin.
    wobble = np.tanh(smooth_noise(shape, spec.roughness_um * px_per_um, rng)) * np.float32(spec.roughness)
    alpha = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(spec.pieces[0], spec.pieces[1] + 1))):
        ry, rx = (rng.uniform(*spec.radius, size=2) * short).astype(np.float32)
        theta = rng.uniform(0, np.pi)
        # Keep the whole piece (with its bounding radius) inside the glass margin.
        r = max(rx, ry) * (1.0 + spec.roughness)
        lo_y, lo_x = spec.margin * h + r, spec.margin * w + r
        cy = rng.uniform(lo_y, max(lo_y, h - lo_y))
        cx = rng.uniform(lo_x, max(lo_x, w - lo_x))
        c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
        # Only the piece's bounding box (bounding radius + soft edge) can be covered.
        reach = r + spec.edge_um * px_per_um
        ys = slice(max(0, int(cy - reach)), min(h, int(np.ceil(cy + reach)) + 1))
        xs = slice(max(0, int(cx - reach)), min(w, int(np.ceil(cx + reach)) + 1))
        dy, dx = yy[ys] - np.float32(cy), xx[:, xs] - np.float32(cx)
        u = (dx * c + dy * s) / rx
        v = (dy * c - dx * s) / ry
        # Radius-normalised signed distance, scaled back to pixels for a soft edge of constant width.
        inside = (1.0 + wobble[ys, xs] - np.sqrt(u * u + v * v)) * min(rx, ry)
        np.maximum(alpha[ys, xs], soft_step(inside, spec.edge_um * px_per_um), out=alpha[ys, xs])
    return alpha


def blob(
    cy: float,
    cx: float,
    radii: tuple[float, float],
    theta: float,
    harmonics: np.ndarray,
    edge_px: float,
) -> tuple[np.ndarray, int, int]:
    """A soft ellipse with a wavy outline, as a small patch and its top-left corner (y0, x0).

    ``radii`` = (along ``theta``, across it); ``harmonics`` rows (k, amplitude, phase) add
    ``amplitude * cos(k * angle + phase)`` to the relative radius.
    """
    rx, ry = radii
    reach = max(rx, ry) * (1.0 + float(np.abs(harmonics[:, 1]).sum())) + edge_px
    y0, x0 = int(np.floor(cy - reach)), int(np.floor(cx - reach))
    side = int(np.ceil(2 * reach)) + 2
    dy = np.arange(y0, y0 + side, dtype=np.float32)[:, None] - np.float32(cy)
    dx = np.arange(x0, x0 + side, dtype=np.float32)[None, :] - np.float32(cx)
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    u = (dx * c + dy * s) / np.float32(rx)
    v = (dy * c - dx * s) / np.float32(ry)
    angle = np.arctan2(v, u)
    outline = np.ones_like(angle)
    for k, amplitude, phase in harmonics:
        outline += np.float32(amplitude) * np.cos(np.float32(k) * angle + np.float32(phase))
    return soft_step((outline - np.hypot(u, v)) * np.float32(min(rx, ry)), edge_px), y0, x0


def paste_max(dst: np.ndarray, patch: np.ndarray, y0: int, x0: int, scale: float = 1.0) -> None:
    """``dst[y0:, x0:] = max(dst, scale * patch)`` over the overlap (patches may hang off the edges)."""
    h, w = dst.shape
    py0, px0 = max(0, -y0), max(0, -x0)
    py1, px1 = min(patch.shape[0], h - y0), min(patch.shape[1], w - x0)
    if py1 <= py0 or px1 <= px0:
        return
    region = dst[y0 + py0 : y0 + py1, x0 + px0 : x0 + px1]
    np.maximum(region, np.float32(scale) * patch[py0:py1, px0:px1], out=region)


def random_harmonics(rng: np.random.Generator, wobble: float, orders: tuple[int, ...]) -> np.ndarray:
    """Rows (k, amplitude, phase) for :func:`blob`: amplitudes ~ N(0, wobble / sqrt(len(orders)))."""
    amplitudes = rng.normal(0.0, wobble / np.sqrt(len(orders)), len(orders))
    phases = rng.uniform(0.0, 2 * np.pi, len(orders))
    return np.stack([np.asarray(orders, float), amplitudes, phases], axis=1)
