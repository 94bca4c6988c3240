"""Each objective on a tiny contract batch: one student call, one loss, gradients, teacher, weights, errors."""

from __future__ import annotations

import pytest
import torch
import yaml

from foundation.config import ConfigError, config_dir
from foundation.objectives import OBJECTIVES, build_objective
from foundation.objectives.base import Objective
from tests.objective_support import IMG, N_PATCHES, PATCH, one_thread, tiny_batch, tiny_cfg  # noqa: F401

STEP = {"teacher_temp": 0.04}
TERMS = {
    "mae": {"mae"}, "ibot": {"dino", "ibot", "koleo"}, "dino": {"dino", "koleo"},
    "mae_ibot": {"mae", "dino", "ibot", "koleo"}, "simclr": {"simclr"}, "byol": {"byol"},
}
WITH_TEACHER = ("ibot", "dino", "mae_ibot", "byol")


def build(name: str, *overrides: str) -> Objective:
    torch.manual_seed(0)
    return build_objective(tiny_cfg(name, *overrides))


def count_student_calls(obj: Objective) -> list[int]:
    calls = [0]
    original = obj.backbone().forward_features_list

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    obj.backbone().forward_features_list = counted
    return calls


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_one_step_gradients_reach_every_trainable_parameter(name):
    obj = build(name).train()
    teacher = obj.build_teacher()
    assert (teacher is not None) == (name in WITH_TEACHER)
    calls = count_student_calls(obj)
    loss, terms = obj(tiny_batch(), teacher, STEP)
    assert calls[0] == 1                                                     # one student call over all crops
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(terms) == TERMS[name] and all(not t.requires_grad for t in terms.values())
    loss.backward()
    for pname, param in obj.named_parameters():
        assert param.requires_grad, pname
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, pname
    if teacher is not None:
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("name", WITH_TEACHER)
def test_teacher_is_a_frozen_copy_with_fixed_pairs(name):
    obj = build(name)
    teacher = obj.build_teacher()
    pairs = obj.teacher_pairs(teacher)
    student_names = [n for n, _ in obj.student.named_parameters()]
    assert len(pairs) == len(student_names) == len(list(teacher.parameters()))
    for (s, t), (t_name, t_param) in zip(pairs, teacher.named_parameters(), strict=True):
        assert t is t_param and torch.equal(s, t) and s is not t and s.shape == t.shape, t_name
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert obj.teacher_backbone(teacher) is teacher["backbone"]
    with torch.no_grad():                                                    # the trainer's EMA step
        for s, t in pairs:
            t.mul_(0.5).add_(s + 1.0, alpha=0.5)
    assert not torch.equal(pairs[0][0], pairs[0][1])


def test_loss_is_the_weighted_sum_and_step_values_override():
    obj = build("mae_ibot").eval()
    teacher = obj.build_teacher()
    batch = tiny_batch()
    torch.manual_seed(1)
    loss, terms = obj(batch, teacher, {**STEP, "koleo_weight": 0.5, "mae_weight": 2.0})
    expected = 1.0 * terms["dino"] + 1.0 * terms["ibot"] + 0.5 * terms["koleo"] + 2.0 * terms["mae"]
    torch.testing.assert_close(loss.detach(), expected)
    _, terms = obj(batch, teacher, {**STEP, "koleo_weight": 0.0})
    assert "koleo" not in terms                                              # weight 0 skips the term
    _, terms = obj(batch, teacher, {**STEP, "kde_weight": 0.05})
    assert "kde" in terms


def test_ibot_centre_moves_and_is_state():
    obj = build("ibot")
    teacher = obj.build_teacher()
    assert torch.equal(obj.dino_center.center, torch.zeros_like(obj.dino_center.center))
    obj(tiny_batch(), teacher, STEP)
    assert obj.dino_center.center.abs().sum() > 0 and obj.ibot_center.center.abs().sum() > 0
    assert {"dino_center.center", "ibot_center.center"} <= set(obj.state_dict())


@pytest.mark.parametrize("overrides", [
    ("objective.dino.centering=sinkhorn_knopp",),
    ("objective.ibot.separate_head=true", "objective.dino.norm_last_layer=false"),
])
def test_ibot_variants(overrides):
    obj = build("ibot", *overrides)
    teacher = obj.build_teacher()
    loss, terms = obj(tiny_batch(), teacher, STEP)
    loss.backward()
    assert torch.isfinite(loss) and set(terms) == TERMS["ibot"]
    if "objective.ibot.separate_head=true" in overrides:
        assert "ibot_head" in obj.student and obj.student["ibot_head"].last_layer.scale.grad is not None
        assert obj.ibot_center.center.shape[-1] == 24                        # the separate head's prototypes


def test_no_masked_patch_and_no_local_crops():
    obj = build("ibot")
    teacher = obj.build_teacher()
    batch = tiny_batch(n_local=0, mask_ratio=0.0)
    loss, terms = obj(batch, teacher, STEP)
    assert terms["ibot"].item() == 0.0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="no cross-view pairs"):
        build("dino")(tiny_batch(n_global=1, n_local=0), build("dino").build_teacher(), STEP)


def test_errors_name_what_is_missing():
    obj = build("ibot")
    teacher = obj.build_teacher()
    with pytest.raises(KeyError, match="teacher_temp"):
        obj(tiny_batch(), teacher, {})
    batch = tiny_batch()
    del batch["masks"]
    with pytest.raises(KeyError, match="masks"):
        obj(batch, teacher, STEP)
    with pytest.raises(ValueError, match="needs the EMA teacher"):
        obj(tiny_batch(), None, STEP)
    bad = tiny_batch()
    bad["stain_ids"] = bad["stain_ids"][:2]
    with pytest.raises(ValueError, match="global_crops"):
        obj(bad, teacher, STEP)
    with pytest.raises(ConfigError, match="objective.name"):
        build("ibot", "objective.name=swav")
    with pytest.raises(ConfigError, match="objective.dino.centering"):
        build("ibot", "objective.dino.centering=none")
    with pytest.raises(ConfigError, match="BYOL"):
        build("byol", "objective.projection.norm=batch")


def test_mae_pictures():
    obj = build("mae", "objective.mae.norm_pix_loss=false").eval()
    batch = tiny_batch()
    torch.manual_seed(3)
    pics = obj.pictures(batch, None)
    images = batch["global_crops"][0]
    assert torch.equal(pics["mae_input"], images)
    assert pics["attention"].shape == (3, 4, IMG // PATCH, IMG // PATCH) and pics["attention"].amax() <= 1.0
    masked = (pics["mae_masked"] == 0).reshape(3, 3, IMG // PATCH, PATCH, IMG // PATCH, PATCH).all(dim=(1, 3, 5))
    n_hidden = masked.flatten(1).sum(1)
    assert torch.equal(n_hidden, torch.full((3,), N_PATCHES - int(N_PATCHES * 0.25)))  # 75% hidden
    visible = ~masked.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)
    visible = visible.unsqueeze(1).expand(-1, 3, -1, -1)
    assert torch.equal(pics["mae_reconstruction"][visible], images[visible])  # visible patches pasted back


def test_pictures_use_the_teacher():
    obj = build("dino").eval()
    teacher = obj.build_teacher()
    with torch.no_grad():
        teacher["backbone"].blocks[-1].attn.qkv.weight.mul_(3.0)
    batch = tiny_batch()
    assert not torch.equal(obj.pictures(batch, teacher)["attention"], obj.pictures(batch, None)["attention"])


def _keys(node, prefix=""):
    return {f"{prefix}{k}" for k in node} | {key for k, v in node.items() if isinstance(v, dict)
                                             for key in _keys(v, f"{prefix}{k}.")}


@pytest.mark.parametrize("group", ["model", "objective"])
def test_group_files_share_keys(group):
    """The config validator checks overrides against the selected file, so every file of a group has every key."""
    files = sorted((config_dir() / group).glob("*.yaml"))
    assert len(files) == 6
    keys = {f.stem: _keys(yaml.safe_load(f.read_text())) for f in files}
    first = next(iter(keys.values()))
    assert all(k == first for k in keys.values()), {name: sorted(k ^ first) for name, k in keys.items()}
    if group == "objective":
        assert {f.stem for f in files} == set(OBJECTIVES)
        assert all(yaml.safe_load(f.read_text())["name"] == f.stem for f in files)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_losses_are_fp32_under_bf16_autocast(name):
    obj = build(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = obj(tiny_batch(), obj.build_teacher(), STEP)
    assert loss.dtype == torch.float32 and all(t.dtype == torch.float32 for t in terms.values()), terms
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in obj.parameters() if p.grad is not None)
