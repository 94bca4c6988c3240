"""Test helpers for the trainer: a tiny objective with an EMA teacher, synthetic batches, 2-rank spawning.

The objective is deliberately small (a 2-block timm ViT on 32 px crops) but exercises every path the real
ones do: one student call over all crops, a teacher forward without grad, two weighted loss terms read
from ``step_values``, a prototype ("last layer") parameter group, and ``.blocks`` for checkpointing.
"""

from __future__ import annotations

import copy
import faulthandler
import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from foundation.cli import exit_without_finalization
from foundation.objectives.base import Batch, Objective

IMG = 32
PATCH = 8
DIM = 32
PROTOTYPES = 16
STUDENT_TEMP = 0.1


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=2, num_heads=2,
                                          num_classes=0)
        self.head = nn.Linear(DIM, PROTOTYPES)


class TinyObjective(Objective):
    """DINO-style CLS distillation + a pixel reconstruction term on 2 global crops."""

    schedule_names = ("teacher_temp", "ibot_weight", "mae_weight")

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = _Net()
        self.decoder = nn.Linear(DIM, 3 * PATCH * PATCH)

    def backbone(self) -> nn.Module:
        return self.net.backbone

    def build_teacher(self) -> nn.Module:
        return copy.deepcopy(self.net)

    def teacher_pairs(self, teacher: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
        return list(zip(self.net.parameters(), teacher.parameters(), strict=True))

    def param_group_tags(self, name: str) -> dict[str, float | bool]:
        return {"is_last_layer": name.startswith("net.head.")}

    def forward(self, batch: Batch, teacher: nn.Module | None,
                step_values: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        crops = batch["global_crops"]  # [G, B, 3, H, W]
        n_crops, n = crops.shape[:2]
        tokens = self.net.backbone.forward_features(crops.flatten(0, 1))  # [G*B, 1+P, D]
        student = self.net.head(tokens[:, 0]) / STUDENT_TEMP
        with torch.no_grad():
            t_cls = teacher.backbone(crops.flatten(0, 1))
            t_prob = F.softmax(teacher.head(t_cls).float() / step_values["teacher_temp"], dim=-1)
        # Each student crop learns the teacher's view of the other crop.
        t_prob = t_prob.view(n_crops, n, -1).flip(0).flatten(0, 1)
        distill = -(t_prob * F.log_softmax(student.float(), dim=-1)).sum(-1).mean()
        target = F.unfold(crops.flatten(0, 1), PATCH, stride=PATCH).transpose(1, 2)  # [G*B, P, 3*p*p]
        recon = F.mse_loss(self.decoder(tokens[:, 1:]).float(), target.float())
        total = step_values["ibot_weight"] * distill + step_values["mae_weight"] * recon
        return total, {"distill": distill.detach(), "recon": recon.detach()}

    @torch.no_grad()
    def pictures(self, batch: Batch, teacher: nn.Module | None) -> dict[str, torch.Tensor]:
        """The teacher's last-block CLS attention, read from the input of timm's ``attn_drop``."""
        backbone = teacher.backbone
        attn = backbone.blocks[-1].attn
        seen: list[torch.Tensor] = []
        fused, attn.fused_attn = attn.fused_attn, False
        handle = attn.attn_drop.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            images = batch["global_crops"][0]
            backbone(images)
        finally:
            handle.remove()
            attn.fused_attn = fused
        grid = IMG // PATCH
        maps = seen[0][:, :, 0, backbone.num_prefix_tokens:].float().reshape(len(images), -1, grid, grid)
        return {"attention": maps / maps.amax(dim=(-2, -1), keepdim=True)}


def tiny_param_groups(objective: Objective, weight_decay_exempt: tuple[str, ...] = ("bias", "norm", "token",
                                                                                      "pos_embed")) -> list[dict]:
    """Parameter groups the way the model's ``param_groups`` returns them (one per parameter)."""
    groups = []
    for name, p in objective.named_parameters():
        tags = objective.param_group_tags(name)
        no_wd = p.ndim == 1 or any(k in name for k in weight_decay_exempt)
        groups.append({"params": [p], "name": name, "lr_multiplier": 1.0, "wd_multiplier": 0.0 if no_wd else 1.0,
                       "is_last_layer": bool(tags.get("is_last_layer", False))})
    return groups


def synthetic_batch(batch_size: int, seed: int, n_crops: int = 2) -> dict[str, torch.Tensor]:
    """A batch following the objective batch contract, deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "global_crops": torch.randn(n_crops, batch_size, 3, IMG, IMG, generator=g),
        "local_crops": torch.zeros(0, batch_size, 3, IMG // 2, IMG // 2),
        "masks": torch.zeros(n_crops, batch_size, (IMG // PATCH) ** 2, dtype=torch.bool),
        "stain_ids": torch.randint(0, 3, (batch_size,), generator=g),
        "marker_ids": torch.zeros(batch_size, dtype=torch.long),
    }


class SyntheticLoader:
    """One rank's batches with a resumable position, like the DALI loader's ``state_dict``.

    ``fixed``: the same batch forever (for overfitting). ``nan_at``: positions whose crops are NaN.
    """

    def __init__(self, batch_size: int, rank: int, fixed: bool = False, nan_at: tuple[int, ...] = ()) -> None:
        self.batch_size = batch_size
        self.rank = rank
        self.fixed = fixed
        self.nan_at = set(nan_at)
        self.position = 0

    def __iter__(self) -> SyntheticLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = synthetic_batch(self.batch_size, seed=1000 * self.rank + (0 if self.fixed else self.position))
        if self.position in self.nan_at:
            batch["global_crops"] = torch.full_like(batch["global_crops"], float("nan"))
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.position = int(state["position"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


RANK_LOG_TAIL = 60  # lines of each rank's stderr that a failed spawn reports


def _entry(rank: int, world_size: int, port: int, log_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    # The rank's stderr (C++ aborts included) and, on a fatal signal, every thread's Python stack go to a file
    # that spawn() reports if the run fails: pytest's capture of several ranks' output is long and interleaved.
    log = open(Path(log_dir) / f"rank{rank}.log", "w")  # noqa: SIM115 - open until the process ends
    sys.stderr.flush()
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log, all_threads=True)
    torch.set_num_threads(1)
    try:
        fn(rank, *args)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's collectives, async ones included, are done before any leaves
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    log.flush()
    exit_without_finalization(0)  # a rank that did its work: as the foundation program does (foundation/cli.py)


def _rank_logs(log_dir: Path) -> str:
    parts = []
    for path in sorted(log_dir.glob("rank*.log")):
        lines = path.read_text(errors="replace").splitlines()[-RANK_LOG_TAIL:]
        parts.append(f"--- {path.stem}: last {len(lines)} lines of stderr ---\n" + "\n".join(lines))
    return "\n".join(parts)


def spawn(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> None:
    """Run ``fn(rank, *args)`` on ``world_size`` gloo ranks; an exception or a fatal signal on any rank fails the
    caller with torch's exception, its message followed by the tail of every rank's stderr."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    with tempfile.TemporaryDirectory(prefix="ranks-") as log_dir:
        try:
            mp.start_processes(_entry, args=(world_size, free_port(), log_dir, fn, args), nprocs=world_size,
                               start_method="spawn")
        except ProcessException as err:
            err.args = (f"{err.args[0]}\n{_rank_logs(Path(log_dir))}", *err.args[1:])
            raise


def tiny_overrides(out_dir: str, stage: int, iterations: int = 6, **extra: Any) -> list[str]:
    """Config overrides for a fast 2-rank CPU run of :class:`TinyObjective` (extra: ``train.key=value``)."""
    items = {
        "meta.output_dir": out_dir, "deepspeed": f"zero{stage}", "data.pipeline.batch_size": 4,
        "train.iterations": iterations, "train.log_every": 2, "train.image_every": 3, "train.image_count": 2,
        "train.checkpoint_every": 3, "train.progress_bar": False, "train.freeze_last_layer_iters": 2,
        "train.schedules.lr": "{start: 0.0, peak: 2.0e-3, end: 1.0e-4, warmup_iters: 2}",
        "train.schedules.teacher_momentum": "{start: 0.9, peak: 0.9, end: 1.0, warmup_iters: 0}",
        "train.schedules.ibot_weight": 1.0, "train.schedules.mae_weight": 1.0,
        "train.lr_reference_batch": 8, **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


def _instrument_teacher(reference: dict[str, torch.Tensor]) -> None:
    """Make the trainer's teacher also keep an unsharded EMA, from the student's full weights, in ``reference``."""
    from deepspeed.utils import safe_get_full_fp32_param

    from foundation.train import build

    original = build.wrap_teacher

    def wrap(module: nn.Module, pairs: list, ds_config: Mapping[str, Any], device: torch.device) -> Any:
        names = {id(p): n for n, p in module.named_parameters()}
        teacher = original(module, pairs, ds_config, device)
        reference.update(teacher.full_state_dict())
        update = teacher.update
        sharded = teacher.sharded

        def update_both(momentum: float) -> None:
            update(momentum)
            for student, t in pairs:
                # the weights the teacher follows: the fp32 master at ZeRO-3, the module weights below
                source = safe_get_full_fp32_param(student) if sharded else student.detach()
                reference[names[id(t)]].mul_(momentum).add_(source.float().cpu(), alpha=1.0 - momentum)

        teacher.update = update_both
        return teacher

    build.wrap_teacher = wrap


def tiny_run(rank: int, overrides: list[str], result_path: str, loader_kwargs: Mapping[str, Any],
             keep_reference: bool) -> None:
    """Train :class:`TinyObjective` on synthetic batches; rank 0 saves what the tests compare."""
    from deepspeed.utils import safe_get_full_fp32_param

    from foundation.config import load_config
    from foundation.train import trainer
    from foundation.train.engine import init_distributed, transformer_blocks
    from foundation.train.loop import NonFiniteLossError

    cfg = load_config(overrides=overrides)
    dist = init_distributed()
    trainer.seed_everything(int(cfg.meta.seed))
    objective = TinyObjective(seed=int(cfg.meta.seed))
    reference: dict[str, torch.Tensor] = {}
    if keep_reference:
        _instrument_teacher(reference)
    loader = SyntheticLoader(int(cfg.data.pipeline.batch_size), rank, **loader_kwargs)
    out: dict[str, Any] = {}
    try:
        result = trainer.run_training(cfg, objective, tiny_param_groups(objective), loader, dist)
    except NonFiniteLossError as err:
        out["error"] = str(err)
        if rank == 0:
            torch.save(out, result_path)
        return
    names = [n for n, _ in objective.named_parameters()]
    out["student"] = {n: safe_get_full_fp32_param(p).float().cpu() for n, p in objective.named_parameters()}
    out["student_names"] = names
    out["compiled_blocks"] = sum(b._compiled_call_impl is not None for b in transformer_blocks(objective))
    out["state"] = result.state.state_dict()
    out["position"] = loader.position
    if result.teacher is not None:
        out["teacher"] = result.teacher.full_state_dict()
        probe = synthetic_batch(2, seed=99)["global_crops"][0]
        with torch.no_grad():
            out["teacher_out"] = result.teacher.module.backbone(probe).cpu()
        if keep_reference:
            plain = _Net()
            plain.load_state_dict(reference)
            plain.eval()
            with torch.no_grad():
                out["reference_out"] = plain.backbone(probe)
            out["reference"] = reference
    if rank == 0:
        torch.save(out, result_path)


def resilience_run(rank: int, base: str, stage: int, result_path: str) -> None:
    """Three runs in one process: interrupted by NaNs, resumed, and uninterrupted; rank 0 saves the outcomes.

    Rank 1 alone sees NaN crops at positions 1, 5 and 6 of the interrupted run: position 1 is skipped and
    counted, 5 and 6 make 2 in a row (``max_nonfinite_in_row=2``) and stop the run after the checkpoint at
    step 3. The resumed run (clean data) continues from step 3 at position 4; the uninterrupted run sees NaN
    only at position 1, so both consume the same batches for the same steps.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    from foundation.config import load_config
    from foundation.train import trainer
    from foundation.train.checkpoint import LATEST
    from foundation.train.engine import init_distributed
    from foundation.train.loop import NonFiniteLossError

    dist = init_distributed()
    out: dict[str, Any] = {}

    def run(out_dir: str, nan_at: tuple[int, ...]) -> Any:
        cfg = load_config(overrides=tiny_overrides(out_dir, stage, **{"train.max_nonfinite_in_row": 2,
                                                                      "train.image_every": 0}))
        trainer.seed_everything(int(cfg.meta.seed))
        objective = TinyObjective(seed=int(cfg.meta.seed))
        loader = SyntheticLoader(int(cfg.data.pipeline.batch_size), rank, nan_at=nan_at if rank == 1 else ())
        result = trainer.run_training(cfg, objective, tiny_param_groups(objective), loader, dist)
        student = {n: safe_get_full_fp32_param(p).float().cpu() for n, p in objective.named_parameters()}
        return result, student, loader

    interrupted = f"{base}/interrupted"
    try:
        run(interrupted, nan_at=(1, 5, 6))
    except NonFiniteLossError as err:
        out["error"] = str(err)
    out["latest_after_error"] = (Path(interrupted) / "checkpoints" / LATEST).read_text()
    step3 = Path(interrupted) / "checkpoints" / "step_00000003"
    out["step3_files"] = sorted(str(p.relative_to(step3)) for p in step3.rglob("*") if p.is_file())
    result, out["resumed"], loader = run(interrupted, nan_at=())
    out["resumed_state"] = result.state.state_dict()
    out["resumed_teacher"] = result.teacher.full_state_dict()
    out["resumed_position"] = loader.position
    result, out["uninterrupted"], loader = run(f"{base}/uninterrupted", nan_at=(1,))
    out["uninterrupted_state"] = result.state.state_dict()
    out["uninterrupted_teacher"] = result.teacher.full_state_dict()
    out["uninterrupted_position"] = loader.position
    if rank == 0:
        torch.save(out, result_path)


REAL_TILES = "tiles/stain_he_vs_ihc"  # under the shared data folder: HE/*.png, IHC/*.png (224 px)


class RealTileLoader:
    """Batch-contract dicts cut from the real H&E and IHC tiles of the shared data (no DALI, for trainer tests).

    Global crops: each tile resized to ``size`` and its mirror image; local crops: two quadrants at half size;
    iBOT masks from the data package's generator. ``fixed``: the same batch forever (for overfitting).
    """

    def __init__(self, data_dir: Path, cfg: Any, rank: int, world_size: int, fixed: bool = False) -> None:
        import numpy as np
        from PIL import Image

        from stain.vocabulary import StainVocabulary

        vocab = StainVocabulary()
        size = int(cfg.data.crops.global_size)
        mean = torch.tensor(list(cfg.data.crops.mean)).view(3, 1, 1)
        std = torch.tensor(list(cfg.data.crops.std)).view(3, 1, 1)
        images, stains = [], []
        for stain in ("HE", "IHC"):
            for path in sorted((data_dir / REAL_TILES / stain).glob("*.png")):
                rgb = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
                images.append((torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255 - mean) / std)
                stains.append(vocab.stain_id(stain))
        self.images = torch.stack(images)
        self.stains = torch.tensor(stains)
        self.cfg = cfg
        self.rank, self.world_size, self.fixed = rank, world_size, fixed
        self.batch_size = int(cfg.data.pipeline.batch_size)
        self.patch = int(cfg.model.patch_size)
        self.position = 0

    def __iter__(self) -> RealTileLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        import numpy as np

        from foundation.data.masking import ibot_masks

        step = 0 if self.fixed else self.position
        g = torch.Generator().manual_seed(step * self.world_size + self.rank)
        pick = torch.randperm(len(self.images), generator=g)[: self.batch_size]
        tiles = self.images[pick]
        half = tiles.shape[-1] // 2
        grid = (tiles.shape[-1] // self.patch,) * 2
        masks = ibot_masks(2, self.batch_size, grid, np.random.default_rng([step, self.rank]), self.cfg.data.masking)
        self.position += 1
        return {
            "global_crops": torch.stack([tiles, tiles.flip(-1)]),
            "local_crops": torch.stack([tiles[..., :half, :half], tiles[..., half:, half:]]),
            "masks": masks,
            "stain_ids": self.stains[pick],
            "marker_ids": torch.zeros(self.batch_size, dtype=torch.long),
        }

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.position = int(state["position"])


def real_overrides(out_dir: str, stage: int, objective: str, iterations: int, **extra: Any) -> list[str]:
    """A vit_test run of a real objective on 64 px real tiles, small heads (extra: ``key=value``)."""
    items = {
        "meta.output_dir": out_dir, "deepspeed": f"zero{stage}", "model": "vit_test", "objective": objective,
        "data.pipeline.batch_size": 4, "data.crops.global_size": 64, "data.crops.local_size": 32,
        "objective.dino.head_n_prototypes": 256, "objective.dino.head_hidden_dim": 64,
        "objective.dino.head_bottleneck_dim": 32, "objective.mae.decoder_embed_dim": 32,
        "objective.mae.decoder_depth": 1, "objective.mae.decoder_num_heads": 2,
        "train.iterations": iterations, "train.log_every": 1, "train.image_every": iterations,
        "train.image_count": 2, "train.checkpoint_every": 0, "train.progress_bar": False,
        "train.freeze_last_layer_iters": 1, "train.lr_scaling": "none",
        "train.schedules.lr": "{start: 0.0, peak: 1.0e-3, end: 1.0e-4, warmup_iters: 1}", **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


def objectives_run(rank: int, data_dir: str, base: str, stage: int, result_path: str, overfit_steps: int) -> None:
    """iBOT and MAE for a few steps at ``stage`` (and, if ``overfit_steps``, MAE on one fixed batch)."""
    import json

    from deepspeed.utils import safe_get_full_fp32_param

    from foundation.config import load_config
    from foundation.models.param_groups import param_groups
    from foundation.objectives import build_objective
    from foundation.train import trainer
    from foundation.train.engine import init_distributed

    dist = init_distributed()
    runs = [("ibot", 3, False), ("mae", 3, False)]
    if overfit_steps:
        runs.append(("mae", overfit_steps, True))
    out: dict[str, Any] = {}
    for objective_name, steps, fixed in runs:
        name = f"{objective_name}_overfit" if fixed else objective_name
        run_dir = Path(base) / name
        extra = {"train.image_every": 0, "objective.mae.norm_pix_loss": False,
                 "train.schedules.lr": "{start: 2.0e-3, peak: 2.0e-3, end: 2.0e-3, warmup_iters: 0}"} if fixed else {}
        if stage == 3:  # no persistent weights: every ViT token must be gathered by the trainer's registration
            extra["deepspeed.zero_optimization.stage3_param_persistence_threshold"] = 0
        cfg = load_config(overrides=real_overrides(str(run_dir), stage, objective_name, steps, **extra))
        trainer.seed_everything(int(cfg.meta.seed))
        objective = build_objective(cfg)
        init = {n: p.detach().clone() for n, p in objective.named_parameters()}
        loader = RealTileLoader(Path(data_dir), cfg, rank, dist.world_size, fixed=fixed)
        result = trainer.run_training(cfg, objective, param_groups(objective, cfg), loader, dist)
        teacher = result.teacher.full_state_dict() if result.teacher is not None else None
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
            if rank == 0 else []
        moved = [n for n, p in objective.named_parameters()
                 if not torch.equal(safe_get_full_fp32_param(p).float().cpu(), init[n].float())]
        out[name] = {"state": result.state.state_dict(), "rows": rows, "teacher_keys": sorted(teacher or {}),
                     "moved": len(moved), "params": len(init), "dir": str(run_dir)}
    if rank == 0:
        torch.save(out, result_path)


class HalvesLoader:
    """Each batch of ``inner`` as two micro-batches (first half, then second half of the samples)."""

    def __init__(self, inner: SyntheticLoader) -> None:
        self.inner = inner
        self._pending: dict[str, torch.Tensor] | None = None

    def __iter__(self) -> HalvesLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._pending is not None:
            out, self._pending = self._pending, None
            return out
        batch = next(self.inner)
        half = batch["stain_ids"].shape[0] // 2
        crop_keys = ("global_crops", "local_crops", "masks")
        first = {k: v[:, :half] if k in crop_keys else v[:half] for k, v in batch.items()}
        self._pending = {k: v[:, half:] if k in crop_keys else v[half:] for k, v in batch.items()}
        return first


def accumulation_run(rank: int, base: str, result_path: str) -> None:
    """fp32 ZeRO-1: batch 4 without accumulation vs the same samples as 2 micro-batches of 2; then fp16 steps."""
    import json

    from deepspeed.utils import safe_get_full_fp32_param

    from foundation.config import load_config
    from foundation.train import trainer
    from foundation.train.engine import init_distributed

    dist = init_distributed()
    out: dict[str, Any] = {}
    cases = {
        "whole": ({"train.precision": "fp32"}, 4, False),
        "accumulated": ({"train.precision": "fp32", "train.grad_accum_steps": 2}, 2, True),
        # a first loss scale of 2**8 instead of 2**16: 4 steps are then enough to see applied and skipped ones
        "fp16": ({"train.precision": "fp16", "deepspeed.fp16.initial_scale_power": 8}, 4, False),
        # the default first scale 2**16 overflows fp16 on every one of these early, large gradients
        "fp16_overflow": ({"train.precision": "fp16"}, 4, False),
    }
    for name, (extra, batch, halves) in cases.items():
        run_dir = Path(base) / name
        cfg = load_config(overrides=tiny_overrides(str(run_dir), 1, 4, **{"data.pipeline.batch_size": batch,
                                                                          "train.image_every": 0,
                                                                          "train.log_every": 1, **extra}))
        trainer.seed_everything(int(cfg.meta.seed))
        objective = TinyObjective(seed=int(cfg.meta.seed))
        inner = SyntheticLoader(4, rank)
        loader = HalvesLoader(inner) if halves else inner
        result = trainer.run_training(cfg, objective, tiny_param_groups(objective), loader, dist)
        out[name] = {
            "student": {n: safe_get_full_fp32_param(p).float().cpu() for n, p in objective.named_parameters()},
            "teacher": result.teacher.full_state_dict(), "state": result.state.state_dict(),
            "position": inner.position,
            "rows": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            if rank == 0 else [],
        }
    if rank == 0:
        torch.save(out, result_path)
