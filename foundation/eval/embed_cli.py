"""``foundation embed WEIGHTS INPUT --out FILE``: features of a tile folder or of sampled tiles of indexed slides.

INPUT is a tile folder (recursive; class-per-folder gives labels) or a ``foundation index`` folder, from which
``eval.embed.slide_tiles`` tiles are drawn (seed ``eval.seed``), each given its slide's stain label from the index
unless ``--stain``/``--marker`` name one for all. FILE ends in ``.npz`` or ``.safetensors``
(layout: :mod:`foundation.eval.embed`). Exit code 2 on bad input (message names the path, key or value).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from foundation.config import ConfigError, to_dict
from foundation.eval.cli_common import (
    EXIT_BAD_INPUT,
    INPUT_ERRORS,
    add_encoder_arguments,
    add_overrides_argument,
    override,
    setup,
)
from foundation.eval.embed import Embeddings, extract, loader, save_embeddings
from foundation.eval.indexed import IndexedTiles
from foundation.eval.tiles import TileDataset, scan_tiles
from foundation.slides.errors import SlideError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_encoder_arguments(parser)
    parser.add_argument("input", type=Path, help="tile folder (class-per-folder optional) or tile-index folder")
    parser.add_argument("--out", type=Path, required=True, help="feature file: .npz or .safetensors")
    parser.add_argument("--slide-tiles", type=int, help="tiles sampled from an index (eval.embed.slide_tiles)")
    add_overrides_argument(parser)


INDEX_LABELS = "per tile: its slide's stain and marker in the index"


def is_index(path: Path) -> bool:
    return (path / "slides").is_dir() and (path / "tiles").is_dir()


def run(args: argparse.Namespace) -> int:
    extra = [override("eval.embed.slide_tiles", args.slide_tiles)] if args.slide_tiles is not None else []
    try:
        if args.out.suffix not in (".npz", ".safetensors"):
            raise ValueError(f"--out {args.out}: the feature file must end in .npz or .safetensors")
        s = setup(args, extra)
        emb_cfg = s.cfg.eval.embed
        stain = s.encoder.label
        if is_index(args.input):
            # each tile gets its slide's label from the index, unless --stain/--marker name one for all
            per_tile = emb_cfg.stain is None and emb_cfg.marker is None and s.encoder.takes_labels
            stain = INDEX_LABELS if per_tile else stain
            dataset = IndexedTiles(args.input, int(emb_cfg.slide_tiles), int(s.cfg.eval.seed), s.image_size,
                                   str(s.cfg.slides.reader), labels=per_tile)
            names, labels, class_names, arrays = dataset.names(), None, [], dataset.arrays()
            kind = "slides"
        else:
            tiles = scan_tiles(args.input, list(emb_cfg.extensions))
            dataset = TileDataset(tiles.paths, s.image_size)
            names, labels, class_names, arrays = tiles.relative_names(), tiles.labels, list(tiles.class_names), {}
            kind = "tiles"
        log.info("embedding %d tiles (%s) from %s", len(dataset), kind, args.input)
        batches = loader(dataset, int(emb_cfg.batch_size), int(emb_cfg.num_workers), s.device)
        features = extract({"encoder": s.encoder}, batches, str(emb_cfg.pooling), s.device, bool(emb_cfg.bf16))
    except (*INPUT_ERRORS, ConfigError, SlideError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    metadata = {
        "weights": args.weights, "encoder": s.encoder.describe(), "input": str(args.input), "input_kind": kind,
        "image_size": s.image_size, "pooling": str(emb_cfg.pooling), "stain": stain,
        "student": bool(args.student), "eval_config": to_dict(s.cfg.eval),
    }
    emb = Embeddings(features["encoder"].astype(np.float32), names, labels, class_names, arrays, metadata)
    save_embeddings(args.out, emb)
    log.info("wrote %s: %d x %d features", args.out, *emb.features.shape)
    return 0
