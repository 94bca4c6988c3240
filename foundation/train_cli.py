"""``foundation train [--config PRESET] [--index DIR] [key=value ...]``: pretrain on an indexed slide set.

One process per rank. Without a launcher it is a one-rank job; under ``deepspeed`` or ``torchrun`` every rank
runs this same command (``python -m foundation.train ...``; see launch/README.md). Order of work:

1. compose and validate the config (exit 2 on a bad key or value: nothing is written, nothing is built);
2. join the process group, write the resolved config into ``meta.output_dir`` (rank 0);
3. build the objective and its parameter groups, open the tile index and this rank's DALI loader;
4. train, resuming as ``--resume``/``train.resume`` says (auto: the checkpoint `checkpoints/latest` names; a bad PATH
   exits 2 before any work); exit 3 when too many non-finite losses in a row stop the run (the last checkpoint
   is kept as it was); SIGTERM/SIGINT/SIGUSR1 finish the step, save and exit 0.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from foundation.config import ConfigError, load_config, save_config

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
CONFIG_FILE = "config.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", dest="preset", help="preset name in configs/experiments or a YAML path")
    parser.add_argument("--index", type=Path, help="tile index folder from `foundation index` (train.index)")
    parser.add_argument("--resume", help="auto (the checkpoint checkpoints/latest names), none, or a checkpoint PATH "
                        "(train.resume)")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.iterations=50")


def _quiet_other_ranks(rank: int, verbose: bool) -> None:
    """Rank 0 logs at INFO; the others only warnings. DeepSpeed's own INFO chatter only with --verbose."""
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    if not verbose:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def check_index(index_dir: Path) -> None:
    """Stop before any work when ``index_dir`` is not a readable tile index with tiles to sample."""
    from foundation.slides.index import TileIndex

    if not (index_dir / "slides").is_dir():
        raise ConfigError(f"train.index={index_dir}: not a tile index folder (run `foundation index` first)")
    try:
        index = TileIndex.load(index_dir)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"train.index={index_dir}: not a readable tile index ({err}); run `foundation index` "
                          "again") from err
    if len(index) == 0:
        raise ConfigError(f"train.index={index_dir}: the index holds no tiles ({len(index.slides)} slides; see "
                          f"{index_dir / 'summary.json'}: a slide coarser than every target µm/px, or with too "
                          "little tissue, gives none)")


def check_data_device(cfg: Any) -> None:
    """A GPU data pipeline needs a GPU: say which key to change instead of failing in CUDA's initialisation."""
    import torch

    if str(cfg.data.pipeline.device) == "gpu" and not torch.cuda.is_available():
        raise ConfigError("data.pipeline.device=gpu but this machine has no CUDA device: set "
                          "data.pipeline.device=cpu (and train.precision=fp32 for speed on the CPU)")


def build_model(cfg: Any) -> Any:
    """The objective with its backbone, heads and teacher; a model or objective value that cannot be built, or
    crop sizes the patch grid does not divide, raise :class:`ConfigError` naming the value."""
    from foundation.objectives import build_objective
    from foundation.train.trainer import build_schedules, check_unused_weights, launch_world_size

    try:
        objective = build_objective(cfg)
    except (ValueError, KeyError) as err:
        raise ConfigError(f"cannot build the model and objective: {err}") from err
    check_unused_weights(objective, build_schedules(cfg, launch_world_size()))
    patch = objective.backbone().patch_embed.patch_size[0]
    crops = cfg.data.crops
    sizes = {"data.crops.global_size": int(crops.global_size)}
    if "local_crops" in objective.required_batch_keys and int(crops.local_count) > 0:
        sizes["data.crops.local_size"] = int(crops.local_size)
    for key, size in sizes.items():
        if size % patch:
            raise ConfigError(f"{key}={size} is not a multiple of the patch size {patch} (model.patch_size)")
    return objective


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.index is not None:
        overrides.append(f"train.index={args.index}")
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    try:
        cfg = load_config(args.preset, overrides)
        from foundation.train.trainer import validate

        validate(cfg)
        if not cfg.train.index:
            raise ConfigError("no tile index: pass --index DIR or set train.index (build one with `foundation index`)")
        index_dir = Path(str(cfg.train.index))
        check_index(index_dir)
        from foundation.train.trainer import CHECKPOINT_DIR, find_resume, run_dir, seed_everything

        find_resume(cfg, run_dir(cfg) / CHECKPOINT_DIR)  # a bad or incomplete train.resume stops here
        check_data_device(cfg)
        seed_everything(int(cfg.meta.seed))
        objective = build_model(cfg)  # model and objective values are checked as they are built
    except ConfigError as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT

    from foundation.data.loader import build_loader
    from foundation.models.param_groups import param_groups
    from foundation.slides.index import TileIndex
    from foundation.train.checkpoint import CheckpointError
    from foundation.train.engine import init_distributed
    from foundation.train.loop import NonFiniteLossError
    from foundation.train.trainer import run_training

    dist = init_distributed()
    _quiet_other_ranks(dist.rank, bool(getattr(args, "verbose", False)))
    out = run_dir(cfg)
    if dist.rank == 0:
        save_config(cfg, out / CONFIG_FILE)
        log.info("run folder %s (config written), %d rank(s) on %s", out, dist.world_size, dist.device)
    groups = param_groups(objective, cfg)
    index = TileIndex.load(index_dir)
    patch = objective.backbone().patch_embed.patch_size[0]
    device_id = dist.local_rank if dist.device.type == "cuda" else None
    loader = build_loader(cfg, index, dist.rank, dist.world_size, device_id=device_id, patch_size=patch,
                          keys=objective.required_batch_keys)
    try:
        result = run_training(cfg, objective, groups, loader, dist)
    except NonFiniteLossError as err:
        log.error("%s", err)
        return EXIT_NONFINITE
    except (CheckpointError, ConfigError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    finally:
        loader.close()
    if result.state.stopped:
        log.info("stopped by a signal at step %d (checkpoint saved); resume with --resume auto", result.state.iteration)
        return 0
    if dist.rank == 0:
        log.info("done: %d steps; TensorBoard: tensorboard --logdir %s; checkpoints in %s",
                 result.state.iteration, out / "tensorboard", result.checkpoints)
    return 0
