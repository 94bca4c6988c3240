"""What the eval commands share: arguments, flag -> config overrides, config and encoder setup, exit codes."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from foundation.config import load_config
from foundation.eval.embed import resolve_device
from foundation.eval.encoder import POOLINGS, Encoder
from foundation.eval.weights import load_encoder

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
#: errors that mean bad input (a path, a key, a value), reported in one line with exit code 2
INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError)


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """WEIGHTS and the flags every eval command takes (positional ``key=value`` overrides come last)."""
    parser.add_argument("weights", help="export folder, training run / checkpoints / step folder, or "
                                        "random:[<model>] (random init of configs/model/<model>.yaml)")
    parser.add_argument("--student", action="store_true", help="training checkpoints: the student, not the teacher")
    parser.add_argument("--stain", help="stain label given to the encoder (eval.embed.stain), e.g. H&E, IHC")
    parser.add_argument("--marker", help="IHC marker label (eval.embed.marker), e.g. Ki67")
    parser.add_argument("--pooling", choices=POOLINGS, help="eval.embed.pooling")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="eval.device")
    parser.add_argument("--batch-size", type=int, help="eval.embed.batch_size")
    parser.add_argument("--image-size", type=int, help="encoder input side in pixels (eval.embed.image_size)")
    parser.add_argument("--config", dest="preset", help="preset name in configs/experiments or a YAML path")


def add_overrides_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.knn.k=10")


def override(key: str, value: object) -> str:
    """``key=<value as JSON>``: JSON is YAML flow syntax, so strings (regexes, ``H&E``) arrive verbatim."""
    return f"{key}={json.dumps(value)}"


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The shared flags as dotlist overrides (applied after the positional ones, so flags win)."""
    out = []
    for flag, key in (("stain", "eval.embed.stain"), ("marker", "eval.embed.marker"),
                      ("pooling", "eval.embed.pooling"), ("device", "eval.device"),
                      ("batch_size", "eval.embed.batch_size"), ("image_size", "eval.embed.image_size")):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(override(key, value))
    return out


@dataclass
class Setup:
    cfg: DictConfig
    encoder: Encoder
    device: torch.device
    image_size: int


def setup(args: argparse.Namespace, extra: list[str] = (),
          check: Callable[[DictConfig], None] | None = None) -> Setup:
    """Config (preset, positional overrides, ``extra``, then the flags), device and encoder on it.

    ``check(cfg)`` runs before the encoder is loaded (seconds for a large one), so bad settings stop at once.
    """
    cfg = load_config(args.preset, [*args.overrides, *extra, *flag_overrides(args)])
    if check is not None:
        check(cfg)
    device = resolve_device(str(cfg.eval.device))
    encoder = load_encoder(args.weights, cfg, cfg.eval.embed.stain, cfg.eval.embed.marker, args.student)
    size = cfg.eval.embed.image_size
    image_size = int(size) if size is not None else encoder.image_size
    encoder.check_size(image_size, image_size)
    log.info("encoder: %s (dim %d, input %d px, %s)", encoder.name, encoder.embed_dim, image_size, device)
    return Setup(cfg, encoder.to(device), device, image_size)
