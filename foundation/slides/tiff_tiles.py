"""Tile geometry and tile bytes of a pyramidal TIFF's levels, read with tifffile.

The levels are those of the first series (``series[0].levels``): this covers Aperio SVS, generic
tiled pyramids and OME-TIFF pyramids stored as SubIFDs. Strips are treated as full-width tiles.
Regions are assembled from whole tiles; what lies outside the level reads as ``FILL``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from foundation.slides.errors import SlideError

FILL = 255  # outside the slide reads as white glass
_PLANAR_CONTIG = 1
_RGB_SAMPLES = 3
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"  # also the JPEG 2000 end-of-codestream marker
_J2K_SOC = b"\xff\x4f"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "
# How a tile's compressed stream starts, by TIFF compression: JPEG, Aperio JPEG 2000 (YCbCr, RGB), JPEG 2000
# (a codestream or a JP2 file). Every stream ends with JPEG_EOI.
STREAM_STARTS: dict[int, tuple[bytes, ...]] = {
    7: (JPEG_SOI,), 33003: (_J2K_SOC,), 33005: (_J2K_SOC,), 34712: (_J2K_SOC, _JP2_SIGNATURE),
}
_STREAM_TAIL = 8  # bytes searched for the end marker: some writers pad a stream after it


def is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in TIFF_MAGIC


@dataclass(frozen=True)
class TiledLevel:
    """One pyramid level: its page, size and the grid of tiles (or strips) it is stored in."""

    page: tifffile.TiffPage
    width: int
    height: int
    tile_width: int
    tile_height: int
    cols: int
    rows: int
    offsets: tuple[int, ...]
    bytecounts: tuple[int, ...]

    @classmethod
    def from_page(cls, page: tifffile.TiffPage, path: Path) -> TiledLevel:
        if page.planarconfig != _PLANAR_CONTIG and page.samplesperpixel > 1:
            raise SlideError(path, "separate colour planes (PlanarConfiguration 2) are not supported")
        height, width = int(page.imagelength), int(page.imagewidth)
        if page.is_tiled:
            tile_height, tile_width = int(page.tilelength), int(page.tilewidth)
        else:
            tile_height, tile_width = min(int(page.rowsperstrip), height), width
        cols = -(-width // tile_width)
        rows = -(-height // tile_height)
        if len(page.dataoffsets) != cols * rows:
            raise SlideError(path, f"level {width}x{height}: {len(page.dataoffsets)} tiles, expected {cols * rows}")
        return cls(page, width, height, tile_width, tile_height, cols, rows,
                   tuple(int(v) for v in page.dataoffsets), tuple(int(v) for v in page.databytecounts))

    def tiles_for_region(self, x: int, y: int, w: int, h: int) -> list[tuple[int, int]]:
        """(col, row) of the stored tiles that the level-coordinate rectangle touches, row-major."""
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        if x1 <= x0 or y1 <= y0:
            return []
        cols = range(x0 // self.tile_width, (x1 - 1) // self.tile_width + 1)
        rows = range(y0 // self.tile_height, (y1 - 1) // self.tile_height + 1)
        return [(c, r) for r in rows for c in cols]

    def tile_origin(self, col: int, row: int) -> tuple[int, int]:
        return col * self.tile_width, row * self.tile_height

    def tile_index(self, col: int, row: int) -> int:
        if not (0 <= col < self.cols and 0 <= row < self.rows):
            raise IndexError(f"tile ({col}, {row}) outside the {self.cols}x{self.rows} grid")
        return row * self.cols + col


class TiledTiff:
    """A TIFF pyramid's levels with thread-safe raw tile reads (``os.pread``) and region assembly."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.tif = tifffile.TiffFile(self.path)
            series = self.tif.series[0]
            self.levels = [TiledLevel.from_page(level.keyframe, self.path) for level in series.levels]
        except (tifffile.TiffFileError, ValueError, IndexError, KeyError, OSError) as err:
            self.close()
            raise SlideError(self.path, f"tifffile cannot parse it: {err}") from err
        self._fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        if getattr(self, "tif", None) is not None:
            self.tif.close()

    def tile_bytes(self, level: int, col: int, row: int) -> bytes:
        """The stored (compressed) bytes of one tile; empty for a tile the file does not hold."""
        lvl = self.levels[level]
        index = lvl.tile_index(col, row)
        count = lvl.bytecounts[index]
        if count == 0:
            return b""
        data = os.pread(self._fd, count, lvl.offsets[index])
        if len(data) != count:
            raise SlideError(self.path, f"level {level} tile ({col}, {row}) is truncated: "
                                        f"{len(data)} of {count} bytes at offset {lvl.offsets[index]}")
        return data

    def damaged_tiles(self, level: int) -> list[tuple[int, int]]:
        """(col, row) of the stored tiles whose stream lacks its start or end marker (JPEG, JPEG 2000 levels).

        Two small reads per tile. They catch zeroed, overwritten and cut-off tiles, which region readers return as
        black pixels without an error; damage inside the entropy-coded data is not caught.
        """
        lvl = self.levels[level]
        starts = STREAM_STARTS.get(int(lvl.page.compression))
        if starts is None:
            return []
        head = max(len(s) for s in starts)
        damaged = []
        for index, (offset, count) in enumerate(zip(lvl.offsets, lvl.bytecounts, strict=True)):
            if count == 0:
                continue  # not stored: reads as glass
            tail = min(count, _STREAM_TAIL)
            if (count < head + len(JPEG_EOI) or not os.pread(self._fd, head, offset).startswith(starts)
                    or JPEG_EOI not in os.pread(self._fd, tail, offset + count - tail)):
                damaged.append((index % lvl.cols, index // lvl.cols))
        return damaged

    def decode_tile(self, level: int, col: int, row: int) -> np.ndarray | None:
        """One tile decoded by tifffile (any compression imagecodecs knows) as HxWx3 uint8, or None if absent."""
        lvl = self.levels[level]
        data = self.tile_bytes(level, col, row)
        if not data:
            return None
        try:
            tile, _, shape = lvl.page.decode(data, lvl.tile_index(col, row), jpegtables=lvl.page.jpegtables)
        except Exception as err:  # imagecodecs raises codec-specific error classes
            raise SlideError(self.path, f"level {level} tile ({col}, {row}) does not decode: {err}") from err
        return to_rgb(np.asarray(tile).reshape(shape[1:]), self.path)

    def read_region(self, level: int, x: int, y: int, w: int, h: int,
                    decode: Callable[[int, int, int], np.ndarray | None] | None = None) -> np.ndarray:
        """Level-coordinate rectangle as HxWx3 uint8 assembled from decoded tiles (``decode`` per tile)."""
        decode = decode or self.decode_tile
        lvl = self.levels[level]
        out = np.full((h, w, _RGB_SAMPLES), FILL, dtype=np.uint8)
        for col, row in lvl.tiles_for_region(x, y, w, h):
            tile = decode(level, col, row)
            if tile is None:
                continue
            tx, ty = lvl.tile_origin(col, row)
            # Tiles on the right/bottom edge are padded beyond the level; clip to level and region.
            x0, y0 = max(x, tx), max(y, ty)
            x1 = min(x + w, tx + tile.shape[1], lvl.width)
            y1 = min(y + h, ty + tile.shape[0], lvl.height)
            out[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - ty:y1 - ty, x0 - tx:x1 - tx]
        return out


def to_rgb(array: np.ndarray, path: Path) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 uint8 as HxWx3 (grey replicated, alpha dropped)."""
    if array.dtype != np.uint8:
        raise SlideError(path, f"pixel type {array.dtype} is not supported (8-bit samples only)")
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        return np.repeat(array, _RGB_SAMPLES, axis=-1)
    return np.ascontiguousarray(array[..., :_RGB_SAMPLES])


def check_tile_streams(path: str | os.PathLike) -> None:
    """Raise :class:`SlideError` naming the damaged tiles of a JPEG / JPEG 2000 TIFF pyramid (:meth:`damaged_tiles`).

    Files that are not TIFF, or that tifffile cannot lay out as tiled levels, are left to their reader.
    """
    path = Path(path)
    if not is_tiff(path):
        return
    try:
        tiff = TiledTiff(path)
    except SlideError:
        return
    with contextlib.closing(tiff):
        for level in range(len(tiff.levels)):
            damaged = tiff.damaged_tiles(level)
            if damaged:
                lvl = tiff.levels[level]
                raise SlideError(path, f"level {level}: {len(damaged)} of {lvl.cols * lvl.rows} tiles are damaged "
                                       f"(no complete compressed stream), first at tile (col, row) {damaged[0]}")
