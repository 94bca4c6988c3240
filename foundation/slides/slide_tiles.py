"""Index one slide: thumbnail -> tissue mask -> tile grid per target µm/px -> cache file (+ QC picture).

This runs in the worker processes of ``foundation index``. Its whole cost is one thumbnail-level
read plus array work on the mask, and a check of every compressed tile's first and last bytes
(``index.check_tiles``); no tile is decoded at full resolution. The result goes to a per-slide
cache entry (``.tiles`` + ``.json``), so the parent process only handles small outcome records.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foundation.slides.errors import SlideError
from foundation.slides.grid import make_grid, summed_area, tissue_fractions
from foundation.slides.qc import render_qc, sample_evenly, write_qc
from foundation.slides.readers import open_slide
from foundation.slides.thumbnail import read_thumbnail
from foundation.slides.tiff_tiles import check_tile_streams
from foundation.slides.tissue import TissueParams, tissue_mask

# Per-slide tile columns (the index adds ``slide``) and their on-disk types.
TILE_DTYPES: dict[str, Any] = {
    "level": np.int16, "x": np.int64, "y": np.int64, "size": np.int32, "mpp": np.float32, "tissue": np.float32,
}


@dataclass(frozen=True)
class IndexParams:
    """The ``index:`` section of the config, validated."""

    mpp: tuple[float, ...]
    tile_size: int
    min_tissue: float
    stride_fraction: float
    mpp_tolerance: float
    workers: int
    qc: bool
    qc_max_tiles: int
    qc_side: int
    strict: bool
    check_tiles: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> IndexParams:
        """Build from ``cfg.index``; a value out of range raises ``ValueError`` naming the key."""
        targets = tuple(float(v) for v in cfg["mpp"])
        if not targets or any(not (v > 0 and math.isfinite(v)) for v in targets):
            raise ValueError(f"index.mpp must be a non-empty list of positive µm/px, got {list(targets)}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"index.mpp lists a pixel size twice: {list(targets)}")
        params = cls(mpp=targets, tile_size=int(cfg["tile_size"]), min_tissue=float(cfg["min_tissue"]),
                     stride_fraction=float(cfg["stride_fraction"]), mpp_tolerance=float(cfg["mpp_tolerance"]),
                     workers=int(cfg["workers"]), qc=bool(cfg["qc"]), qc_max_tiles=int(cfg["qc_max_tiles"]),
                     qc_side=int(cfg["qc_side"]), strict=bool(cfg["strict"]),
                     check_tiles=bool(cfg["check_tiles"]))
        for key in ("tile_size", "stride_fraction", "workers", "qc_side"):
            if getattr(params, key) <= 0:
                raise ValueError(f"index.{key} must be positive, got {getattr(params, key)!r}")
        if not 0.0 <= params.min_tissue <= 1.0:
            raise ValueError(f"index.min_tissue must lie in [0, 1], got {params.min_tissue!r}")
        if params.mpp_tolerance < 0 or params.qc_max_tiles < 0:
            raise ValueError("index.mpp_tolerance and index.qc_max_tiles must be >= 0")
        return params

    def tiling(self) -> dict[str, Any]:
        """The settings that change a slide's tiles (part of each slide's cache fingerprint)."""
        return {"mpp": list(self.mpp), "tile_size": self.tile_size, "min_tissue": self.min_tissue,
                "stride_fraction": self.stride_fraction, "mpp_tolerance": self.mpp_tolerance,
                "check_tiles": self.check_tiles}


@dataclass(frozen=True)
class SlideJob:
    """What a worker needs to index one slide (small and picklable)."""

    line: int
    path: str
    mpp: float | None
    cache: str
    qc: str | None


@dataclass(frozen=True)
class SlideOutcome:
    """A worker's answer: success with the slide's metadata, or the reason it failed."""

    line: int
    ok: bool
    reason: str = ""
    meta: dict[str, Any] | None = None
    seconds: float = 0.0


def tile_slide(level_dimensions: Sequence[tuple[int, int]], level_downsamples: Sequence[float], mpp: float,
               mask: np.ndarray, scale: float, params: IndexParams) -> tuple[dict[str, np.ndarray], list[tuple]]:
    """Tile columns (tissue share >= ``min_tissue``) for every target µm/px, and (xs, ys, footprint) per target."""
    table = summed_area(mask)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in TILE_DTYPES}
    boxes = []
    for target in params.mpp:
        grid = make_grid(level_dimensions[0], mpp, level_downsamples, target, params.tile_size,
                         params.stride_fraction, params.mpp_tolerance)
        if grid is None or grid.xs.size == 0 or grid.ys.size == 0:
            boxes.append((np.zeros(0), np.zeros(0), 0.0))
            continue
        share = tissue_fractions(table, scale, grid.xs, grid.ys, grid.footprint)
        rows, cols = np.nonzero(share >= params.min_tissue)
        n = rows.size
        parts["level"].append(np.full(n, grid.level))
        parts["x"].append(grid.xs[cols])
        parts["y"].append(grid.ys[rows])
        parts["size"].append(np.full(n, grid.size))
        parts["mpp"].append(np.full(n, target))
        parts["tissue"].append(share[rows, cols])
        boxes.append((grid.xs[cols], grid.ys[rows], grid.footprint))
    columns = {name: (np.concatenate(chunks) if chunks else np.zeros(0)).astype(TILE_DTYPES[name])
               for name, chunks in parts.items()}
    return columns, boxes


def mpp_key(mpp: float) -> str:
    """How a target µm/px is spelled in JSON keys (``0.5``, ``1``, ``32``)."""
    return f"{mpp:g}"


CACHE_TILES, CACHE_META = ".tiles", ".json"
# Raw little-endian records: no header to parse (numpy's .npy header parser costs ~1 ms per file).
_TILE_RECORD = np.dtype([(name, np.dtype(dtype).newbyteorder("<")) for name, dtype in TILE_DTYPES.items()])


def save_cache(stem: Path, columns: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """One slide's tiles (``stem.tiles``, raw records) and metadata (``stem.json``, written last: its
    presence marks a complete entry; it holds the record count that the tiles file must match)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    table = np.empty(len(columns["x"]), dtype=_TILE_RECORD)
    for name in TILE_DTYPES:
        table[name] = columns[name]
    for suffix, data in ((CACHE_TILES, table.tobytes()), (CACHE_META, json.dumps(meta).encode())):
        path = stem.with_name(stem.name + suffix)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)


def load_cache_meta(stem: Path) -> dict[str, Any]:
    """The metadata of a complete cache entry; ``ValueError``/``OSError`` when the entry is damaged or partial."""
    meta = json.loads(stem.with_name(stem.name + CACHE_META).read_text())
    size = stem.with_name(stem.name + CACHE_TILES).stat().st_size
    if size != meta["tiles"] * _TILE_RECORD.itemsize:
        raise ValueError(f"{stem}{CACHE_TILES}: {size} bytes for {meta['tiles']} tiles")
    return meta


def load_cache_columns(stem: Path, count: int) -> np.ndarray:
    """The slide's ``count`` tiles as a structured array (fields as in ``TILE_DTYPES``)."""
    path = stem.with_name(stem.name + CACHE_TILES)
    table = np.fromfile(path, dtype=_TILE_RECORD)
    if len(table) != count:
        raise ValueError(f"{path}: {len(table)} tile records, its metadata says {count}")
    return table


_WORKER: dict[str, Any] = {}


def init_worker(reader: str, tissue: TissueParams, params: IndexParams) -> None:
    """Process initializer: the settings shared by every job, sent once per worker."""
    logging.getLogger("tifffile").setLevel(logging.ERROR)  # it logs each malformed tag it skips
    _WORKER.update(reader=reader, tissue=tissue, params=params)


def index_slide(job: SlideJob) -> SlideOutcome:
    """Index one slide into its cache file; every failure becomes a reported outcome, never an exception."""
    start = time.perf_counter()
    tissue: TissueParams = _WORKER["tissue"]
    params: IndexParams = _WORKER["params"]
    try:
        with open_slide(job.path, _WORKER["reader"], job.mpp) as slide:
            if params.check_tiles:
                check_tile_streams(job.path)
            thumb = read_thumbnail(slide, tissue.thumbnail_mpp, tissue.max_thumbnail_side, tissue.max_read_pixels)
            mask = tissue_mask(thumb.image, tissue)
            columns, boxes = tile_slide(slide.level_dimensions, slide.level_downsamples, slide.mpp, mask,
                                        thumb.scale, params)
            meta = {"backend": slide.backend, "mpp": slide.mpp, "mpp_source": slide.mpp_source,
                    "level_dimensions": [list(d) for d in slide.level_dimensions],
                    "level_downsamples": list(slide.level_downsamples),
                    "thumbnail": {"level": thumb.level, "factor": thumb.factor, "mpp": thumb.mpp,
                                  "shape": list(thumb.image.shape[:2])},
                    "tissue_fraction": float(mask.mean()), "tiles": int(columns["x"].size),
                    "tiles_per_mpp": {mpp_key(m): int(box[0].size) for m, box in zip(params.mpp, boxes, strict=True)}}
        if job.qc:
            sampled = []
            per_target = max(1, params.qc_max_tiles // max(1, len(boxes)))
            for xs, ys, footprint in boxes:
                keep = sample_evenly(xs.size, per_target)
                sampled.append((xs[keep], ys[keep], footprint))
            write_qc(Path(job.qc), render_qc(thumb.image, mask, thumb.scale, sampled, params.qc_side))
        save_cache(Path(job.cache), columns, meta)
    except SlideError as err:
        return SlideOutcome(job.line, False, err.reason, seconds=time.perf_counter() - start)
    except Exception as err:  # a reader library failing in its own way on a damaged file
        return SlideOutcome(job.line, False, f"{type(err).__name__}: {err}", seconds=time.perf_counter() - start)
    return SlideOutcome(job.line, True, meta=meta, seconds=time.perf_counter() - start)


def params_digest(tissue: TissueParams, params: IndexParams, reader: str) -> dict[str, Any]:
    """Everything in the config that changes a slide's tiles."""
    return {"tissue": asdict(tissue), "tiling": params.tiling(), "reader": reader}
