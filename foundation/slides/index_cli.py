"""``foundation index MANIFEST --out DIR``: detect tissue and build the tile index of a manifest.

The flags override ``cfg.index.*``; ``key=value`` arguments override any config key (put them before
``--mpp``, whose list would swallow them). Slides that cannot be indexed are listed in
``DIR/errors.csv`` and the run goes on; the exit code is 1 only with ``--strict`` when a slide failed,
2 when the manifest or the config is invalid.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from foundation.config import ConfigError, load_config, save_config, to_dict
from foundation.slides.index import build_index
from foundation.slides.manifest import ManifestError, read_manifest
from foundation.slides.slide_tiles import IndexParams
from foundation.slides.tissue import TissueParams
from stain.vocabulary import StainVocabulary

log = logging.getLogger(__name__)

EXIT_FAILED_SLIDES = 1
EXIT_BAD_INPUT = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, help="CSV with columns path, stain, marker, group, mpp, slide_id")
    parser.add_argument("--out", type=Path, required=True, help="index folder (created; re-runs are incremental)")
    parser.add_argument("--mpp", type=float, nargs="+", help="target pixel sizes in µm/px (index.mpp)")
    parser.add_argument("--tile-size", type=int, help="tile side in pixels at the target pixel size (index.tile_size)")
    parser.add_argument("--min-tissue", type=float, help="minimum tissue share of a tile (index.min_tissue)")
    parser.add_argument("--workers", type=int, help="slide-reading processes (index.workers)")
    parser.add_argument("--qc", action="store_true", default=None, help="write DIR/qc/<slide>.png (index.qc)")
    parser.add_argument("--strict", action="store_true", default=None,
                        help="exit code 1 when any slide failed (index.strict)")
    parser.add_argument("--config", dest="preset", help="preset name in configs/experiments or a YAML path")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. tissue.closing_radius=3")


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The index flags as dotlist overrides (applied after the positional ones, so flags win)."""
    out = []
    if args.mpp is not None:
        out.append(f"index.mpp=[{', '.join(repr(float(v)) for v in args.mpp)}]")
    for flag, key in (("tile_size", "tile_size"), ("min_tissue", "min_tissue"), ("workers", "workers")):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"index.{key}={value!r}")
    for flag in ("qc", "strict"):
        if getattr(args, flag):
            out.append(f"index.{flag}=true")
    return out


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.preset, [*args.overrides, *flag_overrides(args)])
        tissue = TissueParams.from_config(to_dict(cfg.tissue))
        params = IndexParams.from_config(to_dict(cfg.index))
        vocabulary = StainVocabulary.from_config(to_dict(cfg.stain))
        rows = read_manifest(args.manifest, vocabulary, root=cfg.slides.root)
    except (ConfigError, ManifestError, ValueError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    args.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, args.out / "config.yaml")
    log.info("indexing %d slides at %s µm/px with %d workers into %s", len(rows),
             ", ".join(f"{m:g}" for m in params.mpp), params.workers, args.out)
    summary = build_index(rows, args.out, tissue, params, reader=cfg.slides.reader, manifest=str(args.manifest))
    log.info("summary: %s", json.dumps(summary))
    if summary["slides_failed"]:
        log.warning("%d of %d slides failed: see %s", summary["slides_failed"], summary["slides_total"],
                    args.out / "errors.csv")
        if params.strict:
            return EXIT_FAILED_SLIDES
    return 0
