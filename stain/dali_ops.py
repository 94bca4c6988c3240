"""DALI adapter of the stain and photometric augmentations (same definitions as the torch references).

Call the builders inside a pipeline definition. Per-sample parameters are drawn on the host
(:func:`stain.augment.sample_stain_params`, :func:`stain.photometric.sample_photometric_params`) from the
pipeline's own seeded generator, converted with :func:`stain_dali_args` / :func:`photometric_dali_args`, and fed
through ``fn.external_source`` (CPU) nodes. Matrix arguments of ``coord_transform`` must stay on the CPU;
the builders move per-sample scalars to the GPU themselves when ``device="gpu"``.

Images are ``HWC`` RGB. :func:`stain_augment` takes uint8 and returns float levels in ``[0, 255]``;
:func:`photometric_augment` takes uint8 or float levels and returns float levels in ``[0, 255]``.
"""

from __future__ import annotations

import math

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali.data_node import DataNode

from stain.deconvolution import MAX_LEVEL, od_lookup_table
from stain.photometric import LUMA_WEIGHTS, PhotometricParams

DEVICES = ("cpu", "gpu")
#: names (and order) of the per-sample inputs of :func:`photometric_augment`
PHOTOMETRIC_INPUTS = ("color_matrix", "mean_weight", "blur_window", "blur_sigma", "solarize")


def _on(node: DataNode, device: str) -> DataNode:
    if device not in DEVICES:
        raise ValueError(f"device={device!r}; choose one of {DEVICES}")
    return node.gpu() if device == "gpu" and node.device != "gpu" else node


def _column_major(m: np.ndarray) -> np.ndarray:
    """Row-vector matrices ``x @ M`` -> ``coord_transform``'s ``out = M' * in``: ``[..., 3, 3]`` float32,
    C-contiguous (a batch of them, or any slice along the leading axes, feeds DALI as is)."""
    return np.ascontiguousarray(np.swapaxes(np.asarray(m), -1, -2), dtype=np.float32)


def stain_dali_args(m: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(M, T)`` for :func:`stain_augment` from :func:`~stain.augment.sample_stain_params` output.

    ``m`` is ``[..., 3, 3]`` and ``t`` ``[..., 3]`` with the same leading axes (a batch ``[N]``, or ``[C, N]`` for
    one batch per crop); float32, C-contiguous. ``M`` is transposed to DALI's column convention; ``ln(255)`` is
    folded into ``T`` so the output step is a single ``exp`` (``exp(-(OD' - ln 255)) = 255 * exp(-OD')``).
    """
    m, t = np.asarray(m), np.asarray(t)
    if m.ndim < 3 or m.shape[-2:] != (3, 3) or t.shape != m.shape[:-1]:
        raise ValueError(f"M must be [N, 3, 3] and T [N, 3], got {m.shape} and {t.shape}")
    return _column_major(m), np.ascontiguousarray(t - math.log(MAX_LEVEL), dtype=np.float32)


def stain_augment(images: DataNode, m: DataNode, t: DataNode, device: str = "cpu") -> DataNode:
    """``255 * exp(-(OD @ M + T))`` per sample, clipped to 255: uint8 ``HWC`` in, float levels out.

    ``m`` and ``t`` are CPU nodes fed with :func:`stain_dali_args` output. The log is a 256-entry table lookup.
    """
    images = _on(images, device)
    od = fn.lookup_table(images, keys=list(range(int(MAX_LEVEL) + 1)),
                         values=od_lookup_table().astype(np.float32).tolist(), dtype=types.FLOAT)
    shifted = fn.coord_transform(od, M=m, T=t)
    return dmath.min(dmath.exp(-shifted), MAX_LEVEL)


def photometric_dali_args(params: PhotometricParams) -> dict[str, np.ndarray]:
    """One batch array per :data:`PHOTOMETRIC_INPUTS` node of :func:`photometric_augment`."""
    return {
        "color_matrix": _column_major(params.color_matrix),
        "mean_weight": np.ascontiguousarray(params.mean_weight, dtype=np.float32),
        "blur_window": np.ascontiguousarray(params.blur_window, dtype=np.int32),
        "blur_sigma": np.ascontiguousarray(params.blur_sigma, dtype=np.float32),
        "solarize": np.ascontiguousarray(params.solarize, dtype=np.float32),
    }


def _clip(x: DataNode) -> DataNode:
    return dmath.clamp(x, 0.0, MAX_LEVEL)


def color_affine(images: DataNode, color_matrix: DataNode, mean_weight: DataNode, device: str = "cpu") -> DataNode:
    """Colour jitter and grayscale as one map per sample: ``clip(x @ A + k * mean grey level of x)``."""
    x = _on(images, device)
    grey = fn.coord_transform(x, M=LUMA_WEIGHTS.astype(np.float32).tolist())
    offset = _on(mean_weight, device) * fn.reductions.mean(grey)
    return _clip(fn.coord_transform(x, M=color_matrix) + offset)


def gaussian_blur(images: DataNode, window: DataNode, sigma: DataNode, device: str = "cpu") -> DataNode:
    """Gaussian blur with per-sample window (1 = unchanged) and sigma."""
    return fn.gaussian_blur(_on(images, device), window_size=window, sigma=sigma)


def solarize(images: DataNode, flags: DataNode, threshold: float, device: str = "cpu") -> DataNode:
    """``255 - x`` where ``x >= threshold``, for samples whose flag is 1."""
    x = _on(images, device)
    on = _on(flags, device) * (x >= threshold)
    return x + on * (MAX_LEVEL - 2.0 * x)


def photometric_augment(images: DataNode, inputs: dict[str, DataNode], solarize_threshold: float,
                        device: str = "cpu") -> DataNode:
    """The whole generic chain of :func:`stain.photometric.apply_photometric`; ``inputs`` keyed by
    :data:`PHOTOMETRIC_INPUTS` (fed with :func:`photometric_dali_args`)."""
    missing = [k for k in PHOTOMETRIC_INPUTS if k not in inputs]
    if missing:
        raise KeyError(f"photometric_augment: missing inputs {missing}")
    x = color_affine(images, inputs["color_matrix"], inputs["mean_weight"], device)
    x = gaussian_blur(x, inputs["blur_window"], inputs["blur_sigma"], device)
    return solarize(x, inputs["solarize"], solarize_threshold, device)
