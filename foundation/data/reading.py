"""Reading a sample's region, by one of two paths chosen per slide.

* **raw-tile path** (JPEG-tiled TIFF/SVS): the compressed tiles covering the region are handed to DALI, which
  decodes only the needed part of each (``decoders.image_slice``) and concatenates the parts. The region is cut into
  a fixed ``slots x slots`` grid of pieces, each inside one tile (a piece may share its tile with a neighbour), so
  one static DALI graph assembles any region that spans at most ``slots`` tiles per axis.
* **region path** (everything else: JPEG 2000, DICOM, OpenSlide-only formats, regions spanning more tiles):
  ``read_region`` of :mod:`foundation.slides.readers` returns decoded pixels.

GPU colour trap (STACK.md): Aperio tiles stored as RGB-photometric JPEG decode with wrong colours on the GPU
(nvJPEG assumes YCbCr; the Adobe APP14 marker that fixes the CPU decoder does not fix nvJPEG). On ``device=gpu``
slides whose raw levels are RGB-photometric therefore take the region path; YCbCr slides decode on the GPU. On
the CPU both photometrics decode correctly from :meth:`RawTileSource.jpeg`'s standalone streams.

A slide that cannot be opened, a truncated tile or a failed ``read_region`` raises :class:`ReadError`; the batch
source replaces the sample and counts it.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from foundation.data.crops import Region
from foundation.slides.tiff_tiles import JPEG_EOI, JPEG_SOI

log = logging.getLogger(__name__)

RAW_TILE_MODES = ("auto", "always", "never")


class ReadError(RuntimeError):
    """A slide, tile or region that could not be read; the message names the slide and the region."""


@dataclass(frozen=True)
class SlideInfo:
    """What the data path needs of one index slide record."""

    slide_id: str
    path: str
    mpp: float
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    stain_id: int
    marker_id: int

    @classmethod
    def from_record(cls, record: Any) -> SlideInfo:
        return cls(
            slide_id=str(record.slide_id), path=str(record.path),
            mpp=float(record.mpp) if record.mpp is not None else float("nan"),
            level_dimensions=tuple((int(w), int(h)) for w, h in record.level_dimensions),
            level_downsamples=tuple(float(d) for d in record.level_downsamples),
            stain_id=int(record.stain_id), marker_id=int(record.marker_id),
        )


def split_span(start: int, length: int, tile: int, slots: int) -> list[tuple[int, int, int]] | None:
    """``[start, start + length)`` as ``slots`` pieces ``(tile index, offset in tile, length)``, each in one tile.

    Pieces follow tile boundaries; when the span crosses fewer tiles than ``slots`` the longest pieces are halved
    until there are ``slots``. ``None`` when the span crosses more tiles than ``slots`` or is shorter than it.
    """
    if length < slots:
        return None
    first, last = start // tile, (start + length - 1) // tile
    if last - first + 1 > slots:
        return None
    bounds = [start] + [t * tile for t in range(first + 1, last + 1)] + [start + length]
    pieces = [(a, b) for a, b in itertools.pairwise(bounds)]
    while len(pieces) < slots:
        i = max(range(len(pieces)), key=lambda k: pieces[k][1] - pieces[k][0])
        a, b = pieces[i]
        mid = (a + b) // 2
        pieces[i : i + 1] = [(a, mid), (mid, b)]
    return [(a // tile, a - (a // tile) * tile, b - a) for a, b in pieces]


@dataclass(frozen=True)
class RawPieces:
    """The ``slots x slots`` pieces of a region, row-major: JPEG streams and ``(x, y, w, h)`` inside each tile."""

    jpegs: list[np.ndarray]
    rects: np.ndarray  # [slots * slots, 4] int32


def _check_jpeg(data: bytes, where: str) -> np.ndarray:
    # A truncated or zeroed tile is caught here, on the host: inside DALI a decode error would stop the pipeline.
    if len(data) < len(JPEG_SOI) + len(JPEG_EOI) or not data.startswith(JPEG_SOI) or not data.rstrip(b"\0").endswith(
            JPEG_EOI):
        raise ReadError(f"{where}: not a complete JPEG stream ({len(data)} bytes)")
    return np.frombuffer(data, dtype=np.uint8)


class SlideHandles:
    """Readers of the index slides, opened on first use and kept open, at most ``max_open`` (one set per process).

    A slide that fails to open is remembered and never retried by this process (its samples are replaced).
    """

    def __init__(self, slides: Sequence[SlideInfo], reader: str = "auto", max_open: int = 256) -> None:
        if max_open < 1:
            raise ValueError(f"data.pipeline.max_open_slides={max_open} must be >= 1")
        self.slides = list(slides)
        self.reader = reader
        self.max_open = max_open
        self._open_handles: OrderedDict[tuple[str, int], Any] = OrderedDict()  # least recently used first
        self._broken: dict[int, str] = {}
        self._pid = os.getpid()

    @property
    def open_count(self) -> int:
        return len(self._open_handles)

    def _describe(self, slide: int) -> str:
        info = self.slides[slide]
        return f"slide {info.slide_id!r} ({info.path})"

    def _open(self, kind: str, slide: int, opener: Callable[[SlideInfo], Any]) -> Any:
        if os.getpid() != self._pid:
            # a forked reader process: handles inherited from the parent share file offsets with it, so reopen
            self._open_handles, self._pid = OrderedDict(), os.getpid()
        if slide in self._broken:
            raise ReadError(f"{self._describe(slide)} could not be opened: {self._broken[slide]}")
        key = (kind, slide)
        if key in self._open_handles:
            self._open_handles.move_to_end(key)
            return self._open_handles[key]
        try:
            handle = opener(self.slides[slide])
        except Exception as err:  # any reader error: the slide is skipped, not the run
            self._broken[slide] = f"{type(err).__name__}: {err}"
            log.warning("skipping %s: %s", self._describe(slide), self._broken[slide])
            raise ReadError(f"{self._describe(slide)} could not be opened: {self._broken[slide]}") from err
        self._open_handles[key] = handle
        while len(self._open_handles) > self.max_open:
            _, oldest = self._open_handles.popitem(last=False)
            _close(oldest)
        return handle

    def region_reader(self, slide: int) -> Any:
        from foundation.slides.readers import open_slide

        def opener(info: SlideInfo) -> Any:
            mpp = info.mpp if np.isfinite(info.mpp) else None
            return open_slide(info.path, reader=self.reader, mpp=mpp)

        return self._open("region", slide, opener)

    def raw_source(self, slide: int) -> Any | None:
        """The slide's :class:`RawTileSource`, or ``None`` when it is not JPEG-tiled."""
        from foundation.slides.raw_tiles import RawTileSource

        return self._open("raw", slide, lambda info: RawTileSource.open(info.path))

    def read_region(self, slide: int, region: Region) -> np.ndarray:
        """Decoded ``side x side x 3`` uint8 RGB pixels of ``region``."""
        reader = self.region_reader(slide)
        where = f"{self._describe(slide)} level {region.level} at ({region.x}, {region.y}) side {region.side}"
        try:
            pixels = reader.read_region((region.x, region.y), region.level, (region.side, region.side))
        except Exception as err:  # a corrupt or truncated region: replaced by the caller
            raise ReadError(f"{where}: {type(err).__name__}: {err}") from err
        pixels = np.asarray(pixels)
        if pixels.shape != (region.side, region.side, 3) or pixels.dtype != np.uint8:
            raise ReadError(f"{where}: reader returned {pixels.shape} {pixels.dtype}, expected "
                            f"({region.side}, {region.side}, 3) uint8")
        return pixels

    def raw_pieces(self, slide: int, region: Region, slots: int) -> RawPieces | None:
        """The compressed pieces of ``region``; ``None`` when it spans more than ``slots`` tiles per axis."""
        source = self.raw_source(slide)
        if source is None:
            return None
        downsample = self.slides[slide].level_downsamples[region.level]
        x = math.floor(region.x / downsample)  # as SlideReader.read_region: both paths read the same pixels
        y = math.floor(region.y / downsample)
        tile_w, tile_h = (int(v) for v in source.tile_shape(region.level))
        cols = split_span(x, region.side, tile_w, slots)
        rows = split_span(y, region.side, tile_h, slots)
        if cols is None or rows is None:
            return None
        where = f"{self._describe(slide)} level {region.level}"
        cache: dict[tuple[int, int], np.ndarray] = {}
        jpegs, rects = [], []
        for row, oy, h in rows:
            for col, ox, w in cols:
                if (col, row) not in cache:
                    if not source.has_tile(region.level, col, row):
                        return None  # a tile the file does not store reads as white: the region path does that
                    try:
                        data = source.jpeg(region.level, col, row)
                    except Exception as err:  # truncated file, bad offsets: replaced by the caller
                        raise ReadError(f"{where} tile ({col}, {row}): {type(err).__name__}: {err}") from err
                    cache[col, row] = _check_jpeg(bytes(data), f"{where} tile ({col}, {row})")
                jpegs.append(cache[col, row])
                rects.append((ox, oy, w, h))
        return RawPieces(jpegs=jpegs, rects=np.asarray(rects, dtype=np.int32))

    def close(self) -> None:
        while self._open_handles:
            _close(self._open_handles.popitem()[1])


def _close(handle: Any) -> None:
    close = getattr(handle, "close", None)  # None stands for "not JPEG-tiled": nothing to close
    if close is not None:
        close()


@dataclass(frozen=True)
class PathPlan:
    """Which slides take the raw-tile path, the piece grid, and the graph variant it needs."""

    raw: np.ndarray  # [num_slides] bool
    slots: int
    graph: str       # "region" | "raw" | "mixed"


def plan_paths(handles: SlideHandles, sides: np.ndarray, slide_of_entry: np.ndarray, device: str, mode: str,
               magnification: str) -> PathPlan:
    """Choose the path of every slide (see the module docstring) and the smallest piece grid that fits.

    ``auto`` takes the raw-tile path on the GPU only: on the CPU, DALI's libjpeg-turbo decode of the pieces and the
    readers' decode cost the same (measured equal on the 2-core machine), so the simpler region path is kept there;
    ``always`` takes it wherever the slide allows (CPU included: tests compare both paths bit for bit); ``never``
    nowhere.
    """
    if mode not in RAW_TILE_MODES:
        raise ValueError(f"data.pipeline.raw_tiles={mode!r}; choose one of {RAW_TILE_MODES}")
    n = len(handles.slides)
    raw = np.zeros(n, dtype=bool)
    tile_min = None
    if mode == "always" or (mode == "auto" and device == "gpu"):
        for s in range(n):
            try:
                source = handles.raw_source(s)
            except ReadError:
                continue  # counted and replaced when sampled
            levels = [tuple(d) for d in handles.slides[s].level_dimensions]
            if source is None or [tuple(d) for d in source.level_dimensions[:len(levels)]] != levels:
                continue  # not JPEG-tiled, or the index's levels are not the TIFF's pyramid: region path
            photometrics = {source.photometric(level) for level in range(len(levels))}
            raw[s] = device == "cpu" or photometrics == {"ycbcr"}
            if raw[s]:
                smallest = min(min(source.tile_shape(level)) for level in range(len(levels)))
                tile_min = smallest if tile_min is None else min(tile_min, smallest)
    if tile_min is None:
        return PathPlan(raw=raw, slots=0, graph="region")
    side_max = int(np.max(sides[raw[slide_of_entry]]))
    slots = -(-(side_max - 1) // tile_min) + 1
    uniform = bool(raw.all()) and magnification == "index"
    return PathPlan(raw=raw, slots=slots, graph="raw" if uniform else "mixed")
