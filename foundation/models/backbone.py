"""StainViT: timm's ``VisionTransformer`` with a stain-type token, a mask token and a multi-crop forward.

Token sequence (``no_embed_class=True``: position embeddings cover the patches only, as in timm's
DINOv2-with-registers models, so every prefix token is position-free)::

    [CLS, STAIN (mode "token" only), REG_1 .. REG_R, PATCH_1 .. PATCH_N]

Stain modes (``model.stain_token.mode``):

- ``token``: the stain vector is one more prefix token after CLS, like a register: it attends and is
  attended to, and is excluded from the patch outputs.
- ``add``: the stain vector is added to the CLS token before the blocks.
- ``none``: no stain information (ablation). (Not "off": YAML reads an unquoted off as false.)

The module is a subclass, so its parameter names are exactly timm's (``blocks.3.attn.qkv.weight``)
plus ``mask_token`` and ``stain_token.*``; timm's weight init is kept (and must run outside
``deepspeed.zero.Init``, which silently skips it: see ../shared/STACK.md). Only the methods defined
here are stain-aware; timm's ``forward_intermediates`` & co. are not.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.layers import DropPath, Mlp, SwiGLUPacked, resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from foundation.models import cfgutil
from foundation.models.stain_token import STAIN_MODES, StainEmbedding

MLP_CHOICES = {"mlp": (Mlp, "gelu"), "swiglu": (SwiGLUPacked, "silu")}

Features = dict[str, Any]


def vit_kwargs(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """timm ``VisionTransformer`` kwargs of the config: the inference architecture (what export writes)."""
    g = lambda key: cfgutil.get(model_cfg, key, "model")  # noqa: E731
    mlp_layer, act = MLP_CHOICES[cfgutil.choice(g("mlp"), MLP_CHOICES, "model.mlp")]
    init_values = g("init_values")
    for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
        if int(g(key)) < 1:
            raise ValueError(f"model.{key}={g(key)} must be >= 1")
    if int(g("embed_dim")) % int(g("num_heads")):
        raise ValueError(f"model.embed_dim={g('embed_dim')} is not divisible by model.num_heads={g('num_heads')}")
    return dict(
        img_size=int(g("img_size")),
        patch_size=int(g("patch_size")),
        embed_dim=int(g("embed_dim")),
        depth=int(g("depth")),
        num_heads=int(g("num_heads")),
        mlp_ratio=float(g("mlp_ratio")),
        qkv_bias=bool(g("qkv_bias")),
        init_values=None if init_values is None else float(init_values),
        class_token=True,
        reg_tokens=int(g("reg_tokens")),
        no_embed_class=True,
        global_pool="token",
        num_classes=0,
        dynamic_img_size=bool(g("dynamic_img_size")),
        mlp_layer=mlp_layer,
        act_layer=act,
    )


def attention_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention weights ``[B, heads, T, T]`` of a timm ``Attention`` on its (normed) input ``[B, T, D]``."""
    B, T, _ = x.shape
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def leaf_weights_gathered(block: nn.Module) -> contextlib.AbstractContextManager:
    """Gather the weights of a ZeRO-3 leaf block (``train.zero3_leaf_modules``) for a use of its layers outside its
    own call: DeepSpeed gathers a leaf block only when the block itself is called. Otherwise: nothing to do."""
    ds_utils = sys.modules.get("deepspeed.utils")  # no leaf without DeepSpeed loaded: export and eval do not load it
    if ds_utils is None or not ds_utils.z3_leaf_module(block):
        return contextlib.nullcontext()
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    return GatheredParameters(list(block.parameters()), modifier_rank=None)


class MultiCropBlock(Block):
    """timm's ``Block`` that also runs several token groups (crop sizes) in one call.

    ``block(x)`` is timm's forward; ``block(x_1, ..., x_n)`` returns the tuple of each group run through it.
    One call per block and step lets ZeRO-3 gather and reduce the block as one unit (a leaf module,
    ``train.zero3_leaf_modules``): DeepSpeed reduces a leaf module's gradients when its backward ends, so a
    second call in the same step would reduce a partial gradient.
    """

    def forward(self, *xs: torch.Tensor, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(xs) == 1:
            return Block.forward(self, xs[0], **kwargs)
        return tuple(Block.forward(self, x, **kwargs) for x in xs)


class StainViT(VisionTransformer):
    """A timm ViT that also takes per-sample stain and marker ids (see the module docstring)."""

    def __init__(self, *, stain_mode: str, num_stains: int, num_markers: int, use_markers: bool,
                 stain_dropout: float, stain_init_std: float, mask_token: bool, drop_path_rate: float,
                 drop_path_uniform: bool, **kwargs: Any) -> None:
        super().__init__(drop_path_rate=drop_path_rate, block_fn=MultiCropBlock, **kwargs)
        if drop_path_uniform:  # DINOv2: the same rate in every block instead of timm's linear ramp
            for blk in self.blocks:
                blk.drop_path1 = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
                blk.drop_path2 = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.stain_mode = cfgutil.choice(stain_mode, STAIN_MODES, "model.stain_token.mode")
        self.stain_token = None
        if self.stain_mode != "none":
            self.stain_token = StainEmbedding(num_stains, num_markers, self.embed_dim, use_markers,
                                              stain_dropout, stain_init_std)
        if self.stain_mode == "token":
            self.num_prefix_tokens += 1
        # DINOv2 initialises the mask token to zeros; it replaces masked patch embeddings before pos-embed
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim)) if mask_token else None

    # ----------------------------------------------------------------------------------------- tokens
    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of an image of this size."""
        return self.patch_embed.dynamic_feat_size((height, width))

    def stain_vectors(self, stain_ids: torch.Tensor, marker_ids: torch.Tensor) -> torch.Tensor | None:
        """``[B, D]`` stain vectors after stain-token dropout (training only), or ``None`` with mode none."""
        if self.stain_token is None:
            return None
        self.stain_token.check_ids(stain_ids, marker_ids)
        return self.stain_token(*self.stain_token.drop_ids(stain_ids, marker_ids))

    def _prefix_tokens(self, stain_vec: torch.Tensor | None, batch: int) -> torch.Tensor:
        """``[B, P, D]``: CLS (+ stain vector in mode add), the stain token (mode token), registers."""
        cls = self.cls_token.expand(batch, -1, -1)
        if self.stain_mode == "add":
            cls = cls + stain_vec[:, None]
        parts = [cls]
        if self.stain_mode == "token":
            parts.append(stain_vec[:, None].to(cls.dtype))
        if self.reg_token is not None:
            parts.append(self.reg_token.expand(batch, -1, -1))
        return torch.cat(parts, dim=1)

    def _patch_tokens(self, x: torch.Tensor, masks: torch.Tensor | None,
                      ids_keep: torch.Tensor | None) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> patch tokens with position embedding ``[B, N or K, D]``.

        ``masks [B, N]`` (bool) replaces those patches by the mask token (iBOT); ``ids_keep [B, K]``
        keeps only those patches, in that order (MAE).
        """
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))
        if self.dynamic_img_size:  # NHWC: resample the position grid to this crop size
            B, h, w, D = x.shape
            pos = resample_abs_pos_embed(self.pos_embed, new_size=(h, w), old_size=self.patch_embed.grid_size,
                                         num_prefix_tokens=0)
            x = x.view(B, h * w, D)
        else:
            pos = self.pos_embed
        B, N, D = x.shape
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("masks given but this backbone was built without a mask token")
            if masks.shape != (B, N) or masks.dtype != torch.bool:
                raise ValueError(f"masks must be bool [{B}, {N}] for this crop, got {masks.dtype} {list(masks.shape)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = x + pos
        if ids_keep is not None:
            if ids_keep.dim() != 2 or ids_keep.shape[0] != B:
                raise ValueError(f"ids_keep must be [{B}, K], got {list(ids_keep.shape)}")
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        return x

    def prepare_tokens(self, x: torch.Tensor, stain_vec: torch.Tensor | None, masks: torch.Tensor | None = None,
                       ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The block input ``[B, P + N, D]`` for images ``x`` and per-image stain vectors ``[B, D]``."""
        patches = self._patch_tokens(x, masks, ids_keep)
        tokens = torch.cat([self._prefix_tokens(stain_vec, patches.shape[0]), patches], dim=1)
        return self.norm_pre(self.pos_drop(tokens))

    # ---------------------------------------------------------------------------------------- forward
    def _block(self, blk: nn.Module, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """All token groups through one block, in one call of it (see :class:`MultiCropBlock`)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            out = checkpoint(blk, *xs, use_reentrant=False)
        else:
            out = blk(*xs)
        return list(out) if isinstance(out, tuple) else [out]

    def _split(self, x: torch.Tensor) -> Features:
        """Normed token sequence -> named outputs (views of ``tokens``)."""
        P, R = self.num_prefix_tokens, self.num_reg_tokens
        return {"cls": x[:, 0], "patch": x[:, P:], "reg": x[:, P - R:P], "tokens": x, "num_prefix_tokens": P}

    def forward_features_list(self, crops: Sequence[torch.Tensor], stain_ids: torch.Tensor,
                              marker_ids: torch.Tensor, masks: Sequence[torch.Tensor | None] | None = None,
                              ids_keep: Sequence[torch.Tensor | None] | None = None) -> list[Features]:
        """One call over crop groups of different sizes (e.g. global and local crops).

        Args:
            crops: each ``[k * B, 3, H_i, W_i]``, crop-major (``global_crops.flatten(0, 1)``).
            stain_ids, marker_ids: ``[B]``; repeated ``k`` times for a group of ``k * B`` images.
                Stain-token dropout is drawn once per sample, so all crops of a sample agree.
            masks: per group, ``[k * B, N_i]`` bool (iBOT mask token) or ``None``.
            ids_keep: per group, ``[k * B, K_i]`` indices of the patches to keep (MAE) or ``None``.

        Returns:
            per group, a dict: ``cls [kB, D]``, ``patch [kB, N_i or K_i, D]``, ``reg [kB, R, D]``,
            ``tokens [kB, P + N_i, D]`` (all after the final norm) and ``num_prefix_tokens`` P.

        Each block is called once with all groups (:class:`MultiCropBlock`), so its weights are used by all
        groups back to back: one ZeRO-3 gather and one gradient reduction per block and step.
        """
        n = len(crops)
        masks = list(masks) if masks is not None else [None] * n
        ids_keep = list(ids_keep) if ids_keep is not None else [None] * n
        if len(masks) != n or len(ids_keep) != n:
            raise ValueError(f"{n} crop groups but {len(masks)} masks and {len(ids_keep)} ids_keep entries")
        if stain_ids.shape != marker_ids.shape or stain_ids.dim() != 1:
            raise ValueError(f"stain_ids and marker_ids must both be [B], got {list(stain_ids.shape)} "
                             f"and {list(marker_ids.shape)}")
        batch = stain_ids.shape[0]
        stain_vec = self.stain_vectors(stain_ids, marker_ids)
        xs = []
        for i, (crop, mask, keep) in enumerate(zip(crops, masks, ids_keep, strict=True)):
            if crop.dim() != 4 or batch == 0 or crop.shape[0] % batch:
                raise ValueError(f"crop group {i}: expected [k * {batch}, C, H, W], got {list(crop.shape)}")
            vec = stain_vec.repeat(crop.shape[0] // batch, 1) if stain_vec is not None else None
            xs.append(self.prepare_tokens(crop, vec, mask, keep))
        for blk in self.blocks:
            xs = self._block(blk, xs)
        return [self._split(self.norm(x)) for x in xs]

    def forward_features(self, x: torch.Tensor, stain_ids: torch.Tensor, marker_ids: torch.Tensor,
                         masks: torch.Tensor | None = None, ids_keep: torch.Tensor | None = None) -> Features:
        """Images ``[B, 3, H, W]`` (or ``[k * B, ...]``) -> the output dict of :meth:`forward_features_list`."""
        return self.forward_features_list([x], stain_ids, marker_ids, [masks], [ids_keep])[0]

    def forward(self, x: torch.Tensor, stain_ids: torch.Tensor | None = None,
                marker_ids: torch.Tensor | None = None) -> torch.Tensor:
        """CLS embedding ``[B, D]``; missing ids mean ``unknown``."""
        zeros = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        stain_ids = zeros if stain_ids is None else stain_ids
        marker_ids = zeros if marker_ids is None else marker_ids
        return self.forward_features(x, stain_ids, marker_ids)["cls"]

    # ------------------------------------------------------------------------------------ inspection
    def last_block_attention(self, x: torch.Tensor, stain_ids: torch.Tensor,
                             marker_ids: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[B, heads, T, T]`` of the last block (T = prefix + patch tokens)."""
        if stain_ids.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {stain_ids.shape[0]} stain ids")
        tokens = self.prepare_tokens(x, self.stain_vectors(stain_ids, marker_ids))
        for blk in self.blocks[:-1]:
            tokens = blk(tokens)
        last = self.blocks[-1]
        with leaf_weights_gathered(last):
            return attention_probs(last.attn, last.norm1(tokens))

    def cls_attention_map(self, x: torch.Tensor, stain_ids: torch.Tensor, marker_ids: torch.Tensor) -> torch.Tensor:
        """CLS-to-patch attention of the last block as ``[B, heads, h, w]`` maps (rows sum to <= 1)."""
        attn = self.last_block_attention(x, stain_ids, marker_ids)
        h, w = self.patch_grid(x.shape[-2], x.shape[-1])
        return attn[:, :, 0, self.num_prefix_tokens:].reshape(x.shape[0], -1, h, w)


def build_backbone(model_cfg: Mapping[str, Any], num_stains: int, num_markers: int, *,
                   mask_token: bool = True) -> StainViT:
    """A :class:`StainViT` from ``cfg.model`` and the vocabulary's table sizes.

    ``mask_token=False`` leaves out the mask token for objectives that never mask (an unused
    trainable parameter would never receive a gradient).
    """
    g = lambda key: cfgutil.get(model_cfg, key, "model")  # noqa: E731
    return StainViT(
        stain_mode=g("stain_token.mode"),
        num_stains=num_stains,
        num_markers=num_markers,
        use_markers=bool(g("stain_token.use_markers")),
        stain_dropout=float(g("stain_token.dropout")),
        stain_init_std=cfgutil.positive(g("stain_token.init_std"), "model.stain_token.init_std"),
        mask_token=mask_token,
        drop_path_rate=cfgutil.positive(g("drop_path_rate"), "model.drop_path_rate", allow_zero=True),
        drop_path_uniform=bool(g("drop_path_uniform")),
        **vit_kwargs(model_cfg),
    )
