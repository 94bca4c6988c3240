"""Single-process pieces of the trainer: DeepSpeed config, validation, optimizer groups and schedule application,
activation checkpointing, the replicated EMA teacher, the window meter, the run logger and the picture grids."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_support import TinyObjective, synthetic_batch, tiny_param_groups

from foundation.config import ConfigError, load_config, to_dict
from foundation.train import engine as E
from foundation.train.logging import METRICS_FILE, TENSORBOARD_DIR, RunLogger
from foundation.train.metrics import WindowMeter
from foundation.train.teacher import ReplicatedTeacher, init_teacher_weights
from foundation.train.trainer import check_objective_schedules, validate
from foundation.train.visuals import crop_grids, labelled_grid, objective_grids, unnormalize
from stain.vocabulary import StainVocabulary

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _keys(node, prefix=""):
    out = set()
    for k, v in node.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, f"{prefix}{k}.")
    return out


def test_deepspeed_group_files_share_their_keys_and_stages():
    files = sorted((CONFIGS / "deepspeed").glob("zero*.yaml"))
    assert [f.stem for f in files] == ["zero0", "zero1", "zero2", "zero3"]
    data = [yaml.safe_load(f.read_text()) for f in files]
    assert all(_keys(d) == _keys(data[0]) for d in data)
    assert [d["zero_optimization"]["stage"] for d in data] == [0, 1, 2, 3]


@pytest.mark.parametrize(("precision", "fp16", "bf16"), [("bf16", False, True), ("fp16", True, False),
                                                          ("fp32", False, False)])
def test_deepspeed_config_from_cfg(precision, fp16, bf16):
    cfg = load_config(overrides=["deepspeed=zero3", f"train.precision={precision}", "data.pipeline.batch_size=6",
                                 "train.grad_accum_steps=3", "train.grad_clip=1.5"])
    validate(cfg)
    ds = E.deepspeed_config(cfg, world_size=1)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["fp16"]["enabled"] is fp16 and ds["bf16"] == {"enabled": bf16, "check_grad_overflow": False}
    assert ds["fp16"]["initial_scale_power"] == 16
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == \
        (6, 3, 1.5)
    assert E.global_batch_size(cfg, world_size=4) == 6 * 3 * 4
    # DeepSpeed's throughput timer would synchronise the device twice per step
    assert ds["timers"] == {"throughput": {"enabled": False}}
    teacher = E.teacher_deepspeed_config(ds)
    assert teacher["timers"] == ds["timers"]
    assert teacher["zero_optimization"]["stage"] == 3
    assert teacher["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert teacher["bf16"] == {"enabled": False} and teacher["fp16"] == {"enabled": False}
    assert "optimizer" not in teacher


@pytest.mark.parametrize(("stage", "world_size", "choice", "expected"), [
    (1, 1, "auto", False), (2, 1, "auto", False), (0, 1, "auto", False),  # one rank: nothing to overlap
    (1, 8, "auto", True), (3, 1, "auto", True),  # several ranks; ZeRO-3 prefetch
    (1, 1, True, True), (3, 8, False, False),  # explicit choices win
])
def test_overlap_comm_auto(stage, world_size, choice, expected):
    """Tri-state keys (default "auto") take true/false overrides too."""
    cfg = load_config(overrides=[f"deepspeed=zero{stage}", f"deepspeed.zero_optimization.overlap_comm={choice}",
                                 "train.grad_overflow_check=true"])
    validate(cfg)
    ds = E.deepspeed_config(cfg, world_size)
    assert ds["zero_optimization"]["overlap_comm"] is expected
    assert ds["bf16"]["check_grad_overflow"] is True


@pytest.mark.parametrize(("override", "match"), [
    ("deepspeed.zero_optimization.overlap_comm=sometimes", "overlap_comm"),
    ("train.grad_overflow_check=1", "train.grad_overflow_check"),
    ("train.precision=fp8", "train.precision"),
    ("train.fused_adamw=maybe", "train.fused_adamw"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps"),
    ("train.grad_clip=-1.0", "train.grad_clip"),
    ("data.pipeline.batch_size=0", "data.pipeline.batch_size"),
    ("train.lr_scaling=cubic", "train.lr_scaling"),
    ("train.schedules.dino_weight=heavy", "train.schedules.dino_weight"),
    ("train.schedules.dino_weight={start: 1.0}", "train.schedules.dino_weight"),
    ("train.compile_blocks=3", "train.compile_blocks"),
    ("train.compile_blocks=true deepspeed=zero3", "compile_blocks=true needs ZeRO 0-2"),
])
def test_bad_trainer_settings_are_named_before_any_work(override, match):
    with pytest.raises(ConfigError, match=match):
        validate(load_config(overrides=override.split(" ")))


def test_compile_blocks_auto_is_cuda_at_zero_0_to_2_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [E.compile_blocks_enabled("auto", cuda, stage) for stage in (0, 1, 2, 3)] == [True, True, True, False]
    assert not E.compile_blocks_enabled("auto", cpu, 1)
    assert E.compile_blocks_enabled(True, cpu, 1) and not E.compile_blocks_enabled(False, cuda, 1)
    validate(load_config(overrides=["deepspeed=zero3"]))  # auto at ZeRO-3: eager blocks, no error


def test_compile_blocks_compiles_every_transformer_block_in_place():
    torch.manual_seed(0)
    model = TinyObjective()
    keys = list(model.state_dict())
    blocks = E.transformer_blocks(model)
    assert len(blocks) == 2 and E.compile_blocks(model) == 2
    assert all(b._compiled_call_impl is not None for b in blocks)  # Module.compile: the same block objects
    assert list(model.state_dict()) == keys


def test_deepspeed_group_may_not_set_trainer_keys():
    cfg = to_dict(load_config())
    cfg["deepspeed"]["gradient_clipping"] = 1.0
    with pytest.raises(ConfigError, match="gradient_clipping.*cfg.train"):
        E.validate_engine_config(OmegaConf.create(cfg))
    cfg = to_dict(load_config())
    cfg["deepspeed"]["zero_optimization"]["stage"] = 4
    with pytest.raises(ConfigError, match="stage must be one of"):
        E.validate_engine_config(OmegaConf.create(cfg))


def test_objective_schedules_must_be_scheduled():
    from foundation.train.trainer import build_schedules

    cfg = load_config(overrides=["train.schedules.teacher_temp=null"])
    with pytest.raises(ConfigError, match=r"TinyObjective reads the schedules \['teacher_temp'\]"):
        check_objective_schedules(TinyObjective(), build_schedules(cfg, world_size=1))


def test_optimizer_groups_and_schedule_application():
    objective = TinyObjective()
    groups = tiny_param_groups(objective)
    groups[0]["lr_multiplier"] = 0.2
    cfg = load_config()
    opt = E.build_optimizer(groups, cfg, torch.device("cpu"))
    assert opt.defaults["fused"] is False  # auto: no fused AdamW on the CPU
    assert E.build_optimizer(groups, load_config(overrides=["train.fused_adamw=false"]),
                             torch.device("cuda")).defaults["fused"] is False  # an explicit choice wins
    assert opt.defaults["betas"] == (0.9, 0.999)
    E.apply_schedule(opt.param_groups, {"lr": 1e-3, "last_layer_lr": 0.0, "weight_decay": 0.05})
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name[groups[0]["name"]]["lr"] == pytest.approx(2e-4)
    assert by_name["net.head.weight"]["lr"] == 0.0 and by_name["net.head.weight"]["weight_decay"] == 0.05
    assert by_name["net.backbone.blocks.0.norm1.weight"]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="lacks"):
        E.build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "name": "x"}], cfg, torch.device("cpu"))


def test_activation_checkpointing_keeps_gradients_keys_and_a_copy_independent():
    torch.manual_seed(0)
    plain = TinyObjective()
    ckpt = copy.deepcopy(plain)
    assert E.enable_activation_checkpointing(ckpt.backbone().blocks) == 2
    assert ckpt.state_dict().keys() == plain.state_dict().keys()
    batch = synthetic_batch(2, seed=1)
    values = {"teacher_temp": 0.04, "ibot_weight": 1.0, "mae_weight": 1.0}
    teacher = plain.build_teacher()
    for model in (plain, ckpt):
        loss, _ = model(batch, teacher, values)
        loss.backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    # a deep copy made after the swap (the EMA teacher) runs its own weights, not the student's
    copied = copy.deepcopy(ckpt.net)
    with torch.no_grad():
        for p in copied.parameters():
            p.add_(1.0)
        x = batch["global_crops"][0]
        assert not torch.equal(copied.backbone(x), ckpt.net.backbone(x))


def test_replicated_teacher_is_the_closed_form_ema_in_fp32():
    objective = TinyObjective()
    module = objective.build_teacher()
    pairs = objective.teacher_pairs(module)
    init_teacher_weights(pairs)
    start = [t.detach().clone() for _, t in pairs]
    objective.to(torch.bfloat16)  # what DeepSpeed does to the student in bf16 runs
    teacher = ReplicatedTeacher(module, pairs, torch.device("cpu"))
    with torch.no_grad():
        for s, _ in pairs:
            s.add_(0.5)
    teacher.update(0.9)
    for (s, t), t0 in zip(pairs, start, strict=True):
        assert t.dtype == torch.float32 and not t.requires_grad
        assert torch.equal(t, t0.mul(0.9).add_(s.float(), alpha=1 - 0.9))
    state = teacher.local_state()
    teacher.update(0.5)
    teacher.load_local_state(state)
    assert all(torch.equal(state[n], v) for n, v in teacher.full_state_dict().items())


def test_window_meter_means_and_throughput():
    meter = WindowMeter(torch.device("cpu"), world_size=1, images_per_step=8)
    meter.add_micro(torch.tensor(2.0), {"a": torch.tensor(1.0)})
    meter.add_micro(torch.tensor(4.0), {"a": torch.tensor(3.0)})
    meter.add_step(0.5, 0.1, torch.tensor(3.0))
    meter.add_step(0.7, 0.1, 5.0)
    out = meter.reduce()
    assert out["loss/total"] == 3.0 and out["loss/a"] == 2.0
    assert out["optim/grad_norm"] == 4.0
    assert out["perf/step_time_s"] == pytest.approx(0.6)
    assert out["perf/images_per_s"] == pytest.approx(out["perf/images_per_s_per_gpu"]) and out["perf/images_per_s"] > 0
    assert out["perf/data_wait_share"] > 0 and out["perf/peak_memory_gb"] > 0
    assert meter.steps == 0 and meter.term_sums == {}  # a new window
    meter.add_step(0.5, 0.1, torch.tensor(float("inf")))  # fp16: a step the loss scaler skipped
    meter.add_step(0.5, 0.1, 2.0)
    assert meter.reduce()["optim/grad_norm"] == 2.0  # the mean of the steps taken, not inf
    meter.add_step(0.5, 0.1, float("inf"))
    assert math.isnan(meter.reduce()["optim/grad_norm"])  # no step taken in the window


def test_run_logger_writes_the_same_tags_to_both_sinks(tmp_path):
    logger = RunLogger(tmp_path, active=True, total_iters=4, start_iter=0, progress_bar=False)
    logger.scalars(2, {"loss/total": 1.5, "optim/grad_norm": float("nan")})
    logger.images(2, {"crops/global": torch.rand(3, 8, 8)})
    logger.close()
    row = json.loads((tmp_path / METRICS_FILE).read_text())
    assert row["iteration"] == 2 and row["loss/total"] == 1.5 and row["optim/grad_norm"] == "nan"
    acc = EventAccumulator(str(tmp_path / TENSORBOARD_DIR)).Reload()
    assert set(acc.Tags()["scalars"]) == {"loss/total", "optim/grad_norm"}
    assert acc.Tags()["images"] == ["crops/global"]
    assert math.isnan(acc.Scalars("optim/grad_norm")[0].value)
    RunLogger(tmp_path / "other", active=False, total_iters=1, start_iter=0, progress_bar=True).scalars(1, {"x": 1})
    assert not (tmp_path / "other").exists()


def test_picture_grids():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    rgb = torch.rand(2, 3, 16, 16)
    normed = (rgb - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(unnormalize(normed, mean, std), rgb)
    batch = synthetic_batch(3, seed=0)
    batch["local_crops"] = torch.zeros(4, 3, 3, 8, 8)
    batch["stain_ids"] = torch.tensor([1, 2, 0])
    batch["marker_ids"] = torch.tensor([0, 2, 0])
    grids = crop_grids(batch, StainVocabulary(), mean, std)
    assert set(grids) == {"crops/global", "crops/local"}
    assert grids["crops/global"].shape == (3, 3 * (32 + 2) + 2, 2 * (32 + 2) + 2)
    plain = labelled_grid(unnormalize(batch["global_crops"].transpose(0, 1).flatten(0, 1), mean, std), [None] * 6, 2)
    assert not torch.equal(plain, grids["crops/global"])  # the stain names were drawn
    pics = {"attention": torch.rand(3, 2, 4, 4), "mae_input": normed[:1], "mae_masked": normed[:1],
            "mae_reconstruction": normed[:1]}
    out = objective_grids(pics, batch["global_crops"][0], mean, std)
    assert out["pictures/teacher_attention"].shape == (3, 3 * (32 + 2) + 2, 3 * (32 + 2) + 2)
    assert out["pictures/mae"].shape == (3, 16 + 4, 3 * (16 + 2) + 2)
