"""``foundation eval-seg WEIGHTS --images DIR --masks DIR --out FILE.json``: the Ki67 segmentation demonstrator.

A 1x1-conv decoder on the frozen patch tokens of the encoder, of its random twin and of per-patch colour histograms
(``eval.baselines``), trained per fold on crops of the images (:mod:`foundation.eval.segmentation`); Dice per
class on the held-out images. The table is printed and written as ``FILE.md``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from foundation.config import ConfigError, to_dict
from foundation.eval.baselines import BASELINES, ColorHistogram
from foundation.eval.cli_common import (
    EXIT_BAD_INPUT,
    INPUT_ERRORS,
    add_encoder_arguments,
    add_overrides_argument,
    setup,
)
from foundation.eval.report import markdown_table, publish_report
from foundation.eval.seg_data import CLASSES, load_pairs
from foundation.eval.segmentation import PatchSource, SegParams, evaluate_segmentation
from foundation.eval.weights import RANDOM_PREFIX

log = logging.getLogger(__name__)

SEG_METRICS = (*(f"dice_{c}" for c in CLASSES), "mean_fg_dice")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_encoder_arguments(parser)
    parser.add_argument("--images", type=Path, required=True, help="folder of RGB images")
    parser.add_argument("--masks", type=Path, required=True, help="folder of colour masks with the same file names")
    parser.add_argument("--out", type=Path, required=True, help="report FILE.json (the table goes to FILE.md)")
    add_overrides_argument(parser)


def run(args: argparse.Namespace) -> int:
    try:
        s = setup(args)
        ev = s.cfg.eval
        params = SegParams.from_config(to_dict(ev.segmentation))
        s.encoder.check_size(params.crop_size, params.crop_size)
        images = load_pairs(args.images, args.masks, params.mask_threshold, params.boundary)
        baselines = list(ev.baselines)
        unknown = [b for b in baselines if b not in BASELINES]
        if unknown:
            raise ConfigError(f"eval.baselines {unknown}: choose from {list(BASELINES)}")
        sources: dict[str, PatchSource] = {args.weights: s.encoder}
        if "random" in baselines and not args.weights.startswith(RANDOM_PREFIX):
            sources["random init"] = s.encoder.random_twin(int(ev.seed))
        if "color_histogram" in baselines:
            sources["color histogram"] = ColorHistogram(int(ev.color_histogram.bins), s.encoder.patch_size)
        log.info("%d images, %s split, crops of %d px; sources: %s", len(images), params.split, params.crop_size,
                 ", ".join(sources))
        results = evaluate_segmentation(sources, images, params, s.device, int(ev.seed), int(ev.embed.batch_size),
                                        bool(ev.embed.bf16))
    except (*INPUT_ERRORS, ConfigError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    table = markdown_table({name: {params.split: r} for name, r in results.items()}, SEG_METRICS, row_key="split")
    task = {"images": str(args.images), "masks": str(args.masks), "names": [im.name for im in images],
            "classes": list(CLASSES), "boundary": params.boundary, "crop_size": params.crop_size,
            "stain": s.encoder.label}
    publish_report(args.out, table, task, args.weights, sources, results, to_dict(ev))
    return 0
