"""``foundation checkpoint universal CKPT [--out DIR]``: a checkpoint that resumes on any number of ranks.

``CKPT`` is a tag folder (``<run>/checkpoints/step_XXXXXXXX``), a run folder or its ``checkpoints`` folder (the
checkpoint ``latest`` names is taken, as a resume would). The output (default ``<tag>_universal`` beside the tag)
holds DeepSpeed's universal engine state, the student's module buffers, the whole fp32 teacher and the data
position, and ``latest_universal`` beside it names it (as DeepSpeed's converter does); resume with
``foundation train ... train.resume=DIR`` (or ``--resume DIR``) on any world size.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["universal"], help="universal: convert for another world size")
    parser.add_argument("checkpoint", type=Path, help="tag folder, run folder or checkpoints folder")
    parser.add_argument("--out", type=Path, help="output folder (default: <tag>_universal beside the tag)")


def run(args: argparse.Namespace) -> int:
    from foundation.train.checkpoint import CheckpointError, resolve_resume
    from foundation.train.universal import convert

    try:
        tag = resolve_resume(args.checkpoint, str(args.checkpoint))
        if tag is None:
            raise CheckpointError(f"{args.checkpoint}: no complete checkpoint")
        out = args.out or tag.with_name(f"{tag.name}_universal")
        convert(tag, out)
    except CheckpointError as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    log.info("universal checkpoint of %s written to %s; resume with train.resume=%s on any number of ranks",
             tag, out, out)
    return 0
