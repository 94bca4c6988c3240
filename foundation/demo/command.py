"""``foundation demo-data DIR [--config PRESET] [--seed N] [key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from foundation.config import ConfigError, load_config
from foundation.demo.dataset import write_demo_dataset

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", type=Path, help="output folder (created if missing)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. demo.he_slides=4")
    parser.add_argument("--config", default=None, help="preset name in configs/experiments or a YAML path")
    parser.add_argument("--seed", type=int, default=None, help="shorthand for demo.seed=N")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"demo.seed={args.seed}")
    start = time.perf_counter()
    try:
        cfg = load_config(args.config, overrides)
        manifest = write_demo_dataset(args.dir, cfg.demo)
    except (ConfigError, NotADirectoryError) as err:
        log.error("%s", err)
        return 2
    log.info("demo data set: %s (%.1f s)", manifest, time.perf_counter() - start)
    return 0
