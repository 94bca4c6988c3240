"""``foundation quickstart [--out DIR]``: the main job, end to end on the embedded demo slides.

It runs the same commands a user would type, in order, and stops at the first that fails:

1. ``foundation demo-data DIR/demo``                     demo slides + manifest
2. ``foundation index DIR/demo/manifest.csv --out DIR/index``  tissue detection + tile grid
3. ``foundation train --config PRESET --index DIR/index meta.output_dir=DIR/run``  short pretraining
4. ``foundation export DIR/run DIR/encoder``             the teacher backbone as timm weights

The preset defaults to ``cpu_smoke`` (a tiny ViT, a few minutes on a 2-core CPU); on a machine with a GPU the
data pipeline and the model move there (``data.pipeline.device=gpu``, bf16). Extra ``key=value`` arguments go to
``train``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"),
                        help="folder for everything it writes (default: runs/quickstart)")
    parser.add_argument("--config", dest="preset", default="cpu_smoke",
                        help="training preset in configs/experiments (default: cpu_smoke)")
    parser.add_argument("--skip-train", action="store_true", help="stop after the index (data set-up only)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for `train`")


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def steps(args: argparse.Namespace) -> list[list[str]]:
    """The command lines quickstart runs, in order (``foundation`` omitted)."""
    out: Path = args.out
    demo, index, run, encoder = out / "demo", out / "index", out / "run", out / "encoder"
    commands = [
        ["demo-data", str(demo)],
        ["index", str(demo / "manifest.csv"), "--out", str(index)],
    ]
    if args.skip_train:
        return commands
    train = ["train", "--config", args.preset, "--index", str(index), f"meta.output_dir={run}"]
    if _gpu_available():
        train += ["data.pipeline.device=gpu", "train.precision=bf16"]
    commands.append([*train, *args.overrides])
    commands.append(["export", str(run), str(encoder)])
    return commands


def run(args: argparse.Namespace) -> int:
    from foundation.cli import main
    from foundation.config import ConfigError, load_config
    from foundation.train.trainer import validate

    try:  # the preset and overrides are checked before the demo data is written (also with --skip-train)
        validate(load_config(args.preset, list(args.overrides)))
    except ConfigError as err:
        log.error("%s", err)
        return 2
    for command in steps(args):
        log.info("quickstart: foundation %s", " ".join(command))
        code = main(["-v", *command] if args.verbose else command)
        if code != 0:
            log.error("quickstart: `foundation %s` failed with exit code %d", " ".join(command), code)
            return code
    out: Path = args.out
    if not args.skip_train:
        log.info("quickstart done. TensorBoard: tensorboard --logdir %s; encoder: %s (see README, 'Exported encoder')",
                 out / "run" / "tensorboard", out / "encoder")
    return 0
