"""Indexing throughput on the five real slides, per-slide cost by stage, and the load time of a huge index.

    .venv/bin/python benchmarks/bench_index.py [--repeats 3] [--mpp 0.5 1 32] [--copies 1] [--load-slides 1000000]

1. ``foundation index`` over a manifest of the five real slides in ../shared/data (the JPEG 2000 SVS and the IHC
   pyramid get their pixel size from the manifest), each listed ``--copies`` times through symbolic links (distinct
   paths, so distinct slides to the index): a cold run in this process (``--workers 1``), a cold run with two
   worker processes, and a warm re-run (every slide cached). Each cold run starts from an empty folder; the
   median of ``--repeats`` runs is reported.
2. Per slide, in this process: open, thumbnail read, tissue mask, tile grid (median of the repeats).
3. ``TileIndex.load`` of a synthetic index of ``--load-slides`` slides and ten tiles per slide.

Prints a table and one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from foundation.config import load_config, to_dict
from foundation.slides.index import COLUMN_DTYPES, TileIndex, build_index
from foundation.slides.manifest import read_manifest
from foundation.slides.readers import open_slide
from foundation.slides.slide_table import SlideRecord, write_slide_table
from foundation.slides.slide_tiles import IndexParams, tile_slide
from foundation.slides.thumbnail import read_thumbnail
from foundation.slides.tissue import TissueParams, tissue_mask

DATA = Path(os.environ.get("FOUNDATION_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SLIDES = [  # path under wsi/, stain, marker, manifest mpp
    ("aperio_svs/CMU-1-Small-Region.svs", "H&E", "", ""),
    ("aperio_svs/TCGA-CR-7395-01A-01-TS1.svs", "H&E", "", "0.5"),
    ("dicom/camelyon_multiframe_lowres.dcm", "H&E", "", ""),
    ("derived/CMU-1-Small-Region_pyramid.ome.tif", "H&E", "", ""),
    ("derived/DeepLIIF_ROI_1_Ki67_IHC_pyramid.tif", "IHC", "Ki67", "0.25"),
]


def write_manifest(path: Path, copies: int = 1) -> Path:
    links = path.parent / "links"
    links.mkdir(exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "stain", "marker", "mpp"])
        for copy in range(copies):
            for rel, stain, marker, mpp in SLIDES:
                target = DATA / "wsi" / rel
                if copy:
                    link = links / f"{copy}_{target.name}"
                    link.symlink_to(target)
                    target = link
                writer.writerow([target, stain, marker, mpp])
    return path


def index_runs(manifest: Path, tissue: TissueParams, params: IndexParams, repeats: int,
               root: Path) -> dict[str, dict]:
    rows = read_manifest(manifest)
    runs: dict[str, list[dict]] = {"cold, 1 process": [], "cold, 2 workers": [], "warm (all cached)": []}
    for r in range(repeats):
        for label, workers in (("cold, 1 process", 1), ("cold, 2 workers", 2)):
            out = root / f"{label.split(',')[1].strip().replace(' ', '_')}_{r}"
            summary = build_index(rows, out, tissue, IndexParams(**{**params.__dict__, "workers": workers}),
                                  progress=False)
            assert summary["slides_failed"] == 0, summary
            runs[label].append(summary)
            if workers == 1:
                runs["warm (all cached)"].append(build_index(rows, out, tissue, params, progress=False))
    result = {}
    for label, summaries in runs.items():
        seconds = statistics.median(s["seconds"] for s in summaries)
        tiles = summaries[0]["tiles_total"]
        result[label] = {"seconds": seconds, "slides": summaries[0]["slides_total"], "tiles": tiles,
                         "slides_per_s": summaries[0]["slides_total"] / seconds, "tiles_per_s": tiles / seconds,
                         "slides_read": summaries[0]["slides_read"]}
    return result


def stage_times(tissue: TissueParams, params: IndexParams, repeats: int) -> dict[str, dict[str, float]]:
    out = {}
    for rel, _, _, mpp in SLIDES:
        times: dict[str, list[float]] = {"open": [], "read": [], "mask": [], "grid": []}
        for _ in range(repeats):
            t0 = time.perf_counter()
            slide = open_slide(DATA / "wsi" / rel, mpp=float(mpp) if mpp else None)
            t1 = time.perf_counter()
            thumb = read_thumbnail(slide, tissue.thumbnail_mpp, tissue.max_thumbnail_side, tissue.max_read_pixels)
            t2 = time.perf_counter()
            mask = tissue_mask(thumb.image, tissue)
            t3 = time.perf_counter()
            columns, _ = tile_slide(slide.level_dimensions, slide.level_downsamples, slide.mpp, mask, thumb.scale,
                                    params)
            t4 = time.perf_counter()
            slide.close()
            for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                times[key].append(value)
        out[Path(rel).name] = {k: statistics.median(v) for k, v in times.items()}
        out[Path(rel).name].update(backend=slide.backend, thumbnail=f"{thumb.image.shape[1]}x{thumb.image.shape[0]}",
                                   level=thumb.level, tiles=int(columns["x"].size))
    return out


def load_time(n_slides: int, root: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    dims = [[98_304, 76_800], [24_576, 19_200], [6_144, 4_800], [1_536, 1_200]]
    records = [SlideRecord(slide_id=f"cases/{i:07d}", path=f"/archive/cases/{i:07d}/slide.svs", stain_id=1 + i % 2,
                           marker_id=0, stain="H&E", marker="unknown", group=f"patient{i // 3}", mpp=0.25,
                           mpp_source="Aperio MPP", backend="cucim", level_dimensions=dims,
                           level_downsamples=[1.0, 4.0, 16.0, 64.0], fingerprint=f"{i:032x}", tiles_start=10 * i,
                           tiles_count=10) for i in range(n_slides)]
    write_slide_table(root / "slides", records)
    del records
    tiles = root / "tiles"
    tiles.mkdir()
    n_tiles = 10 * n_slides
    for name, dtype in COLUMN_DTYPES.items():
        values = np.repeat(np.arange(n_slides), 10) if name == "slide" else np.zeros(n_tiles)
        np.save(tiles / f"{name}.npy", values.astype(dtype))
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = TileIndex.load(root)
    loaded = time.perf_counter() - t0
    t0 = time.perf_counter()
    record = index.slide_of(n_tiles - 1)
    stains = np.bincount(index.slides.column("stain_id"))
    access = time.perf_counter() - t0
    assert record.slide_id == f"cases/{n_slides - 1:07d}" and stains.sum() == n_slides
    return {"slides": n_slides, "tiles": n_tiles, "write_seconds": built, "load_seconds": loaded,
            "lookup_seconds": access}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mpp", type=float, nargs="+", default=[0.5, 1.0, 32.0])
    parser.add_argument("--copies", type=int, default=1, help="list each real slide this many times")
    parser.add_argument("--load-slides", type=int, default=1_000_000)
    args = parser.parse_args()
    logging.getLogger("tifffile").setLevel(logging.ERROR)
    cfg = load_config(overrides=[f"index.mpp=[{', '.join(map(str, args.mpp))}]"])
    tissue = TissueParams.from_config(to_dict(cfg.tissue))
    params = IndexParams.from_config(to_dict(cfg.index))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = index_runs(write_manifest(root / "manifest.csv", args.copies), tissue, params, args.repeats, root)
        stages = stage_times(tissue, params, args.repeats)
        (root / "big").mkdir()
        load = load_time(args.load_slides, root / "big")

    print(f"\nfoundation index, 5 real slides x {args.copies}, targets {args.mpp} µm/px, median of {args.repeats}")
    print(f"{'run':<20}{'seconds':>9}{'slides/s':>10}{'tiles':>7}{'tiles/s':>9}{'read':>6}")
    for label, r in runs.items():
        print(f"{label:<20}{r['seconds']:>9.2f}{r['slides_per_s']:>10.2f}{r['tiles']:>7}{r['tiles_per_s']:>9.1f}"
              f"{r['slides_read']:>6}")
    print(f"\nper slide, this process (seconds)\n{'slide':<42}{'backend':>10}{'open':>7}{'read':>7}{'mask':>7}"
          f"{'grid':>8}{'thumbnail':>11}{'tiles':>6}")
    for name, s in stages.items():
        print(f"{name:<42}{s['backend']:>10}{s['open']:>7.3f}{s['read']:>7.3f}{s['mask']:>7.3f}{s['grid']:>8.4f}"
              f"{s['thumbnail']:>11}{s['tiles']:>6}")
    print(f"\nTileIndex.load of {load['slides']:,} slides / {load['tiles']:,} tiles: {load['load_seconds']:.3f} s "
          f"(lookup + stain histogram {load['lookup_seconds']:.3f} s; writing it took {load['write_seconds']:.1f} s)")
    print(json.dumps({"index_runs": runs, "stages": stages, "load": load}))


if __name__ == "__main__":
    main()
