"""Optimizer parameter groups of an objective's student, like DINOv2's ``utils/param_groups.py``.

Per trainable parameter:

- ``lr_multiplier = layerwise_decay ** (depth + 1 - layer_id)`` (``objective.param_groups.layerwise_decay``):
  layer 0 = the embeddings (patch embedding, position embedding, CLS, registers, stain tables, mask
  token), layer i + 1 = block i, layer depth + 1 = the final norm and everything outside the backbone
  (heads, MAE decoder, predictor), which therefore get the full LR. The patch embedding gets an extra
  ``objective.param_groups.patch_embed_lr_mult``.
- ``wd_multiplier = 0`` for biases, norm weights, LayerScale gammas and every other 1-d parameter,
  and for the CLS/register/mask tokens, the position embedding and the stain tables; 1 otherwise.
- ``is_last_layer`` from :meth:`Objective.param_group_tags` (the DINO prototypes), so the trainer can
  freeze them for the first iterations.

Parameters with equal tags are fused into one group (fewer, larger groups suit DeepSpeed's flat
buffers); each group keeps the names of its parameters in ``param_names``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from foundation.models import cfgutil

#: backbone parameters without weight decay besides the 1-d ones (timm's no_weight_decay + ours)
NO_DECAY_TOKENS = ("cls_token", "reg_token", "pos_embed", "mask_token", "dist_token")
#: backbone parameters that belong to the embedding layer (layer 0)
EMBEDDING_PREFIXES = ("patch_embed.", "pos_embed", "cls_token", "reg_token", "mask_token", "stain_token.")


def layer_id(name: str, depth: int) -> int:
    """Layer index of a backbone parameter for layer-wise LR decay (see the module docstring)."""
    if name.startswith(EMBEDDING_PREFIXES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def _no_weight_decay(name: str, param: nn.Parameter, in_backbone: bool) -> bool:
    if param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_TOKENS:
        return True
    return in_backbone and name.startswith("stain_token.")


def param_groups(objective: nn.Module, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Groups ``{params, name, param_names, lr_multiplier, wd_multiplier, is_last_layer}`` over the student."""
    decay = cfgutil.positive(cfgutil.get(cfg, "objective.param_groups.layerwise_decay", ""),
                             "objective.param_groups.layerwise_decay")
    patch_mult = cfgutil.positive(cfgutil.get(cfg, "objective.param_groups.patch_embed_lr_mult", ""),
                                  "objective.param_groups.patch_embed_lr_mult", allow_zero=True)
    backbone = objective.backbone()
    depth = len(backbone.blocks)
    backbone_names = {id(p): n for n, p in backbone.named_parameters()}

    fused: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for name, param in objective.named_parameters():
        if not param.requires_grad:
            continue
        local = backbone_names.get(id(param))
        in_backbone = local is not None
        lid = layer_id(local, depth) if in_backbone else depth + 1
        lr_mult = decay ** (depth + 1 - lid)
        if in_backbone and local.startswith("patch_embed."):
            lr_mult *= patch_mult
        wd_mult = 0.0 if _no_weight_decay(local if in_backbone else name, param, in_backbone) else 1.0
        last = bool(objective.param_group_tags(name).get("is_last_layer", False))
        key = (lr_mult, wd_mult, last)
        if key not in fused:
            fused[key] = {"params": [], "param_names": [], "lr_multiplier": lr_mult, "wd_multiplier": wd_mult,
                          "is_last_layer": last,
                          "name": f"lr{lr_mult:.4g}_wd{wd_mult:g}" + ("_last_layer" if last else "")}
        fused[key]["params"].append(param)
        fused[key]["param_names"].append(name)
    return list(fused.values())
