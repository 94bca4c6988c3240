"""Heads (DINO prototypes, projection MLP, MAE decoder), the sin-cos position code, and parameter groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from foundation.config import ConfigError
from foundation.models.heads import DINOHead, MAEDecoder, ProjectionMLP, WeightNormLinear, sincos_pos_embed_2d
from foundation.models.param_groups import param_groups
from foundation.objectives import build_objective
from foundation.objectives.mae import random_masking
from tests.objective_support import one_thread, tiny_cfg  # noqa: F401


def _gelu64(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def test_dino_head_against_float64_definition():
    torch.manual_seed(0)
    head = DINOHead(in_dim=12, n_prototypes=20, hidden_dim=16, bottleneck_dim=8, nlayers=3, norm_last_layer=True)
    x = torch.randn(5, 12)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    h = x.double()
    for i, lin in enumerate(linears):
        h = h @ lin.weight.double().t() + lin.bias.double()
        if i < len(linears) - 1:
            h = _gelu64(h)
    h = h / h.norm(dim=-1, keepdim=True)
    w = head.last_layer.weight.double()
    expected = h @ (w / w.norm(dim=1, keepdim=True)).t()
    torch.testing.assert_close(head(x).double(), expected, rtol=1e-5, atol=1e-6)
    assert head(x).abs().max() <= 1.0 + 1e-6                                 # cosine similarities


def test_weight_norm_scale():
    layer = WeightNormLinear(4, 3, learn_scale=True)
    with torch.no_grad():
        layer.scale.copy_(torch.tensor([1.0, 2.0, 0.5]))
    x = torch.randn(2, 4)
    unit = F.linear(x, F.normalize(layer.weight, dim=1))
    torch.testing.assert_close(layer(x), unit * torch.tensor([1.0, 2.0, 0.5]))
    assert WeightNormLinear(4, 3, learn_scale=False).scale is None


def test_projection_mlp_norms():
    kinds = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
    for norm, cls in kinds.items():
        mlp = ProjectionMLP(8, 16, 4, nlayers=3, norm=norm)
        assert sum(isinstance(m, cls) for m in mlp.modules()) == 2
        assert sum(isinstance(m, nn.ReLU) for m in mlp.modules()) == 2
    assert not any(isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)) for m in ProjectionMLP(8, 16, 4, 2, "none").modules())
    with pytest.raises(ConfigError, match="group"):
        ProjectionMLP(8, 16, 4, 2, "group")


def _mae_sincos_numpy(embed_dim: int, grid_size: int) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py, transcribed (float64)."""
    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64))
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_sincos_matches_mae():
    ours = sincos_pos_embed_2d(16, 5, 5).double().numpy()
    np.testing.assert_allclose(ours, _mae_sincos_numpy(16, 5), rtol=0, atol=1e-6)
    assert sincos_pos_embed_2d(8, 2, 3).shape == (6, 8)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, 2, 2)


def test_mae_decoder_reinserts_mask_tokens_in_place():
    torch.manual_seed(0)
    decoder = MAEDecoder(embed_dim=12, decoder_dim=8, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=4)
    B, N, P = 2, 9, 3
    ids_keep, mask, ids_restore = random_masking(B, N, 0.66, torch.device("cpu"))
    tokens = torch.randn(B, P + ids_keep.shape[1], 12)
    seen = {}
    decoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    out = decoder(tokens, P, ids_restore, (3, 3))
    assert out.shape == (B, N, 4 * 4 * 3)
    x, pos = seen["x"], sincos_pos_embed_2d(8, 3, 3)
    embedded = decoder.embed(tokens)
    torch.testing.assert_close(x[:, :P], embedded[:, :P])                    # prefix tokens, no position
    for b in range(B):
        for i, j in enumerate(ids_keep[b].tolist()):                         # visible patch i sits at position j
            torch.testing.assert_close(x[b, P + j], embedded[b, P + i] + pos[j])
        for j in torch.nonzero(mask[b]).flatten().tolist():
            torch.testing.assert_close(x[b, P + j], decoder.mask_token[0, 0] + pos[j])


@pytest.mark.parametrize("objective", ["ibot", "mae_ibot", "byol"])
def test_param_groups(objective):
    cfg = tiny_cfg(objective, "objective.param_groups.layerwise_decay=0.5",
                   "objective.param_groups.patch_embed_lr_mult=0.2", "objective.ibot.separate_head=true")
    obj = build_objective(cfg)
    groups = param_groups(obj, cfg)
    names = [n for g in groups for n in g["param_names"]]
    trainable = [n for n, p in obj.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable) and len(names) == len(set(names))
    by_name = {n: g for g in groups for n in g["param_names"]}
    depth, d = len(obj.backbone().blocks), 0.5
    no_decay_tokens = ("cls_token", "reg_token", "pos_embed", "mask_token")
    params = dict(obj.named_parameters())
    for name, group in by_name.items():
        local = name.removeprefix("student.backbone.")
        in_backbone = local != name
        if local.startswith(("patch_embed.", *no_decay_tokens, "stain_token.")) and in_backbone:
            expected_lr = d ** (depth + 1) * (0.2 if local.startswith("patch_embed.") else 1.0)
        elif in_backbone and local.startswith("blocks."):
            expected_lr = d ** (depth - int(local.split(".")[1]))
        else:
            expected_lr = 1.0
        assert group["lr_multiplier"] == pytest.approx(expected_lr), name
        exempt = params[name].ndim <= 1 or name.endswith(no_decay_tokens) or ".stain_token." in name
        assert group["wd_multiplier"] == (0.0 if exempt else 1.0), name
        assert group["is_last_layer"] == (".last_layer." in name), name
    assert by_name["student.backbone.blocks.0.attn.qkv.weight"]["wd_multiplier"] == 1.0
    assert by_name["student.backbone.stain_token.stain_table.weight"]["wd_multiplier"] == 0.0
    if objective != "byol":
        assert any(g["is_last_layer"] for g in groups)
    for g in groups:
        assert set(g) == {"params", "param_names", "name", "lr_multiplier", "wd_multiplier", "is_last_layer"}
