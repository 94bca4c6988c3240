"""``foundation export CKPT OUT [--student] [--stain NAME] [--marker NAME]``: a training checkpoint as timm weights.

``CKPT`` is a run folder (its ``checkpoints/latest`` is followed), its ``checkpoints`` folder or one
``step_XXXXXXXX`` folder. The objective is rebuilt from the run's ``config.yaml``; the teacher backbone is
exported (the student with ``--student``, or when the objective has no teacher) as described in
:mod:`foundation.export`: ``model.safetensors`` + ``config.json`` (strict, offline ``timm.create_model``),
the stain-token table and the vocabulary beside them. ``--stain``/``--marker`` choose the label folded into
the timm weights (default ``unknown``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="run folder, its checkpoints folder or a step_XXXXXXXX folder")
    parser.add_argument("out", type=Path, help="export folder (created)")
    parser.add_argument("--student", action="store_true", help="export the student instead of the EMA teacher")
    parser.add_argument("--stain", help="stain label folded into the timm weights (default unknown)")
    parser.add_argument("--marker", help="IHC marker label folded into the timm weights")


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from foundation.config import to_dict
    from foundation.eval.checkpoints import CheckpointFormatError, load_backbone, run_config_path, tag_dir
    from foundation.export import export_backbone, timm_load_args
    from foundation.objectives import build_objective
    from stain.vocabulary import StainVocabulary

    try:
        tag = tag_dir(args.checkpoint)
        config_path = run_config_path(tag)
        if config_path is None:
            raise CheckpointFormatError(f"{tag}: no config.yaml of the run next to the checkpoint")
        cfg = OmegaConf.load(config_path)
        objective = build_objective(cfg)
        backbone, origin = load_backbone(tag, objective, student=args.student)
        vocab = StainVocabulary.from_config(to_dict(cfg.stain))
        out = export_backbone(backbone, to_dict(cfg.model), vocab, args.out, stain=args.stain, marker=args.marker,
                              mean=list(cfg.data.crops.mean), std=list(cfg.data.crops.std))
    except (CheckpointFormatError, KeyError, ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    arch, _ = timm_load_args(out)
    log.info("exported the %s to %s (timm architecture %s); load it with foundation.export.load_exported(%r) "
             "or timm.create_model as in the README", origin, out, arch, str(out))
    return 0
