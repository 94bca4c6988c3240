"""``foundation eval WEIGHTS --tiles DIR [--protocol knn,linear] [--group-by REGEX] --out FILE.json``.

Class-per-folder tiles are embedded once per feature source: the encoder, a random init of the same architecture
and an RGB colour histogram (``--baselines``); each is probed by kNN and logistic regression over grouped folds and
several seeds (:mod:`foundation.eval.classification`). The markdown table is printed and written as
``FILE.md``; FILE.json holds the table, per-seed metrics, summaries, the task and the settings.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig

from foundation.config import ConfigError, to_dict
from foundation.eval.baselines import BASELINES, ColorHistogram
from foundation.eval.classification import ProbeSettings, check_protocols, evaluate_features
from foundation.eval.cli_common import (
    EXIT_BAD_INPUT,
    INPUT_ERRORS,
    Setup,
    add_encoder_arguments,
    add_overrides_argument,
    override,
    setup,
)
from foundation.eval.embed import FeatureSource, extract, loader
from foundation.eval.metrics import CLASSIFICATION_METRICS
from foundation.eval.report import markdown_table, publish_report
from foundation.eval.tiles import TileDataset, scan_tiles, source_ids
from foundation.eval.weights import RANDOM_PREFIX

log = logging.getLogger(__name__)


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_encoder_arguments(parser)
    parser.add_argument("--tiles", type=Path, required=True, help="class-per-folder tile folder")
    parser.add_argument("--protocol", type=_list, help="comma list of knn, linear (eval.protocols)")
    parser.add_argument("--group-by", help="regex on file names, first group = source id (eval.splits.group_by)")
    parser.add_argument("--baselines", type=_list, help="comma list of random, color_histogram, or none "
                                                        "(eval.baselines)")
    parser.add_argument("--out", type=Path, required=True, help="report FILE.json (the table goes to FILE.md)")
    add_overrides_argument(parser)


def extra_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.protocol is not None:
        out.append(override("eval.protocols", args.protocol))
    if args.baselines is not None:
        out.append(override("eval.baselines", [b for b in args.baselines if b != "none"]))
    if args.group_by is not None:
        out.append(override("eval.splits.group_by", args.group_by))
    return out


def feature_sources(s: Setup, weights: str) -> dict[str, FeatureSource]:
    """The encoder under its WEIGHTS name, then the baselines of ``eval.baselines``."""
    baselines = list(s.cfg.eval.baselines)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"eval.baselines {unknown}: choose from {list(BASELINES)} (or none)")
    sources: dict[str, FeatureSource] = {weights: s.encoder}
    if "random" in baselines:
        if weights.startswith(RANDOM_PREFIX):
            log.info("WEIGHTS is itself a random init: no separate random baseline")
        else:
            sources["random init"] = s.encoder.random_twin(int(s.cfg.eval.seed))
    if "color_histogram" in baselines:
        sources["color histogram"] = ColorHistogram(int(s.cfg.eval.color_histogram.bins), s.encoder.patch_size)
    return sources


def check_probe_settings(cfg: DictConfig) -> None:
    """Protocols and probe settings, checked before the encoder is loaded."""
    check_protocols(list(cfg.eval.protocols))
    ProbeSettings.from_config(to_dict(cfg.eval))


def run(args: argparse.Namespace) -> int:
    try:
        s = setup(args, extra_overrides(args), check=check_probe_settings)
        ev = s.cfg.eval
        protocols = check_protocols(list(ev.protocols))
        settings = ProbeSettings.from_config(to_dict(ev))
        tiles = scan_tiles(args.tiles, list(ev.embed.extensions), labelled=True)
        groups = source_ids(tiles.relative_names(), ev.splits.group_by)
        sources = feature_sources(s, args.weights)
        log.info("%d tiles, %d classes, %d sources; feature sources: %s", len(tiles), len(tiles.class_names),
                 len(set(groups)), ", ".join(sources))
        batches = loader(TileDataset(tiles.paths, s.image_size), int(ev.embed.batch_size),
                         int(ev.embed.num_workers), s.device)
        features = extract(sources, batches, str(ev.embed.pooling), s.device, bool(ev.embed.bf16))
        results = {name: evaluate_features(x, tiles.labels, groups, protocols, settings)
                   for name, x in features.items()}
    except (*INPUT_ERRORS, ConfigError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    table = markdown_table(results, CLASSIFICATION_METRICS)
    counts = Counter(tiles.class_names[i] for i in tiles.labels)
    task = {"tiles": str(args.tiles), "num_tiles": len(tiles), "classes": list(tiles.class_names),
            "tiles_per_class": dict(counts), "num_sources": len(set(groups)),
            "group_by": ev.splits.group_by, "image_size": s.image_size, "pooling": str(ev.embed.pooling),
            "stain": s.encoder.label}
    publish_report(args.out, table, task, args.weights, sources, results, to_dict(ev))
    return 0
