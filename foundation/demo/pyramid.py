"""Aperio-style pyramidal TIFF: tiled JPEG levels, each half the previous, with the pixel size in two places.

Level 0 carries an Aperio ImageDescription (``Aperio Image Library ...|AppMag = ..|MPP = ..``), which
makes OpenSlide (vendor ``aperio``) and cuCIM read it as SVS; every level also carries X/YResolution
in pixels per centimetre, which generic TIFF readers (and cuCIM's ``spacing()``) use. Tiles are
standalone baseline JPEGs (YCbCr 4:2:0, no shared JPEGTables), as tifffile writes them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tifffile

APERIO_HEADER = "Aperio Image Library v12.0.15"  # OpenSlide and cuCIM key on the "Aperio" prefix
UM_PER_CM = 1e4


def downsample2(image: np.ndarray) -> np.ndarray:
    """Half-size image by 2 x 2 box averaging, rounding half up; odd edges are replicated (uint8 in and out)."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge").astype(np.uint16)
    total = padded[0::2, 0::2] + padded[1::2, 0::2] + padded[0::2, 1::2] + padded[1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)


def pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """``levels`` images: ``image`` and successive :func:`downsample2` halvings."""
    out = [image]
    for _ in range(levels - 1):
        out.append(downsample2(out[-1]))
    return out


def aperio_description(
    width: int, height: int, tile: int, quality: int, mpp: float, app_mag: float, extra: Mapping[str, str]
) -> str:
    """The level-0 ImageDescription: header line, then ``|key = value`` pairs (MPP, AppMag, ``extra``)."""
    pairs = {"AppMag": f"{app_mag:g}", "MPP": f"{mpp:g}", **extra}
    head = f"{APERIO_HEADER}\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/YCbCr Q={quality}"
    for key, value in pairs.items():
        if "|" in key + value or "=" in key:
            raise ValueError(f"Aperio description entry {key!r} = {value!r} must not contain '|' (nor '=' in the key)")
    return "|".join([head, *(f"{k} = {v}" for k, v in pairs.items())])


def write_pyramid_tiff(
    path: str | os.PathLike,
    image: np.ndarray,
    *,
    mpp: float,
    app_mag: float,
    tile: int,
    quality: int,
    levels: int,
    extra: Mapping[str, str] | None = None,
) -> list[tuple[int, int]]:
    """Write ``image`` (H, W, 3 uint8) as a tiled JPEG pyramid; returns the (width, height) of every level.

    The file appears atomically (written next to ``path``, then renamed), so an interrupted run
    never leaves a truncated slide behind.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{path}: expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    path = Path(path)
    height, width = image.shape[:2]
    tmp = path.with_name(path.name + ".partial")
    sizes = []
    try:
        with tifffile.TiffWriter(tmp, bigtiff=False) as tif:
            for i, level in enumerate(pyramid(image, levels)):
                h, w = level.shape[:2]
                level_mpp = mpp * width / w
                if i == 0:
                    description = aperio_description(width, height, tile, quality, mpp, app_mag, extra or {})
                else:
                    description = f"{APERIO_HEADER}\r\n{width}x{height} -> {w}x{h} JPEG/YCbCr Q={quality}"
                tif.write(
                    level,
                    photometric="rgb",
                    tile=(tile, tile),
                    compression="jpeg",
                    compressionargs={"level": quality},
                    subfiletype=0 if i == 0 else tifffile.FILETYPE.REDUCEDIMAGE,
                    description=description,
                    resolution=(UM_PER_CM / level_mpp, UM_PER_CM / level_mpp),
                    resolutionunit=tifffile.RESUNIT.CENTIMETER,
                    metadata=None,
                )
                sizes.append((w, h))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return sizes
