"""Damaged copies of real slides for the tests of the tile check."""

from __future__ import annotations

from pathlib import Path

import tifffile


def damage_tiles(source: Path, out: Path, level_tiles: dict[tuple[int, int], str]) -> Path:
    """A copy of ``source`` with tile ``(col, row)`` of level 0 zeroed (``head``) or cut short of its end marker."""
    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tif:
        page = tif.series[0].levels[0].keyframe
        cols = -(-int(page.imagewidth) // int(page.tilewidth))
        for (col, row), how in level_tiles.items():
            offset, count = page.dataoffsets[row * cols + col], page.databytecounts[row * cols + col]
            if how == "head":
                data[offset:offset + 64] = bytes(64)
            else:  # the end of the stream overwritten: a cut-off tile
                data[offset + count - 16:offset + count] = bytes(16)
    out.write_bytes(bytes(data))
    return out

