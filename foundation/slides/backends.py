"""The three slide backends behind :class:`~foundation.slides.readers.SlideReader`.

Each constructor opens the file and decodes one pixel of the smallest level, so a backend that
opens a file it cannot actually decode (e.g. cuCIM on a truncated TIFF) fails at open time and the
automatic choice moves on to the next backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from foundation.slides.errors import SlideError
from foundation.slides.readers import SlideReader
from foundation.slides.tiff_tiles import FILL, TiledTiff

_OPAQUE = 255


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = str(value)


class _Probed(SlideReader):
    def _probe(self) -> None:
        """Decode one pixel of the smallest level; any failure means this backend cannot read the file."""
        last = self.level_count - 1
        try:
            self._read(last, 0, 0, 1, 1)
        except Exception as err:
            self.close()
            raise SlideError(self.path, f"opens it but cannot decode pixels: {err}") from err


class CucimReader(_Probed):
    """cuCIM ``CuImage`` on the CPU: Aperio SVS, generic tiled TIFF, Philips TIFF."""

    backend = "cucim"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        from cucim import CuImage

        try:
            self._image = CuImage(str(path))
            resolutions = self._image.resolutions
        except Exception as err:  # cuCIM raises ValueError/RuntimeError with libtiff's reason
            raise SlideError(path, f"cannot open it: {err}") from err
        self.level_dimensions = [(int(w), int(h)) for w, h in resolutions["level_dimensions"]]
        self.level_downsamples = [float(d) for d in resolutions["level_downsamples"]]
        _flatten("", self._image.metadata, self.properties)
        self._probe()

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        # cuCIM maps level-0 x to level pixel floor(x / downsample); ceil() lands on exactly pixel x.
        ds = self.level_downsamples[level]
        x0, y0 = math.ceil(x * ds), math.ceil(y * ds)
        return np.asarray(self._image.read_region(location=(x0, y0), size=(w, h), level=level))

    def close(self) -> None:
        image = getattr(self, "_image", None)
        if image is not None:
            image.close()
            self._image = None


class OpenSlideReader(_Probed):
    """OpenSlide: DICOM, NDPI, MRXS, SCN, BIF, SVS, generic TIFF, ... (RGBA composited onto white)."""

    backend = "openslide"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        import openslide

        try:
            self._slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as err:
            raise SlideError(path, f"cannot open it: {err}") from err
        self.level_dimensions = [(int(w), int(h)) for w, h in self._slide.level_dimensions]
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        self.properties = dict(self._slide.properties)
        self._probe()

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        # OpenSlide interpolates fractional level offsets; round() keeps the offset below half a pixel.
        rgba = np.asarray(self._slide.read_region((round(x * ds), round(y * ds)), level, (w, h)))
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        if np.all(alpha == _OPAQUE):
            return np.ascontiguousarray(rgb)
        # Transparent pixels (outside the scanned area) become white glass.
        blended = (rgb.astype(np.uint16) * alpha + FILL * (_OPAQUE - alpha.astype(np.uint16)) + _OPAQUE // 2)
        return (blended // _OPAQUE).astype(np.uint8)

    def close(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
            self._slide = None


class TifffileReader(_Probed):
    """tifffile + imagecodecs, tile by tile: TIFF pyramids of any layout (OME SubIFDs, SVS, generic)."""

    backend = "tifffile"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._tiles = TiledTiff(path)
        w0, h0 = self._tiles.levels[0].width, self._tiles.levels[0].height
        self.level_dimensions = [(lvl.width, lvl.height) for lvl in self._tiles.levels]
        # Same convention as OpenSlide: the mean of the width and height ratios.
        self.level_downsamples = [(w0 / w + h0 / h) / 2 for w, h in self.level_dimensions]
        page = self._tiles.tif.pages.first
        for tag in page.tags:
            if isinstance(tag.value, (str, int, float)):
                self.properties[f"tiff.{tag.name}"] = str(tag.value)
        self._probe()

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._tiles.read_region(level, x, y, w, h)

    def close(self) -> None:
        tiles = getattr(self, "_tiles", None)
        if tiles is not None:
            tiles.close()
            self._tiles = None
