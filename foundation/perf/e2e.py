"""``foundation bench e2e``: the full training loop on real slides: images/s and the share of time waiting for data.

It runs what ``foundation train`` runs (objective, DALI loader on a tile index, DeepSpeed engine, EMA teacher,
the loop) for ``(warmup_windows + 1) * steps`` iterations with ``train.log_every = steps`` in a fresh output
folder, pictures off and the checkpoint only at the end; each log window's ``perf/images_per_s`` and
``perf/data_wait_share`` (the loop's own meter: wall-clock of the window, time blocked in ``next(data)``) are read
back from ``metrics.jsonl``. The last window is reported; the first ``warmup_windows`` hold start-up. Without
``--index`` the real slides are indexed on the fly (as ``foundation bench data`` does).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COLUMNS = (("name", "config"), ("images_per_s", "img/s"), ("data_wait_share", "data wait"),
           ("step_time_s", "step s"), ("peak_memory_gb", "peak GB"), ("loss", "loss"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from foundation.data.bench import BENCH_SLIDES

    parser.add_argument("--config", dest="preset", help="preset name or YAML path (benchmarks/e2e_cpu.yaml)")
    parser.add_argument("--index", type=Path, help="an existing tile index (default: index the real test slides)")
    parser.add_argument("--data", type=Path,
                        help="shared data folder (default $FOUNDATION_TEST_DATA or ../shared/data)")
    parser.add_argument("--slides", choices=sorted(BENCH_SLIDES), default="jpeg", help="which real slides to index")
    parser.add_argument("--steps", type=int, help="steps per log window (bench.e2e.steps)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_e2e.json"), help="JSON result file")
    parser.add_argument("--tensorboard", type=Path, help="also write the figures as TensorBoard scalars here")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _windows(run_dir: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "perf/images_per_s" in r]


def run_e2e(cfg: Any, index_dir: Path, dist: Any) -> dict[str, Any]:
    """Train as ``foundation train`` on ``index_dir``; returns the figures of every log window."""
    from foundation.data.loader import build_loader
    from foundation.models.param_groups import param_groups
    from foundation.objectives import build_objective
    from foundation.slides.index import TileIndex
    from foundation.train.trainer import run_dir, run_training, seed_everything

    seed_everything(int(cfg.meta.seed))
    objective = build_objective(cfg)
    groups = param_groups(objective, cfg)
    patch = int(objective.backbone().patch_embed.patch_size[0])
    device_id = dist.local_rank if dist.device.type == "cuda" else None
    loader = build_loader(cfg, TileIndex.load(index_dir), dist.rank, dist.world_size, device_id=device_id,
                          patch_size=patch, keys=objective.required_batch_keys)
    try:
        run_training(cfg, objective, groups, loader, dist)
    finally:
        loader.close()
    windows = _windows(run_dir(cfg)) if dist.rank == 0 else []
    last = windows[-1] if windows else {}
    return {
        "objective": str(cfg.objective.name), "model": str(cfg.defaults.model),
        "batch_per_rank": int(cfg.data.pipeline.batch_size), "world_size": dist.world_size,
        "zero": int(cfg.deepspeed.zero_optimization.stage), "precision": str(cfg.train.precision),
        "pipeline_device": str(cfg.data.pipeline.device), "iterations": int(cfg.train.iterations),
        "images_per_s": last.get("perf/images_per_s"), "data_wait_share": last.get("perf/data_wait_share"),
        "step_time_s": last.get("perf/step_time_s"), "peak_memory_gb": last.get("perf/peak_memory_gb"),
        "loss": last.get("loss/total"), "windows": windows,
    }


def run(args: argparse.Namespace) -> int:
    from foundation.config import ConfigError, load_config, to_dict
    from foundation.data.bench import _data_dir, _index_real_slides
    from foundation.perf.measure import environment
    from foundation.perf.report import table, write_json, write_tensorboard
    from foundation.train.engine import init_distributed
    from foundation.train.trainer import validate

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        try:
            cfg = load_config(args.preset, list(args.overrides))
            steps = int(args.steps or cfg.bench.e2e.steps)
            total = steps * (int(cfg.bench.e2e.warmup_windows) + 1)
            cfg = load_config(args.preset, [
                *args.overrides, f"meta.output_dir={Path(tmp) / 'run'}", f"train.iterations={total}",
                f"train.log_every={steps}", "train.image_every=0", "train.checkpoint_every=0",
                "train.progress_bar=false"])
            validate(cfg)
        except ConfigError as err:
            log.error("%s", err)
            return 2
        dist = init_distributed()
        index_dir = args.index
        if index_dir is None:
            index_dir = Path(tmp) / "indexed"
            if dist.rank == 0:
                index_dir = _index_real_slides(_data_dir(args.data), Path(tmp), cfg, args.slides)
            else:
                raise ConfigError("several ranks: pass --index (build it once with `foundation index`)")
        row = run_e2e(cfg, index_dir, dist)
    if dist.rank == 0:
        row["name"] = f"{row['objective']} {row['model']} b{row['batch_per_rank']}x{row['world_size']} " \
                      f"z{row['zero']} {row['precision']} data:{row['pipeline_device']}"
        payload = {"kind": "e2e", "environment": environment(dist.device), "results": [row],
                   "index": str(args.index) if args.index else f"real slides ({args.slides}), indexed on the fly",
                   "config": to_dict(cfg)}
        write_json(args.out, payload)
        if args.tensorboard:
            write_tensorboard(args.tensorboard, [{k: v for k, v in row.items() if k != "windows"}], "name")
        print(table([row], COLUMNS))
        print(f"JSON: {args.out}")
    return 0
