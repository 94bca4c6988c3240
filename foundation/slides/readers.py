"""One slide-reader interface over cuCIM, OpenSlide and tifffile, chosen per slide.

``open_slide(path)`` picks the backend automatically: tifffile for TIFF pyramids whose reduced levels
are stored as SubIFDs (OME-TIFF; cuCIM and OpenSlide see only level 0 there), otherwise cuCIM (Aperio
SVS, generic tiled TIFF, Philips TIFF), then OpenSlide (DICOM, NDPI, MRXS, SCN, BIF, ...), then
tifffile. ``reader=`` forces one by name.

Coordinates: ``read_region`` takes the top-left in level-0 pixels and the size in pixels of the
level read, like OpenSlide and cuCIM. The level pixel is ``floor(x / downsample)``; what lies outside
the slide reads as white (255), whichever backend.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from foundation.slides import pixel_size
from foundation.slides.errors import SlideError
from foundation.slides.tiff_tiles import FILL

__all__ = ["BACKENDS", "SlideError", "SlideReader", "open_slide"]


class SlideReader(ABC):
    """A whole-slide image: pyramid geometry, level-0 pixel size and RGB region reads."""

    backend: str = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.level_dimensions: list[tuple[int, int]] = []
        self.level_downsamples: list[float] = []
        self.properties: dict[str, str] = {}
        self.mpp: float = math.nan
        self.mpp_source: str = ""

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        """µm/px of a pyramid level."""
        return self.mpp * self.level_downsamples[level]

    @abstractmethod
    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """HxWx3 uint8 of a rectangle in level coordinates that lies wholly inside the level."""

    @abstractmethod
    def close(self) -> None:
        """Release the file."""

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """HxWx3 uint8 RGB of ``size`` (w, h) level pixels whose top-left is ``location`` (level-0 x, y)."""
        if not 0 <= level < self.level_count:
            raise SlideError(self.path, f"level {level} does not exist (levels 0..{self.level_count - 1})")
        ds = self.level_downsamples[level]
        return self.read_rect(level, math.floor(location[0] / ds), math.floor(location[1] / ds), *size)

    def read_rect(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """HxWx3 uint8 RGB of a rectangle in the level's own pixel coordinates (white outside the level)."""
        if not 0 <= level < self.level_count:
            raise SlideError(self.path, f"level {level} does not exist (levels 0..{self.level_count - 1})")
        w, h = int(w), int(h)
        if w <= 0 or h <= 0:
            raise SlideError(self.path, f"region size must be positive, got {(w, h)}")
        level_w, level_h = self.level_dimensions[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, level_w), min(y + h, level_h)
        if (x0, y0, x1, y1) == (x, y, x + w, y + h):
            return self._checked(self._read(level, x, y, w, h), w, h)
        out = np.full((h, w, 3), FILL, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._checked(self._read(level, x0, y0, x1 - x0, y1 - y0),
                                                             x1 - x0, y1 - y0)
        return out

    def read_level(self, level: int) -> np.ndarray:
        """A whole pyramid level as HxWx3 uint8 RGB (for thumbnails: pick a small level)."""
        w, h = self.level_dimensions[level]
        return self.read_rect(level, 0, 0, w, h)

    def _checked(self, array: np.ndarray, w: int, h: int) -> np.ndarray:
        if array.shape != (h, w, 3) or array.dtype != np.uint8:
            raise SlideError(self.path, f"{self.backend} returned {array.dtype} {array.shape}, expected ({h}, {w}, 3)")
        return array

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, mpp={self.mpp:.4g} from {self.mpp_source}, "
                f"levels={self.level_dimensions})")


def _subifd_pyramid(path: Path) -> bool:
    """True for a TIFF whose reduced levels are SubIFDs of the first page (OME-TIFF style)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.pages.first.subifds) and len(tif.series[0].levels) > 1
    except (tifffile.TiffFileError, ValueError, IndexError, KeyError, OSError):
        return False


def _check_file(path: Path) -> None:
    if not path.exists():
        raise SlideError(path, "file not found")
    if not path.is_file():
        raise SlideError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise SlideError(path, "empty file (0 bytes)")


def _set_mpp(reader: SlideReader, mpp: float | None) -> None:
    if mpp is not None:
        if not (mpp > 0 and math.isfinite(mpp)):
            raise SlideError(reader.path, f"pixel size override must be a positive number of µm/px, got {mpp!r}")
        reader.mpp, reader.mpp_source = float(mpp), "override"
        return
    try:
        found = pixel_size.find_mpp(reader.path, reader.properties)
    except Exception as err:  # pydicom/tifffile raise many types on malformed headers
        raise SlideError(reader.path, f"cannot read the pixel size: {err}") from err
    if found is None:
        raise SlideError(reader.path, "no pixel size in the file (looked for Aperio MPP, OME PhysicalSizeX, "
                                      "Philips/DICOM pixel spacing, openslide.mpp-x, TIFF resolution): "
                                      "give it in the manifest's mpp column")
    reader.mpp, reader.mpp_source = found


def _backends() -> dict[str, type[SlideReader]]:
    from foundation.slides.backends import CucimReader, OpenSlideReader, TifffileReader

    return {"cucim": CucimReader, "openslide": OpenSlideReader, "tifffile": TifffileReader}


BACKENDS = ("cucim", "openslide", "tifffile")


def open_slide(path: str | os.PathLike, reader: str = "auto", mpp: float | None = None) -> SlideReader:
    """Open a slide with ``reader`` (``auto`` or a backend name); ``mpp`` overrides the file's pixel size.

    Raises :class:`SlideError` naming the file when no backend can read it or it has no pixel size.
    """
    path = Path(path)
    if reader != "auto" and reader not in BACKENDS:
        raise ValueError(f"unknown slide reader {reader!r}; choose auto or one of {list(BACKENDS)}")
    _check_file(path)
    backends = _backends()
    if reader != "auto":
        order = [reader]
    elif _subifd_pyramid(path):
        order = ["tifffile", "cucim", "openslide"]
    else:
        order = ["cucim", "openslide", "tifffile"]
    reasons = []
    for name in order:
        try:
            opened = backends[name](path)
        except SlideError as err:
            reasons.append(f"{name}: {err.reason}")
            continue
        try:
            _set_mpp(opened, mpp)
        except SlideError:
            opened.close()
            raise
        return opened
    if len(reasons) == 1:
        raise SlideError(path, reasons[0])
    raise SlideError(path, "no reader can open it (" + "; ".join(reasons) + ")")
