"""StainViT: timm init and sizes, stain token modes and dropout, mask token, MAE token selection, multi-crop call."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import DropPath, GluMlp
from torch import nn

from foundation.config import ConfigError, load_config
from foundation.models.backbone import attention_probs, build_backbone, vit_kwargs
from foundation.objectives.mae import random_masking
from stain.vocabulary import StainVocabulary
from tests.objective_support import IMG, LOCAL, N_PATCHES, PATCH, one_thread, tiny_cfg  # noqa: F401

VOCAB = StainVocabulary()


def backbone(*overrides: str, mask_token: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = build_backbone(tiny_cfg("ibot", "model.init_values=null", *overrides).model,
                           VOCAB.num_stains, VOCAB.num_markers, mask_token=mask_token)
    return model.eval()


def ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def images(n: int, side: int = IMG, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_weight_init_is_timms():
    cfg = tiny_cfg("ibot").model
    torch.manual_seed(0)
    ours = build_backbone(cfg, VOCAB.num_stains, VOCAB.num_markers).state_dict()
    torch.manual_seed(0)
    ref = timm.create_model(cfg.arch, pretrained=False, **vit_kwargs(cfg)).state_dict()
    assert set(ref) <= set(ours)
    assert set(ours) - set(ref) == {"mask_token", "stain_token.stain_table.weight", "stain_token.marker_table.weight"}
    for key, value in ref.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("name, reference", [
    ("vit_small", "vit_small_patch16_224"), ("vit_base", "vit_base_patch16_224"),
    ("vit_large", "vit_large_patch16_224"), ("vit_huge", "vit_huge_patch14_224"),
    ("vit_giant", "vit_giant_patch14_dinov2"),
])
def test_sizes_match_timms_reference_models(name, reference):
    """Parameter count = timm's model + registers + stain tables + mask token - the CLS position embedding."""
    cfg = load_config(overrides=[f"model={name}"]).model
    with torch.device("meta"):
        ours = build_backbone(cfg, VOCAB.num_stains, VOCAB.num_markers)
        ref = timm.create_model(reference, pretrained=False, num_classes=0, img_size=224,
                                init_values=cfg.init_values)
    dim = cfg.embed_dim
    extra = (cfg.reg_tokens + VOCAB.num_stains + VOCAB.num_markers + 1 - 1) * dim
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) + extra
    assert ours.patch_embed.patch_size == (cfg.patch_size, cfg.patch_size)
    assert isinstance(ours.blocks[0].mlp, GluMlp) == (cfg.mlp == "swiglu")


def test_drop_path_uniform_and_ramp():
    uniform = backbone("model.drop_path_rate=0.2", "model.drop_path_uniform=true")
    assert [b.drop_path1.drop_prob for b in uniform.blocks] == [0.2, 0.2]
    ramp = backbone("model.drop_path_rate=0.2", "model.drop_path_uniform=false")
    assert isinstance(ramp.blocks[0].drop_path1, nn.Identity)
    assert isinstance(ramp.blocks[1].drop_path1, DropPath) and ramp.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)


def test_token_mode_sequence_and_outputs():
    model = backbone()
    regs = model.num_reg_tokens
    assert model.num_prefix_tokens == 1 + 1 + regs
    x = images(2)
    vec = model.stain_vectors(ids(1, 2), ids(0, 3))
    tokens = model.prepare_tokens(x, vec)
    assert torch.equal(tokens[:, 1], vec)                                   # the stain token right after CLS
    assert torch.equal(tokens[:, 2:2 + regs], model.reg_token.expand(2, -1, -1))
    out = model.forward_features(x, ids(1, 2), ids(0, 3))
    assert out["patch"].shape == (2, N_PATCHES, model.embed_dim)
    assert out["tokens"].shape[1] == model.num_prefix_tokens + N_PATCHES
    assert torch.equal(out["patch"], out["tokens"][:, model.num_prefix_tokens:])  # never the stain token
    assert torch.equal(out["reg"], out["tokens"][:, 2:2 + regs])


@pytest.mark.parametrize("mode", ["token", "add"])
def test_stain_changes_cls_and_unknown_works(mode):
    model = backbone(f"model.stain_token.mode={mode}")
    x = images(2)
    he = model.forward_features(x, ids(1, 1), ids(0, 0))["cls"]
    ihc = model.forward_features(x, ids(2, 2), ids(3, 3))["cls"]
    unknown = model.forward_features(x, ids(0, 0), ids(0, 0))["cls"]
    assert (he - ihc).abs().max() > 1e-3 and (he - unknown).abs().max() > 1e-3
    assert torch.isfinite(unknown).all()
    assert torch.equal(model(x), unknown)                                   # missing ids mean unknown


def test_add_mode_adds_to_cls_only():
    model = backbone("model.stain_token.mode=add")
    assert model.num_prefix_tokens == 1 + model.num_reg_tokens
    vec = model.stain_vectors(ids(1), ids(2))
    tokens = model.prepare_tokens(images(1), vec)
    assert torch.equal(tokens[:, 0], model.cls_token[:, 0] + vec)


def test_off_mode_ignores_ids():
    model = backbone("model.stain_token.mode=none")
    assert model.stain_token is None and model.num_prefix_tokens == 1 + model.num_reg_tokens
    x = images(2)
    assert torch.equal(model.forward_features(x, ids(1, 2), ids(0, 3))["cls"],
                       model.forward_features(x, ids(0, 0), ids(0, 0))["cls"])


def test_stain_dropout_one_equals_unknown_in_training_only():
    model = backbone("model.stain_token.dropout=1.0").train()
    x = images(2)
    dropped = model.forward_features(x, ids(1, 2), ids(0, 3))["cls"]
    unknown = model.forward_features(x, ids(0, 0), ids(0, 0))["cls"]
    assert torch.equal(dropped, unknown)
    model.eval()
    assert not torch.equal(model.forward_features(x, ids(1, 2), ids(0, 3))["cls"], unknown)


def test_stain_dropout_rate_and_joint_draw():
    emb = backbone("model.stain_token.dropout=0.3").train().stain_token
    torch.manual_seed(0)
    stains, markers = emb.drop_ids(torch.full((20000,), 2), torch.full((20000,), 5))
    dropped = stains == 0
    assert torch.equal(dropped, markers == 0)                                # one draw per sample for both ids
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.015)


def test_bad_ids_name_the_value():
    model = backbone()
    with pytest.raises(ValueError, match="stain_ids contains 99"):
        model.forward_features(images(1), ids(99), ids(0))
    with pytest.raises(ValueError, match="marker_ids contains -1"):
        model.forward_features(images(1), ids(0), ids(-1))
    with pytest.raises(ValueError, match=r"crop group 0: expected \[k \* 2"):
        model.forward_features(images(3), ids(0, 0), ids(0, 0))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.stain_token.mode"):
        backbone("model.stain_token.mode=both")
    with pytest.raises(ConfigError, match="model.mlp"):
        backbone("model.mlp=moe")


def test_masked_patches_ignore_their_pixels():
    model = backbone()
    x = images(1)
    changed = x.clone()
    changed[:, :, :PATCH, :PATCH] += 5.0                                    # patch 0 only
    masks = torch.zeros(1, N_PATCHES, dtype=torch.bool)
    masks[0, 0] = True
    a = model.forward_features(x, ids(1), ids(0), masks=masks)
    b = model.forward_features(changed, ids(1), ids(0), masks=masks)
    assert torch.equal(a["tokens"], b["tokens"])
    unmasked = model.forward_features(changed, ids(1), ids(0))
    assert not torch.equal(a["cls"], unmasked["cls"])
    with pytest.raises(ValueError, match="without a mask token"):
        backbone(mask_token=False).forward_features(x, ids(1), ids(0), masks=masks)
    with pytest.raises(ValueError, match="masks must be bool"):
        model.forward_features(x, ids(1), ids(0), masks=masks.float())


def test_ids_keep_selects_patches_in_order():
    model = backbone()
    x = images(2)
    vec = model.stain_vectors(ids(1, 2), ids(0, 0))
    full = model.prepare_tokens(x, vec)
    P = model.num_prefix_tokens
    keep, _, _ = random_masking(2, N_PATCHES, 0.75, x.device)
    kept = model.prepare_tokens(x, vec, ids_keep=keep)
    assert kept.shape[1] == P + N_PATCHES // 4
    assert torch.equal(kept[:, P:], torch.stack([full[i, P:][keep[i]] for i in range(2)]))
    identity = torch.arange(N_PATCHES).expand(2, -1)
    assert torch.equal(model.forward_features(x, ids(1, 2), ids(0, 0), ids_keep=identity)["tokens"],
                       model.forward_features(x, ids(1, 2), ids(0, 0))["tokens"])


def test_forward_features_list_equals_separate_calls():
    model = backbone()
    globals_, locals_ = images(4), images(6, LOCAL, seed=2)                 # 2 and 3 crops of B = 2
    masks = torch.rand(4, N_PATCHES, generator=torch.Generator().manual_seed(3)) < 0.5
    outs = model.forward_features_list([globals_, locals_], ids(1, 2), ids(0, 3), masks=[masks, None])
    ref_g = model.forward_features(globals_, ids(1, 2, 1, 2), ids(0, 3, 0, 3), masks=masks)
    ref_l = model.forward_features(locals_, ids(1, 2, 1, 2, 1, 2), ids(0, 3, 0, 3, 0, 3))
    assert torch.equal(outs[0]["tokens"], ref_g["tokens"]) and torch.equal(outs[1]["tokens"], ref_l["tokens"])
    assert outs[1]["patch"].shape == (6, (LOCAL // PATCH) ** 2, model.embed_dim)


def test_gradient_checkpointing_changes_nothing():
    model = backbone().train()
    x = images(2)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        out = model.forward_features(x, ids(1, 2), ids(0, 0))
        out["cls"].sum().backward()
        grads.append((out["cls"].detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_last_block_attention_reproduces_the_blocks_attention():
    model = backbone()
    x = images(2)
    probs = model.last_block_attention(x, ids(1, 2), ids(0, 0))
    tokens = model.prepare_tokens(x, model.stain_vectors(ids(1, 2), ids(0, 0)))
    for blk in model.blocks[:-1]:
        tokens = blk(tokens)
    attn = model.blocks[-1].attn
    normed = model.blocks[-1].norm1(tokens)
    B, T, D = normed.shape
    v = attn.qkv(normed).reshape(B, T, 3, attn.num_heads, attn.head_dim)[:, :, 2].transpose(1, 2)
    rebuilt = attn.proj((probs @ v).transpose(1, 2).reshape(B, T, D))
    torch.testing.assert_close(rebuilt, attn(normed), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, attn.num_heads, T))
    maps = model.cls_attention_map(x, ids(1, 2), ids(0, 0))
    assert maps.shape == (2, attn.num_heads, IMG // PATCH, IMG // PATCH)
    assert torch.equal(maps.flatten(2), probs[:, :, 0, model.num_prefix_tokens:])
    assert torch.equal(attention_probs(attn, normed), probs)


def test_each_block_is_called_once_with_every_crop_group():
    """One call per block and step (a ZeRO-3 leaf unit, foundation/train/zero3_leaf.py), checkpointed or not."""
    model = backbone().train()
    calls = []
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda _m, args: calls.append(len(args)))
    globals_, locals_ = images(4), images(6, LOCAL, seed=2)
    grads = []
    for enable in (False, True):
        calls.clear()
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        outs = model.forward_features_list([globals_, locals_], ids(1, 2), ids(0, 3))
        assert calls == [2] * len(model.blocks)  # one call, two groups
        sum(o["cls"].sum() for o in outs).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    blk, x = model.blocks[0], torch.randn(2, 5, model.embed_dim)
    assert isinstance(blk(x), torch.Tensor)  # one group: timm's own signature and result
    model.eval()
    pair = blk(x, x[:1, :3])
    assert torch.equal(pair[0], blk(x)) and torch.equal(pair[1], blk(x[:1, :3]))
