"""The tile index: for every slide and target µm/px, the tiles with enough tissue.

On disk (``DIR``)::

    tiles/<column>.npy   one array per column, memory-mappable: slide int32, level int16, x int64,
                         y int64 (level-0 top-left), size int32 (square side read at ``level``),
                         mpp float32 (target µm/px), tissue float32 (tissue share)
    slides/              the slide records as columns (what ``TileIndex.load`` reads, see slide_table.py);
                         ``tiles.slide`` indexes them; a slide's tiles are the contiguous rows
                         ``[tiles_start, tiles_start + tiles_count)``
    slides.json          the same records as JSON, for people and other tools
    summary.json         counts and throughput of the run
    errors.csv           slide, reason: every manifest row that could not be indexed
    config.yaml          the resolved config of the run
    cache/<fp>.tiles|json  per-slide results keyed by a fingerprint of the file (path, size, mtime) and of
                         the settings that change its tiles; an unchanged slide is never re-read
    qc/<slide>.png       with --qc: thumbnail, tissue mask tinted, sampled tiles drawn

A tile is read as ``read_region((x, y), level, (size, size))`` and resized to ``tile_size``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap
from tqdm import tqdm

from foundation.slides.manifest import ManifestRow
from foundation.slides.parallel import WorkerCrash, imap_unordered
from foundation.slides.slide_table import SlideRecord, SlideTable, write_slide_table
from foundation.slides.slide_tiles import (
    CACHE_META,
    CACHE_TILES,
    TILE_DTYPES,
    IndexParams,
    SlideJob,
    SlideOutcome,
    index_slide,
    init_worker,
    load_cache_columns,
    load_cache_meta,
    mpp_key,
    params_digest,
)
from foundation.slides.tissue import TissueParams

log = logging.getLogger(__name__)

INDEX_FORMAT = 1  # bump when the meaning of cached per-slide results changes
# Imported once by the worker fork server (see parallel.py) instead of once per worker.
WORKER_PRELOAD = ("foundation.slides.slide_tiles", "foundation.slides.backends", "cucim", "openslide")
COLUMN_DTYPES: dict[str, Any] = {"slide": np.int32, **TILE_DTYPES}


__all__ = ["COLUMN_DTYPES", "SlideRecord", "TileIndex", "build_index"]


class TileIndex:
    """A loaded index: slide records and memory-mapped tile columns (no per-slide or per-tile Python objects)."""

    def __init__(self, directory: Path, slides: SlideTable, tiles: dict[str, np.ndarray]) -> None:
        self.directory = directory
        self.slides = slides
        self.tiles = tiles

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = True) -> TileIndex:
        """Open an index folder: slide table and tile columns memory-mapped (``mmap=False`` reads them in)."""
        directory = Path(directory)
        if not (directory / "slides").is_dir():
            raise FileNotFoundError(f"{directory}: not a tile index (no slides/; run `foundation index` first)")
        slides = SlideTable.load(directory / "slides")
        tiles = {}
        for name, dtype in COLUMN_DTYPES.items():
            column = np.load(directory / "tiles" / f"{name}.npy", mmap_mode="r" if mmap else None)
            if column.dtype != dtype:
                raise ValueError(f"{directory}/tiles/{name}.npy: dtype {column.dtype}, expected {np.dtype(dtype)}")
            tiles[name] = column
        lengths = {name: len(column) for name, column in tiles.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{directory}/tiles: columns differ in length: {lengths}")
        return cls(directory, slides, tiles)

    def __len__(self) -> int:
        return len(self.tiles["x"])

    def slide_of(self, i: int) -> SlideRecord:
        """The slide record of tile ``i``."""
        return self.slides[int(self.tiles["slide"][i])]


def fingerprint(row: ManifestRow, size: int, mtime_ns: int, settings: Mapping[str, Any]) -> str:
    """Identity of a slide's index result: the file's path, size and mtime, its mpp override and the settings."""
    key = {"format": INDEX_FORMAT, "path": str(row.path), "size": size, "mtime_ns": mtime_ns, "mpp": row.mpp,
           "settings": settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _qc_name(slide_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", slide_id).strip("._") or "slide"


def _write_json(path: Path, data: Any, indent: int | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=indent))
    tmp.replace(path)


def _write_columns(out: Path, ok: list[tuple[ManifestRow, str, dict[str, Any]]], cache_dir: Path) -> list[int]:
    """Concatenate the per-slide cache files into the column files, slide by slide; returns each slide's start."""
    tiles_dir = out / "tiles"
    tiles_dir.mkdir(parents=True, exist_ok=True)
    total = sum(meta["tiles"] for _, _, meta in ok)
    tmp = {name: tiles_dir / f".{name}.npy.tmp" for name in COLUMN_DTYPES}
    columns = {name: open_memmap(tmp[name], mode="w+", dtype=dtype, shape=(total,))
               for name, dtype in COLUMN_DTYPES.items()}
    starts, at = [], 0
    for slide, (_, fp, meta) in enumerate(ok):
        starts.append(at)
        n = meta["tiles"]
        if n:
            part = load_cache_columns(cache_dir / fp, n)
            columns["slide"][at:at + n] = slide
            for name in TILE_DTYPES:
                columns[name][at:at + n] = part[name]
        at += n
    for name, column in columns.items():
        column.flush()
        del column
        tmp[name].replace(tiles_dir / f"{name}.npy")
    return starts


def build_index(rows: list[ManifestRow], out: str | os.PathLike, tissue: TissueParams, params: IndexParams,
                reader: str = "auto", manifest: str = "", progress: bool = True) -> dict[str, Any]:
    """Index every manifest row into ``out``; returns the summary (also written to ``summary.json``)."""
    start = time.perf_counter()
    out = Path(out)
    cache_dir, qc_dir = out / "cache", out / "qc"
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = params_digest(tissue, params, reader)
    outcomes: dict[int, SlideOutcome] = {}
    prints: dict[int, str] = {}
    jobs: list[SlideJob] = []
    cached = 0
    for row in rows:
        try:
            stat = row.path.stat()
        except OSError as err:
            reason = "file not found" if isinstance(err, FileNotFoundError) else f"cannot stat: {err}"
            outcomes[row.line] = SlideOutcome(row.line, False, reason)
            continue
        fp = fingerprint(row, stat.st_size, stat.st_mtime_ns, settings)
        prints[row.line] = fp
        cache = cache_dir / fp
        qc = qc_dir / f"{_qc_name(row.slide_id)}.png" if params.qc else None
        if cache.with_name(fp + CACHE_META).is_file() and (qc is None or qc.is_file()):
            try:
                outcomes[row.line] = SlideOutcome(row.line, True, meta=load_cache_meta(cache))
                cached += 1
                continue
            except (OSError, ValueError, KeyError) as err:  # a damaged cache file is simply redone
                log.warning("re-indexing %s: cache %s unreadable (%s)", row.path_text, cache, err)
        jobs.append(SlideJob(row.line, str(row.path), row.mpp, str(cache), str(qc) if qc else None))

    read_seconds = 0.0
    tiles_read = 0
    results = imap_unordered(index_slide, jobs, params.workers, initializer=init_worker,
                             initargs=(reader, tissue, params), preload=WORKER_PRELOAD)
    for job, result in tqdm(results, total=len(jobs), desc="index", unit="slide", disable=not progress or None):
        if isinstance(result, WorkerCrash):
            result = SlideOutcome(job.line, False, result.reason)
        outcomes[job.line] = result
        read_seconds += result.seconds
        if result.ok and result.meta:
            tiles_read += result.meta["tiles"]

    ok = [(row, prints[row.line], outcomes[row.line].meta) for row in rows if outcomes[row.line].ok]
    failed = [(row, outcomes[row.line].reason) for row in rows if not outcomes[row.line].ok]
    starts = _write_columns(out, ok, cache_dir)
    records = [SlideRecord(slide_id=row.slide_id, path=str(row.path), stain_id=row.stain_id, marker_id=row.marker_id,
                           stain=row.stain, marker=row.marker, group=row.group, mpp=meta["mpp"],
                           mpp_source=meta["mpp_source"], backend=meta["backend"],
                           level_dimensions=meta["level_dimensions"], level_downsamples=meta["level_downsamples"],
                           fingerprint=fp, tiles_start=begin, tiles_count=meta["tiles"])
               for (row, fp, meta), begin in zip(ok, starts, strict=True)]
    write_slide_table(out / "slides", records)
    _write_json(out / "slides.json", {"format": INDEX_FORMAT, "slides": [asdict(r) for r in records]})
    with open(out / "errors.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "reason"])
        writer.writerows([(row.path_text, reason) for row, reason in failed])
    keep = {fp for _, fp, _ in ok}
    for entry in cache_dir.iterdir():
        stale = entry.name.split(".")[0] not in keep and entry.suffix in (CACHE_TILES, CACHE_META)
        if stale or entry.suffix == ".tmp":  # .tmp: left by an interrupted run
            entry.unlink()

    summary = _summary(manifest, rows, ok, failed, cached, len(jobs), tiles_read, time.perf_counter() - start,
                       read_seconds, params)
    for slide, reason in summary["slides_without_tiles"].items():
        log.warning("%s gives no tiles %s", slide, reason)
    _write_json(out / "summary.json", summary, indent=1)
    return summary


def _missing_tiles(meta: Mapping[str, Any], params: IndexParams) -> str:
    """Why a slide gave no tiles at some target µm/px ("" when it gave tiles at every target)."""
    width, height = meta["level_dimensions"][0]
    reasons: dict[str, list[float]] = {}
    for target in params.mpp:
        if meta["tiles_per_mpp"].get(mpp_key(target), 0):
            continue
        if meta["mpp"] > target * (1 + params.mpp_tolerance):
            why = f"its level 0 is {meta['mpp']:.4g} µm/px, coarser than the target"
        elif min(width, height) * meta["mpp"] < params.tile_size * target:
            why = f"it is smaller than one {params.tile_size} px tile"
        else:
            why = f"no tile reaches index.min_tissue={params.min_tissue}"
        reasons.setdefault(why, []).append(target)
    return "; ".join(f"at {targets} µm/px: {why}" for why, targets in reasons.items())


def _summary(manifest: str, rows: list[ManifestRow], ok: list[tuple[ManifestRow, str, dict[str, Any]]],
             failed: list[tuple[ManifestRow, str]], cached: int, read: int, tiles_read: int, seconds: float,
             read_seconds: float, params: IndexParams) -> dict[str, Any]:
    per_mpp: Counter[str] = Counter({mpp_key(m): 0 for m in params.mpp})
    per_stain: Counter[str] = Counter()
    backends: Counter[str] = Counter()
    for row, _, meta in ok:
        per_mpp.update(meta["tiles_per_mpp"])
        per_stain[row.stain] += meta["tiles"]
        backends[meta["backend"]] += 1
    return {
        "manifest": manifest,
        "slides_total": len(rows),
        "slides_ok": len(ok),
        "slides_failed": len(failed),
        "slides_cached": cached,
        "slides_read": read,
        "tiles_total": sum(meta["tiles"] for _, _, meta in ok),
        "tiles_per_stain": dict(sorted(per_stain.items())),
        "tiles_per_mpp": dict(per_mpp),
        "slides_without_tiles": {row.path_text: why for row, _, meta in ok if (why := _missing_tiles(meta, params))},
        "backends": dict(sorted(backends.items())),
        "seconds": round(seconds, 3),
        "slides_per_s": round(read / seconds, 3) if seconds > 0 else 0.0,
        "tiles_per_s": round(tiles_read / seconds, 1) if seconds > 0 else 0.0,
        "worker_seconds_per_slide": round(read_seconds / read, 4) if read else 0.0,
        "workers": params.workers,
    }
