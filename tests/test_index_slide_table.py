"""The columnar slide table: exact round trip of records, lazy access, numeric columns memory-mapped."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from foundation.slides.slide_table import SlideRecord, SlideTable, write_slide_table


def _records(n: int) -> list[SlideRecord]:
    rng = np.random.default_rng(7)
    out = []
    start = 0
    for i in range(n):
        levels = int(rng.integers(1, 5))
        dims = [[int(40_000 // 4**k) + i, int(30_000 // 4**k)] for k in range(levels)]
        count = int(rng.integers(0, 1000))
        out.append(SlideRecord(
            slide_id=f"case{i:03d}/slide-é{i}", path=f"/data/スライド/{i}.svs", stain_id=i % 3, marker_id=i % 5,
            stain=["unknown", "H&E", "IHC"][i % 3], marker="Ki67" if i % 3 == 2 else "unknown", group=f"p{i // 2}",
            mpp=0.25 + i * 1e-3, mpp_source="Aperio MPP", backend=["cucim", "openslide", "tifffile"][i % 3],
            level_dimensions=dims, level_downsamples=[4.0**k + i * 1e-6 for k in range(levels)],
            fingerprint=f"{i:032x}", tiles_start=start, tiles_count=count))
        start += count
    return out


def test_round_trip_is_exact(tmp_path: Path) -> None:
    records = _records(50)
    write_slide_table(tmp_path, records)
    table = SlideTable.load(tmp_path)
    assert len(table) == 50
    assert list(table) == records
    assert table[-1] == records[-1] and table[3:6] == records[3:6]
    assert table.index(records[17]) == 17
    np.testing.assert_array_equal(table.column("tiles_count"), [r.tiles_count for r in records])
    assert isinstance(table.column("mpp"), np.memmap) and table.column("mpp").dtype == np.float64
    with pytest.raises(IndexError):
        table[50]
    with pytest.raises(KeyError, match="not a numeric slide column"):
        table.column("path")


def test_empty_table_and_single_level(tmp_path: Path) -> None:
    write_slide_table(tmp_path / "empty", [])
    assert len(SlideTable.load(tmp_path / "empty")) == 0
    one = replace(_records(1)[0], level_dimensions=[[10, 20]], level_downsamples=[1.0])
    write_slide_table(tmp_path / "one", [one])
    assert SlideTable.load(tmp_path / "one")[0] == one


def test_missing_column_is_named(tmp_path: Path) -> None:
    write_slide_table(tmp_path, _records(3))
    (tmp_path / "path.utf8.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"path\.utf8\.npy"):
        SlideTable.load(tmp_path)
