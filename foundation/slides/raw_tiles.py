"""Raw JPEG tiles of a pyramidal TIFF, as standalone JPEG streams for GPU decoding (nvJPEG / DALI).

A TIFF JPEG tile is an abbreviated stream whose quantisation and Huffman tables live in the page's
JPEGTables tag; ``tables[:-2] + tile[2:]`` is a standalone JPEG. Aperio often stores tiles with TIFF
photometric RGB: the JPEG components are R, G, B, with no marker saying so, and decoders that assume
YCbCr get the colours wrong. For those tiles an Adobe APP14 marker with transform 0 ("no colour
transform") is inserted, which CPU decoders (libjpeg, PIL) honour. GPU decoders may ignore it (see
``photometric``): the caller must pick its colour handling per slide from ``photometric(level)``.

All coordinates here are in the level's own pixel grid (not level-0).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from foundation.slides.errors import SlideError
from foundation.slides.tiff_tiles import JPEG_EOI, JPEG_SOI, TiledTiff, is_tiff, to_rgb

_COMPRESSION_JPEG = 7
_PHOTOMETRIC = {2: "rgb", 6: "ycbcr"}
# APP14 "Adobe": length 14, version 100, flags0 0, flags1 0, transform 0 (components are RGB, not YCbCr).
ADOBE_RGB_MARKER = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def _has_adobe_marker(stream: bytes) -> bool:
    i = stream.find(b"\xff\xee", 2)
    return i >= 0 and stream[i + 4:i + 9] == b"Adobe"


class RawTileSource:
    """Compressed JPEG tiles of every pyramid level of a TIFF whose levels are all JPEG-tiled."""

    def __init__(self, tiles: TiledTiff) -> None:
        self._tiles = tiles
        self.path = tiles.path

    @classmethod
    def open(cls, path: str | os.PathLike) -> RawTileSource | None:
        """The tile source, or None when the file is not a TIFF or a level is not JPEG-tiled RGB/YCbCr."""
        path = Path(path)
        if not path.is_file():
            raise SlideError(path, "file not found")
        if not is_tiff(path):
            return None
        tiles = TiledTiff(path)
        for lvl in tiles.levels:
            page = lvl.page
            if (not page.is_tiled or page.compression != _COMPRESSION_JPEG or page.samplesperpixel != 3
                    or int(page.photometric) not in _PHOTOMETRIC):
                tiles.close()
                return None
        return cls(tiles)

    def close(self) -> None:
        self._tiles.close()

    def __enter__(self) -> RawTileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(lvl.width, lvl.height) for lvl in self._tiles.levels]

    @property
    def level_count(self) -> int:
        return len(self._tiles.levels)

    def tile_shape(self, level: int) -> tuple[int, int]:
        """(tile width, tile height) of a level."""
        lvl = self._tiles.levels[level]
        return lvl.tile_width, lvl.tile_height

    def grid_shape(self, level: int) -> tuple[int, int]:
        """(columns, rows) of a level's tile grid."""
        lvl = self._tiles.levels[level]
        return lvl.cols, lvl.rows

    def photometric(self, level: int) -> str:
        """``rgb``: the JPEG components are R, G, B (decode without colour conversion); ``ycbcr``: normal JPEG."""
        return _PHOTOMETRIC[int(self._tiles.levels[level].page.photometric)]

    def tiles_for_region(self, level: int, x: int, y: int, w: int, h: int) -> list[tuple[int, int]]:
        """(col, row) of the tiles a level-coordinate rectangle touches, row-major; empty outside the level."""
        return self._tiles.levels[level].tiles_for_region(x, y, w, h)

    def tile_origin(self, level: int, col: int, row: int) -> tuple[int, int]:
        """Level coordinates (x, y) of a tile's top-left pixel."""
        return self._tiles.levels[level].tile_origin(col, row)

    def has_tile(self, level: int, col: int, row: int) -> bool:
        """False for a tile the file does not store (zero byte count); it reads as white."""
        lvl = self._tiles.levels[level]
        return lvl.bytecounts[lvl.tile_index(col, row)] > 0

    def jpeg(self, level: int, col: int, row: int) -> bytes:
        """A standalone JPEG of one tile (tables spliced in; Adobe RGB marker for photometric RGB)."""
        data = self._tiles.tile_bytes(level, col, row)
        where = f"level {level} tile ({col}, {row})"
        if not data:
            raise SlideError(self.path, f"{where} is not stored in the file (zero byte count)")
        if not data.startswith(JPEG_SOI):
            raise SlideError(self.path, f"{where} is not a JPEG stream (starts with {data[:2].hex()})")
        tables = self._tiles.levels[level].page.jpegtables
        if tables:
            if not (tables.startswith(JPEG_SOI) and tables.endswith(JPEG_EOI)):
                raise SlideError(self.path, f"level {level}: JPEGTables is not an SOI..EOI tables stream")
            data = tables[:-2] + data[2:]
        if self.photometric(level) == "rgb" and not _has_adobe_marker(data):
            data = JPEG_SOI + ADOBE_RGB_MARKER + data[2:]
        return data

    def decode_tile(self, level: int, col: int, row: int) -> np.ndarray | None:
        """One tile decoded on the CPU from ``jpeg()`` with PIL (None for a tile the file does not store)."""
        if not self.has_tile(level, col, row):
            return None
        stream = self.jpeg(level, col, row)
        try:
            with Image.open(io.BytesIO(stream)) as image:
                return to_rgb(np.asarray(image), self.path)
        except OSError as err:
            raise SlideError(self.path, f"level {level} tile ({col}, {row}) does not decode: {err}") from err

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Level-coordinate rectangle (HxWx3 uint8 RGB) assembled from CPU-decoded ``jpeg()`` tiles."""
        return self._tiles.read_region(level, x, y, w, h, decode=self.decode_tile)
