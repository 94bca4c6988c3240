"""The slide records of an index as columns: loads a million slides in well under a second.

``DIR/slides/`` holds one ``.npy`` per numeric field, one UTF-8 blob + offsets per text field, and the
ragged pyramid geometry flattened with per-slide offsets. :class:`SlideTable` is a read-only sequence
of :class:`SlideRecord` that builds a record only when it is accessed; vectorised code reads
``table.column(name)`` instead. (``DIR/slides.json`` carries the same records for people and tools.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, overload

import numpy as np

NUMERIC: dict[str, Any] = {"stain_id": np.int32, "marker_id": np.int32, "mpp": np.float64,
                           "tiles_start": np.int64, "tiles_count": np.int64}
TEXT = ("slide_id", "path", "stain", "marker", "group", "mpp_source", "backend", "fingerprint")


@dataclass(frozen=True)
class SlideRecord:
    """One indexed slide; ``TileIndex.tiles['slide']`` holds positions in ``TileIndex.slides``."""

    slide_id: str
    path: str
    stain_id: int
    marker_id: int
    stain: str
    marker: str
    group: str
    mpp: float  # level-0 µm/px
    mpp_source: str
    backend: str
    level_dimensions: list[list[int]]  # (width, height) per level
    level_downsamples: list[float]
    fingerprint: str
    tiles_start: int  # the slide's tiles are rows [tiles_start, tiles_start + tiles_count) of the tile columns
    tiles_count: int


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    tmp.replace(path)


def write_slide_table(directory: str | os.PathLike, records: Sequence[SlideRecord]) -> None:
    """Write ``records`` as columns under ``directory`` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, dtype in NUMERIC.items():
        _save(directory / f"{name}.npy", np.array([getattr(r, name) for r in records], dtype=dtype))
    for name in TEXT:
        encoded = [getattr(r, name).encode() for r in records]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        _save(directory / f"{name}.offsets.npy", offsets)
        _save(directory / f"{name}.utf8.npy", np.frombuffer(b"".join(encoded), dtype=np.uint8))
    counts = np.array([len(r.level_dimensions) for r in records], dtype=np.int64)
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    dims = [d for r in records for d in r.level_dimensions]
    _save(directory / "level_offsets.npy", offsets)
    _save(directory / "level_dimensions.npy", np.array(dims, dtype=np.int64).reshape(-1, 2))
    _save(directory / "level_downsamples.npy",
          np.array([d for r in records for d in r.level_downsamples], dtype=np.float64))


class SlideTable(Sequence[SlideRecord]):
    """Read-only, memory-mapped slide records; ``table[i]`` builds one :class:`SlideRecord`."""

    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        self._columns = columns
        self._len = len(columns["tiles_start"])

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SlideTable:
        directory = Path(directory)
        names = [*NUMERIC, *(f"{t}.offsets" for t in TEXT), *(f"{t}.utf8" for t in TEXT),
                 "level_offsets", "level_dimensions", "level_downsamples"]
        columns = {}
        for name in names:
            path = directory / f"{name}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: slide table column missing (re-run `foundation index`)")
            columns[name] = np.load(path, mmap_mode="r")
        return cls(columns)

    def column(self, name: str) -> np.ndarray:
        """A numeric field for every slide (``stain_id``, ``marker_id``, ``mpp``, ``tiles_start``, ``tiles_count``)."""
        if name not in NUMERIC:
            raise KeyError(f"{name!r} is not a numeric slide column; numeric: {list(NUMERIC)}")
        return self._columns[name]

    def text(self, name: str, i: int) -> str:
        offsets = self._columns[f"{name}.offsets"]
        return bytes(self._columns[f"{name}.utf8"][offsets[i]:offsets[i + 1]]).decode()

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, i: int) -> SlideRecord: ...

    @overload
    def __getitem__(self, i: slice) -> list[SlideRecord]: ...

    def __getitem__(self, i: int | slice) -> SlideRecord | list[SlideRecord]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        i = int(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"slide {i} out of range (0..{self._len - 1})")
        c = self._columns
        lo, hi = int(c["level_offsets"][i]), int(c["level_offsets"][i + 1])
        values: dict[str, Any] = {name: self.text(name, i) for name in TEXT}
        values.update({name: c[name][i].item() for name in NUMERIC})
        values["level_dimensions"] = c["level_dimensions"][lo:hi].tolist()
        values["level_downsamples"] = c["level_downsamples"][lo:hi].tolist()
        return SlideRecord(**{f.name: values[f.name] for f in fields(SlideRecord)})
