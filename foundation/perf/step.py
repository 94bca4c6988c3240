"""``foundation bench step``: our training step against a plain-PyTorch reference step, same run, same device.

For each combination of ``--model``, ``--objective``, ``--batch`` and ``--zero``: one objective is built (the
config's seed), deep-copied for the reference (:mod:`foundation.perf.reference`), and both sides run on one
synthetic batch (:mod:`foundation.perf.synth`). The reference runs first and is freed before ours
(:mod:`foundation.perf.ours`) is built, so each side's peak memory is its own. Each side: ``warmup`` steps, then
``repeats`` timings of ``steps`` steps each, the device synchronised around each; the median is reported.
FLOPs of one forward+backward are counted once (torch's FLOP counter, on the reference: the same maths); MFU is
against a GEMM in the compute dtype measured on this device in this run. Under a launcher every rank runs it (the
reference per rank, without communication); rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import logging
import math
import traceback
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# images/s are per rank (batch per rank / step time); ours_images_per_s_all_ranks in the JSON sums the ranks.
COLUMNS = (("name", "config"), ("ours_images_per_s", "ours img/s"), ("ref_images_per_s", "ref img/s"),
           ("ratio", "ours/ref"), ("gflop_per_image", "GFLOP/img"), ("ours_tflops", "ours TFLOP/s"),
           ("ours_mfu", "ours MFU"), ("ref_mfu", "ref MFU"), ("ours_peak_gb", "ours GB"), ("ref_peak_gb", "ref GB"))

PROFILE_COLUMNS = (("name", "config"), ("ours_step_s", "ours s/step"), ("ours_device_ms", "ours kernel ms"),
                   ("ours_idle_share", "ours idle"), ("ref_step_s", "ref s/step"), ("ref_device_ms", "ref kernel ms"),
                   ("ref_idle_share", "ref idle"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", dest="preset", help="preset in configs/experiments or a YAML path "
                        "(benchmarks/step_cpu.yaml, benchmarks/step_gpu.yaml)")
    parser.add_argument("--model", nargs="+", help="model config names (configs/model): vit_test vit_base ...")
    parser.add_argument("--objective", nargs="+", help="objective config names: ibot mae ...")
    parser.add_argument("--batch", nargs="+", help="samples per rank (data.pipeline.batch_size)")
    parser.add_argument("--zero", nargs="+", help="ZeRO stages (deepspeed=zeroN)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="train.precision")
    parser.add_argument("--compile", action="store_true",
                        help="our side compiles its blocks (train.compile_blocks=true; the default, auto, compiles "
                             "them on a GPU at ZeRO 0-2: pass train.compile_blocks=false for eager blocks)")
    parser.add_argument("--compile-reference", action="store_true",
                        help="the reference compiles its blocks too (bench.step.compile_reference=true)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="on both sides")
    parser.add_argument("--profile", type=int, metavar="STEPS",
                        help="after timing, profile STEPS steps of each side: device kernel time by kind, idle share, "
                             "top kernels and host operators in the JSON (bench.step.profile_steps)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_step.json"), help="JSON result file")
    parser.add_argument("--tensorboard", type=Path, help="also write the figures as TensorBoard scalars here")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (bench.step.* too)")


def take_swallowed_overrides(args: argparse.Namespace) -> None:
    """Move ``key=value`` items that the options of several values took to the overrides; ``--batch`` and
    ``--zero`` become lists of ints (a value that is not one raises ``ValueError`` naming the option).

    ``--zero 1 3 train.lr=1e-4`` otherwise reads ``train.lr=1e-4`` as a third ZeRO stage.
    """
    for option in ("model", "objective", "batch", "zero"):
        values = getattr(args, option) or []
        names = [v for v in values if "=" not in v]
        if len(names) < len(values):
            args.overrides = [*args.overrides, *(v for v in values if "=" in v)]
        if option in ("batch", "zero"):
            bad = [v for v in names if not v.isdigit()]
            if bad:
                raise ValueError(f"--{option} takes whole numbers, got {bad}")
            names = [int(v) for v in names]
        setattr(args, option, names or None)


def compose(preset: str | None, overrides: list[str], model: str | None, objective: str | None,
            batch: int | None, zero: int | None, precision: str | None) -> Any:
    """The full config of one combination (group choices and keys as ``foundation train`` would take them)."""
    from foundation.config import load_config
    from foundation.train.trainer import validate

    extra = [f"model={model}"] if model else []
    extra += [f"objective={objective}"] if objective else []
    extra += [f"deepspeed=zero{zero}"] if zero is not None else []
    extra += [f"data.pipeline.batch_size={batch}"] if batch else []
    extra += [f"train.precision={precision}"] if precision else []
    cfg = load_config(preset, [*overrides, *extra])
    if not ({"local_crops", "masks"} & set(_objective_keys(cfg))):
        cfg = load_config(preset, [*overrides, *extra, f"data.crops.global_count={cfg.bench.step.mae_global_count}",
                                   "data.crops.local_count=0"])
    validate(cfg)
    return cfg


def _objective_keys(cfg: Any) -> tuple[str, ...]:
    from foundation.objectives import OBJECTIVES

    return OBJECTIVES[str(cfg.objective.name)].required_batch_keys


def _schedule_iteration(cfg: Any, schedules: Any) -> int:
    """Where the step's scheduled values are taken: bench.step.iteration, else just past every warmup/freeze."""
    chosen = cfg.bench.step.iteration
    if chosen is not None:
        return int(chosen)
    warm = max([int(s.warmup_iters) for s in schedules.specs.values()] + [int(cfg.train.freeze_last_layer_iters)])
    return min(warm, int(cfg.train.iterations) - 1)


def _seeded_loss(fn: Any, seed: int) -> float:
    torch.manual_seed(seed)
    return float(fn())


def _time(step: Any, settings: Any, device: torch.device) -> list[float]:
    from foundation.perf.measure import time_steps

    time_steps(step, int(settings.warmup), device)
    return [time_steps(step, int(settings.steps), device) for _ in range(int(settings.repeats))]


def _profile(step: Any, settings: Any, device: torch.device) -> dict[str, Any] | None:
    from foundation.perf.profile import profile_step

    steps = int(settings.profile_steps)
    return profile_step(step, steps, device, int(settings.profile_top)) if steps > 0 else None


def _reference_side(objective: Any, cfg: Any, batch: Any, values: Any, device: torch.device,
                    dtype: torch.dtype | None, compile_: bool) -> tuple[float, int, list[float], float, float, Any]:
    """Loss at step 0, FLOPs of one forward+backward, step times, last loss, peak memory and profile (or None)."""
    from foundation.perf.measure import count_flops, peak_memory_gb, reset_peak_memory
    from foundation.perf.reference import ReferenceStep, autocast
    from foundation.train.engine import compile_blocks, enable_activation_checkpointing

    reset_peak_memory(device)
    ref = ReferenceStep(objective, cfg, batch, values, device, dtype)
    if bool(cfg.train.activation_checkpointing):
        enable_activation_checkpointing(ref.objective.backbone().blocks)
    if compile_:
        compile_blocks(ref.objective)

    def loss() -> torch.Tensor:
        with torch.no_grad(), autocast(device, dtype):
            return ref.objective(batch, ref.teacher, values)[0]

    loss0 = _seeded_loss(loss, int(cfg.meta.seed))
    flops = count_flops(ref.forward_backward)
    ref.optimizer.zero_grad(set_to_none=True)
    losses: list[torch.Tensor] = []
    times = _time(lambda: losses.append(ref.step()), cfg.bench.step, device)
    peak = peak_memory_gb(device)
    return loss0, flops, times, float(losses[-1]), peak, _profile(ref.step, cfg.bench.step, device)


def _our_side(objective: Any, cfg: Any, batch: Any, schedules: Any, iteration: int,
              dist: Any) -> tuple[float, list[float], float, float, Any]:
    """Loss at step 0, step times, mean loss, peak memory and profile (or None) of our engine's step."""
    from foundation.perf.measure import peak_memory_gb, reset_peak_memory
    from foundation.perf.ours import OurStep

    reset_peak_memory(dist.device)
    ours = OurStep(objective, cfg, batch, schedules, iteration, dist)  # compiles itself: train.compile_blocks
    loss0 = _seeded_loss(ours.loss, int(cfg.meta.seed))
    times = _time(ours.step, cfg.bench.step, dist.device)
    mean, peak = ours.mean_loss(), peak_memory_gb(dist.device)
    profile = _profile(ours.step, cfg.bench.step, dist.device)
    ours.release()
    return loss0, times, mean, peak, profile


def bench_one(cfg: Any, dist: Any, gemm: float) -> dict[str, Any]:
    """Both sides on one configuration; every figure in one dict."""
    from foundation.objectives import build_objective
    from foundation.perf.measure import median, reset_peak_memory
    from foundation.perf.profile import idle_share
    from foundation.perf.synth import synthetic_batch
    from foundation.train.engine import autocast_dtype, compile_blocks_enabled
    from foundation.train.trainer import build_schedules, check_objective_schedules, seed_everything

    seed = int(cfg.meta.seed)
    seed_everything(seed)
    objective = build_objective(cfg)
    reference_objective = copy.deepcopy(objective)
    patch = int(objective.backbone().patch_embed.patch_size[0])
    batch = synthetic_batch(cfg, objective.required_batch_keys, patch, dist.device, seed)
    schedules = build_schedules(cfg, dist.world_size)
    check_objective_schedules(objective, schedules)
    iteration = _schedule_iteration(cfg, schedules)
    values = schedules.values(iteration)
    dtype = autocast_dtype(str(cfg.train.precision))
    samples = int(cfg.data.pipeline.batch_size) * int(cfg.train.grad_accum_steps)

    ref_loss0, flops, ref_times, ref_last, ref_peak, ref_profile = _reference_side(
        reference_objective, cfg, batch, values, dist.device, dtype, bool(cfg.bench.step.compile_reference))
    del reference_objective
    gc.collect()
    ours_loss0, ours_times, ours_mean, ours_peak, ours_profile = _our_side(
        objective, cfg, batch, schedules, iteration, dist)
    del objective
    gc.collect()
    reset_peak_memory(dist.device)

    ours_s, ref_s = median(ours_times), median(ref_times)
    stage = int(cfg.deepspeed.zero_optimization.stage)
    row = {
        "model": str(cfg.defaults.model), "objective": str(cfg.objective.name), "batch": samples,
        "zero": stage, "precision": str(cfg.train.precision), "world_size": dist.world_size,
        "compile_blocks": compile_blocks_enabled(cfg.train.compile_blocks, dist.device, stage),
        "compile_reference": bool(cfg.bench.step.compile_reference),
        "activation_checkpointing": bool(cfg.train.activation_checkpointing), "schedule_iteration": iteration,
        "ours_step_s": ours_s, "ref_step_s": ref_s, "ours_step_s_repeats": ours_times,
        "ref_step_s_repeats": ref_times,
        "ours_images_per_s": samples / ours_s, "ref_images_per_s": samples / ref_s, "ratio": ref_s / ours_s,
        "ours_images_per_s_all_ranks": samples * dist.world_size / ours_s,
        "flops_per_step": flops, "gflop_per_image": flops / samples / 1e9,
        "ours_tflops": flops / ours_s / 1e12, "ref_tflops": flops / ref_s / 1e12,
        "ours_mfu": flops / ours_s / 1e12 / gemm, "ref_mfu": flops / ref_s / 1e12 / gemm,
        "ours_peak_gb": ours_peak, "ref_peak_gb": ref_peak,
        "ours_loss_step0": ours_loss0, "ref_loss_step0": ref_loss0, "loss_step0_abs_diff": abs(ours_loss0 - ref_loss0),
        "ours_mean_loss": ours_mean, "ref_last_loss": ref_last,
        "losses_finite": all(math.isfinite(v) for v in (ours_loss0, ref_loss0, ours_mean, ref_last)),
    }
    for side, profile, seconds in (("ours", ours_profile, ours_s), ("ref", ref_profile, ref_s)):
        if profile is not None:
            row[f"{side}_device_ms"] = profile["device_ms_per_step"]
            row[f"{side}_idle_share"] = idle_share(profile, seconds)
            row[f"{side}_profile"] = profile
    ranks = f"x{dist.world_size}" if dist.world_size > 1 else ""
    row["name"] = f"{row['objective']} {row['model']} b{samples}{ranks} z{row['zero']} {row['precision']}"
    return row


def run(args: argparse.Namespace) -> int:
    from foundation.config import ConfigError, to_dict
    from foundation.perf.measure import environment, gemm_tflops
    from foundation.perf.profile import profile_line
    from foundation.perf.report import table, write_json, write_tensorboard
    from foundation.train.engine import init_distributed

    try:
        take_swallowed_overrides(args)
    except ValueError as err:
        log.error("%s", err)
        return 2
    overrides = list(args.overrides)
    if args.activation_checkpointing:
        overrides.append("train.activation_checkpointing=true")
    if args.compile:
        overrides.append("train.compile_blocks=true")
    if args.compile_reference:
        overrides.append("bench.step.compile_reference=true")
    if args.profile is not None:
        overrides.append(f"bench.step.profile_steps={args.profile}")
    combos = list(itertools.product(args.model or [None], args.objective or [None], args.batch or [None],
                                    args.zero if args.zero is not None else [None]))
    try:
        cfgs = [compose(args.preset, overrides, m, o, b, z, args.precision) for m, o, b, z in combos]
    except ConfigError as err:
        log.error("%s", err)
        return 2
    dist = init_distributed()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    base = cfgs[0].bench.step
    gemm_dtype = torch.bfloat16 if str(base.gemm_dtype) == "bf16" else torch.float32
    gemm_size = int(base.gemm_size if dist.device.type == "cuda" else base.gemm_size_cpu)
    gemm = gemm_tflops(dist.device, gemm_size, gemm_dtype)
    rows: list[dict[str, Any]] = []
    env = environment(dist.device) if dist.rank == 0 else {}
    payload = {"kind": "step", "environment": env,
               "gemm": {"size": gemm_size, "dtype": str(base.gemm_dtype), "tflops": gemm},
               "settings": to_dict(base), "results": rows, "configs": [to_dict(c) for c in cfgs]}

    for cfg in cfgs:
        try:
            rows.append(bench_one(cfg, dist, gemm))
        except Exception as err:  # one failing configuration (out of memory, a ZeRO-3 bug) must not lose the others
            log.exception("configuration failed")
            rows.append({"name": f"{cfg.objective.name} {cfg.defaults.model} b{cfg.data.pipeline.batch_size} "
                                 f"z{cfg.deepspeed.zero_optimization.stage}", "error": repr(err)[:300],
                         "traceback": traceback.format_exc()[-2000:]})
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if dist.rank == 0:
            log.info("%s", {k: v for k, v in rows[-1].items() if not k.endswith(("repeats", "profile"))})
            write_json(args.out, payload)  # after every configuration: a sweep cut short keeps what it measured
    if dist.rank == 0:
        if args.tensorboard:
            write_tensorboard(args.tensorboard, rows, "name")
        print(f"GEMM {gemm_size}^3 {base.gemm_dtype}: {gemm:.3g} TFLOP/s on {env['gpu'] or 'cpu'}")
        print(table(rows, COLUMNS))
        if any("ours_profile" in row for row in rows):
            print(table(rows, PROFILE_COLUMNS))
            for row in rows:
                for side in ("ours", "ref"):
                    if f"{side}_profile" in row:
                        print(f"{row['name']} {side}: {profile_line(row[f'{side}_profile'])}")
        for row in rows:
            if "error" in row:
                print(f"FAILED {row['name']}: {row['error']}")
        print(f"JSON: {args.out}")
    return 1 if any("error" in row for row in rows) else 0
