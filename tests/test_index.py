"""`foundation index` on the real slides plus broken files: tiles, errors, incremental re-runs, --strict, --qc."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from slide_support import damage_tiles

from foundation.cli import main
from foundation.config import load_config, to_dict
from foundation.slides.grid import make_grid, summed_area, tissue_fractions
from foundation.slides.index import COLUMN_DTYPES, TileIndex
from foundation.slides.readers import open_slide
from foundation.slides.thumbnail import read_thumbnail
from foundation.slides.tissue import TissueParams, pixel_classes, tissue_mask

IHC_MPP = 0.25
J2K_MPP = 0.5
TARGETS = ("0.5", "32")  # 32 µm/px: the only target the 28.97 µm/px DICOM can serve


def _manifest(path: Path, rows: list[tuple[str, ...]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "stain", "marker", "group", "mpp"])
        writer.writerows(rows)
    return path


def _index(manifest: Path, out: Path, *extra: str) -> int:
    return main(["index", str(manifest), "--out", str(out), "--workers", "1", *extra, "--mpp", *TARGETS])


def _errors(out: Path) -> dict[str, str]:
    with open(out / "errors.csv", newline="") as fh:
        return {row["slide"]: row["reason"] for row in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def corpus(wsi: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The five real slides (the SVS copied, so the incremental test can touch it) and four broken inputs."""
    root = tmp_path_factory.mktemp("corpus")
    svs = root / "CMU-1-Small-Region.svs"
    shutil.copyfile(wsi["svs_jpeg"], svs)
    data = wsi["svs_jpeg"].read_bytes()
    (root / "truncated.svs").write_bytes(data[: len(data) // 2])
    (root / "random.svs").write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, np.uint8).tobytes())
    (root / "empty.svs").write_bytes(b"")
    rows = [
        (str(svs), "H&E", "", "p1", ""),
        (str(wsi["svs_j2k"]), "H&E", "", "p2", ""),  # no pixel size anywhere: must be reported
        (str(wsi["dicom"]), "HE", "", "p3", ""),
        (str(wsi["ome_tiff"]), "H&E", "", "p1", ""),
        (str(wsi["ihc_tiff"]), "IHC", "Ki67", "p4", str(IHC_MPP)),
        ("truncated.svs", "H&E", "", "p5", ""),
        ("random.svs", "H&E", "", "p5", ""),
        ("empty.svs", "H&E", "", "p5", ""),
        ("missing.svs", "H&E", "", "p5", ""),
    ]
    return {"root": root, "svs": svs, "manifest": _manifest(root / "manifest.csv", rows),
            "clean": _manifest(root / "clean.csv", [rows[0], (str(wsi["svs_j2k"]), "H&E", "", "p2", str(J2K_MPP))])}


@pytest.fixture(scope="module")
def first_run(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index")
    assert _index(corpus["manifest"], out, "--qc") == 0  # failures are reported, not fatal, without --strict
    return out


def test_broken_and_unsized_slides_are_reported_and_the_run_goes_on(first_run: Path, wsi: dict[str, Path],
                                                                   corpus: dict[str, Path]) -> None:
    errors = _errors(first_run)
    assert set(errors) == {str(wsi["svs_j2k"]), "truncated.svs", "random.svs", "empty.svs", "missing.svs"}
    assert "no pixel size" in errors[str(wsi["svs_j2k"])]
    assert "no reader can open it" in errors["truncated.svs"] and "no reader can open it" in errors["random.svs"]
    assert errors["empty.svs"] == "empty file (0 bytes)"
    assert errors["missing.svs"] == "file not found"
    summary = json.loads((first_run / "summary.json").read_text())
    assert (summary["slides_total"], summary["slides_ok"], summary["slides_failed"]) == (9, 4, 5)
    assert summary["backends"] == {"cucim": 2, "openslide": 1, "tifffile": 1}
    # every slide misses one of the two targets, each for its own reason (and says so, instead of 0 tiles silently)
    missing = summary["slides_without_tiles"]
    assert missing[str(wsi["dicom"])] == "at [0.5] µm/px: its level 0 is 28.97 µm/px, coarser than the target"
    assert missing[str(wsi["ome_tiff"])] == "at [32.0] µm/px: it is smaller than one 224 px tile"
    assert set(missing) == {str(wsi[name]) for name in ("dicom", "ome_tiff", "ihc_tiff")} | {str(corpus["svs"])}


def test_index_columns_records_and_pixel_sizes(first_run: Path, corpus: dict[str, Path], wsi: dict[str, Path]) -> None:
    index = TileIndex.load(first_run)
    summary = json.loads((first_run / "summary.json").read_text())
    assert len(index) == summary["tiles_total"] > 0
    for name, dtype in COLUMN_DTYPES.items():
        assert isinstance(index.tiles[name], np.memmap) and index.tiles[name].dtype == dtype
    records = {Path(r.path).name: r for r in index.slides}
    assert set(records) == {corpus["svs"].name, wsi["dicom"].name, wsi["ome_tiff"].name, wsi["ihc_tiff"].name}
    svs, dicom, ome, ihc = (records[p.name] for p in (corpus["svs"], wsi["dicom"], wsi["ome_tiff"], wsi["ihc_tiff"]))
    assert (svs.mpp, svs.mpp_source, svs.backend) == (0.499, "Aperio MPP", "cucim")
    assert (ome.mpp, ome.backend, len(ome.level_dimensions)) == (0.499, "tifffile", 4)
    assert dicom.mpp == pytest.approx(28.969, abs=1e-6) and dicom.backend == "openslide"
    assert (ihc.mpp, ihc.mpp_source, ihc.stain, ihc.marker) == (IHC_MPP, "override", "IHC", "Ki67")
    slide, mpp = np.asarray(index.tiles["slide"]), np.asarray(index.tiles["mpp"])
    for i, record in enumerate(index.slides):
        rows = np.flatnonzero(slide == i)
        assert rows.tolist() == list(range(record.tiles_start, record.tiles_start + record.tiles_count))
        assert index.slide_of(int(rows[0])) == record
    dicom_id = index.slides.index(dicom)
    assert set(mpp[slide == dicom_id].tolist()) == {32.0}  # never upsampled to 0.5 µm/px
    assert (mpp[slide == index.slides.index(svs)] == np.float32(0.5)).sum() > 20
    assert summary["tiles_per_mpp"]["0.5"] + summary["tiles_per_mpp"]["32"] == len(index)
    assert summary["tiles_per_stain"] == {"H&E": int((slide != index.slides.index(ihc)).sum()),
                                          "IHC": int((slide == index.slides.index(ihc)).sum())}
    assert np.all(np.asarray(index.tiles["tissue"]) >= 0.6)


def test_svs_tiles_lie_on_tissue_and_shares_match_a_recomputation(first_run: Path, corpus: dict[str, Path]) -> None:
    index = TileIndex.load(first_run)
    s = next(i for i, r in enumerate(index.slides) if Path(r.path) == corpus["svs"])
    rows = np.flatnonzero((np.asarray(index.tiles["slide"]) == s) & (np.asarray(index.tiles["mpp"]) == 0.5))
    params = TissueParams.from_config(to_dict(load_config().tissue))
    kept, rejected = [], []
    with open_slide(corpus["svs"]) as slide:
        thumb = read_thumbnail(slide, params.thumbnail_mpp, params.max_thumbnail_side, params.max_read_pixels)
        table = summed_area(tissue_mask(thumb.image, params))
        grid = make_grid(slide.level_dimensions[0], slide.mpp, slide.level_downsamples, 0.5, 224, 1.0, 0.1)
        assert (grid.level, grid.size) == (0, round(224 * 0.5 / 0.499))  # 224.45 px of 0.499 µm cover 112 µm
        share = tissue_fractions(table, thumb.scale, grid.xs, grid.ys, grid.footprint)
        indexed = {(int(index.tiles["x"][i]), int(index.tiles["y"][i])): float(index.tiles["tissue"][i]) for i in rows}
        for r, y in enumerate(grid.ys):
            for c, x in enumerate(grid.xs):
                # Independent look at full resolution: the share of stained pixels in the tile.
                stained = pixel_classes(slide.read_region((int(x), int(y)), 0, (grid.size, grid.size)),
                                        params)["stained"].mean()
                if share[r, c] >= 0.6:
                    assert indexed.pop((int(x), int(y))) == pytest.approx(share[r, c], abs=1e-6)
                    kept.append(stained)
                else:
                    rejected.append(stained)
    assert not indexed  # every indexed tile is a grid tile with enough tissue, and vice versa
    assert len(kept) > 20 and len(rejected) > 20
    assert min(kept) >= 0.35 and np.median(kept) >= 0.8
    assert np.median(rejected) <= 0.2 and np.median(kept) > np.percentile(rejected, 90)


def test_qc_pictures(first_run: Path) -> None:
    index = TileIndex.load(first_run)
    pictures = sorted((first_run / "qc").glob("*.png"))
    assert len(pictures) == len(index.slides)
    for picture in pictures:
        image = np.asarray(Image.open(picture).convert("RGB"))
        assert max(image.shape[:2]) >= 512
        # tile outlines are drawn in pure palette colours that the tinted thumbnail does not contain
        assert np.any(np.all(image == (230, 25, 75), axis=-1)) or np.any(np.all(image == (0, 90, 230), axis=-1))


def test_incremental_rerun_skips_unchanged_and_redoes_touched(corpus: dict[str, Path],
                                                              tmp_path: Path) -> None:
    out = tmp_path / "index"
    assert _index(corpus["manifest"], out) == 0
    first = json.loads((out / "summary.json").read_text())
    tiles_before = {c: np.load(out / "tiles" / f"{c}.npy") for c in COLUMN_DTYPES}
    caches = {p.name: p.stat().st_mtime_ns for p in (out / "cache").iterdir()}
    assert len(caches) == 2 * first["slides_ok"] == 8  # tiles + meta .json per slide

    assert _index(corpus["manifest"], out) == 0
    second = json.loads((out / "summary.json").read_text())
    assert second["slides_cached"] == 4
    assert second["slides_read"] == 4  # only the four unreadable rows (the missing file is never read)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cache").iterdir()} == caches
    for c, before in tiles_before.items():
        assert np.array_equal(np.load(out / "tiles" / f"{c}.npy"), before)

    stat = corpus["svs"].stat()
    os.utime(corpus["svs"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: same bytes, new mtime
    assert _index(corpus["manifest"], out) == 0
    third = json.loads((out / "summary.json").read_text())
    assert third["slides_cached"] == 3 and third["slides_read"] == 5
    assert len(list((out / "cache").iterdir())) == 8  # the stale entry of the touched slide was removed
    for c, before in tiles_before.items():
        assert np.array_equal(np.load(out / "tiles" / f"{c}.npy"), before)

    # A setting that changes tiles re-indexes everything.
    assert main(["index", str(corpus["manifest"]), "--out", str(out), "--workers", "1", "--min-tissue", "0.9",
                 "--mpp", *TARGETS]) == 0
    fourth = json.loads((out / "summary.json").read_text())
    assert fourth["slides_cached"] == 0 and 0 < fourth["tiles_total"] < first["tiles_total"]


def test_manifest_mpp_rescues_the_jpeg2000_slide_and_strict_exit_codes(corpus: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    assert _index(corpus["clean"], tmp_path / "clean", "--strict") == 0
    index = TileIndex.load(tmp_path / "clean")
    assert [r.mpp for r in index.slides] == [0.499, J2K_MPP]
    assert index.slides[1].level_dimensions == [[4443, 3567], [2221, 1783]]
    assert _errors(tmp_path / "clean") == {}
    assert _index(corpus["manifest"], tmp_path / "broken", "--strict") == 1


def test_bad_manifest_or_config_exit_before_any_work(corpus: dict[str, Path], tmp_path: Path) -> None:
    bad = _manifest(tmp_path / "bad.csv", [("a.svs", "H&E", "Ki67", "", "")])
    assert _index(bad, tmp_path / "out") == 2
    assert _index(corpus["manifest"], tmp_path / "out", "index.min_tisue=0.5") == 2
    assert not (tmp_path / "out").exists()


def test_two_worker_processes_give_the_same_index(corpus: dict[str, Path], first_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "parallel"
    assert main(["index", str(corpus["manifest"]), "--out", str(out), "--workers", "2", "--mpp", *TARGETS]) == 0
    for c in COLUMN_DTYPES:
        assert np.array_equal(np.load(out / "tiles" / f"{c}.npy"), np.load(first_run / "tiles" / f"{c}.npy"))
    assert _errors(out) == _errors(first_run)


def test_a_slide_with_damaged_tiles_is_reported_unless_the_check_is_off(wsi: dict[str, Path], tmp_path: Path) -> None:
    damage_tiles(wsi["svs_jpeg"], tmp_path / "damaged.svs", {(4, 5): "head"})
    manifest = _manifest(tmp_path / "m.csv", [(str(wsi["svs_jpeg"]), "H&E", "", "p1", ""),
                                              ("damaged.svs", "H&E", "", "p2", "")])
    assert _index(manifest, tmp_path / "checked") == 0
    assert set(_errors(tmp_path / "checked")) == {"damaged.svs"}
    assert "level 0: 1 of 130 tiles are damaged" in _errors(tmp_path / "checked")["damaged.svs"]
    # without the check the slide opens and is indexed: its readers decode the zeroed tile without an error
    assert _index(manifest, tmp_path / "unchecked", "index.check_tiles=false") == 0
    assert _errors(tmp_path / "unchecked") == {}
    assert len(TileIndex.load(tmp_path / "unchecked").slides) == 2
