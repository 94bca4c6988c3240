"""Heads on top of the backbone: DINO/iBOT prototype head, SimCLR/BYOL projection MLP, MAE decoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from foundation.models import cfgutil

#: the frequency base of the sin-cos position code (Vaswani et al. 2017; MAE's decoder)
SINCOS_TEMPERATURE = 10000.0
#: init std of the linear layers of the heads (DINO, DINOv2)
HEAD_INIT_STD = 0.02


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=HEAD_INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer whose rows are unit-normalised at every call: ``x @ (g * w / ||w||).T``.

    The prototypes of DINO. ``learn_scale=False`` fixes ``g = 1`` (DINO's ``norm_last_layer``);
    ``True`` learns one ``g`` per row (DINOv2's ``weight_norm`` with ``weight_g`` trainable).
    Written out instead of ``torch.nn.utils.parametrizations.weight_norm`` so that parameter
    names stay plain (``weight``, ``scale``) for ZeRO-3 partitioning and the EMA pairs.
    """

    def __init__(self, in_dim: int, out_dim: int, learn_scale: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        trunc_normal_(self.weight, std=HEAD_INIT_STD)
        self.scale = nn.Parameter(torch.ones(out_dim)) if learn_scale else None

    def normalised_weight(self) -> torch.Tensor:
        w = F.normalize(self.weight, dim=1)
        return w * self.scale[:, None] if self.scale is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalised_weight())


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, nlayers: int, norm: str = "none",
         act: type[nn.Module] = nn.GELU) -> nn.Sequential:
    """``nlayers`` linear layers; between them an optional norm (batch | layer | none) and ``act``."""
    if nlayers < 1:
        raise ValueError(f"an MLP needs at least 1 layer, got {nlayers}")
    norms = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "none": None}
    norm_layer = norms[cfgutil.choice(norm, norms, "head norm")]
    dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(nlayers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < nlayers - 1:
            if norm_layer is not None:
                layers.append(norm_layer(dims[i + 1]))
            layers.append(act())
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO/iBOT head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes (``last_layer``)."""

    def __init__(self, in_dim: int, n_prototypes: int, hidden_dim: int, bottleneck_dim: int, nlayers: int,
                 norm_last_layer: bool) -> None:
        super().__init__()
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, nlayers)
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, n_prototypes, learn_scale=not norm_last_layer)

    @classmethod
    def from_config(cls, in_dim: int, head_cfg: Mapping[str, Any], section: str,
                    norm_last_layer: bool) -> DINOHead:
        """From a node with ``head_n_prototypes``, ``head_hidden_dim``, ``head_bottleneck_dim``, ``head_nlayers``."""
        g = lambda key: int(cfgutil.get(head_cfg, key, section))  # noqa: E731
        return cls(in_dim, g("head_n_prototypes"), g("head_hidden_dim"), g("head_bottleneck_dim"),
                   g("head_nlayers"), norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_dim]`` -> prototype logits ``[..., n_prototypes]`` (cosine similarities when g = 1)."""
        x = self.mlp(x)
        # fp16 cannot hold 1e-12; DINOv2 uses 1e-6 there
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return self.last_layer(F.normalize(x, dim=-1, eps=eps))


class ProjectionMLP(nn.Module):
    """SimCLR / BYOL projector and predictor: linear layers with norm + ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, nlayers: int, norm: str) -> None:
        super().__init__()
        self.mlp = _mlp(in_dim, hidden_dim, out_dim, nlayers, norm, act=nn.ReLU)
        self.mlp.apply(_init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def sincos_pos_embed_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position code ``[height * width, dim]`` (MAE's ``get_2d_sincos_pos_embed``).

    Token ``i * width + j`` (row i, column j): the first half of the channels encodes the column j,
    the second half the row i (MAE's order); each half is ``[sin(pos * omega), cos(pos * omega)]``
    with ``omega_k = T ** (-k / (dim / 4))``.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position code needs a dimension divisible by 4, got {dim}")
    omega = torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0)
    omega = 1.0 / SINCOS_TEMPERATURE ** omega

    def encode(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                                torch.arange(width, dtype=torch.float64), indexing="ij")
    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class MAEDecoder(nn.Module):
    """MAE's light decoder: re-insert mask tokens, fixed sin-cos positions, a few blocks, pixel predictor."""

    def __init__(self, embed_dim: int, decoder_dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 patch_size: int, in_chans: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.blocks = nn.Sequential(*[Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(decoder_dim)
        self.pred = nn.Linear(decoder_dim, patch_size * patch_size * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's decoder init: xavier-uniform linears, zero biases, mask token ~ N(0, 0.02)."""
        nn.init.normal_(self.mask_token, std=HEAD_INIT_STD)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, num_prefix_tokens: int, ids_restore: torch.Tensor,
                grid: tuple[int, int]) -> torch.Tensor:
        """Predict every patch.

        Args:
            tokens: encoder output ``[B, P + K, D]`` (prefix tokens, then the K visible patches).
            num_prefix_tokens: P.
            ids_restore: ``[B, N]``, position of each original patch in the (visible, masked) order.
            grid: patch grid ``(h, w)`` with ``h * w = N``.

        Returns:
            ``[B, N, patch_size**2 * C]`` pixel predictions in the original patch order.
        """
        x = self.embed(tokens)                                          # [B, P + K, Dd]
        prefix, visible = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        B, N = ids_restore.shape
        masked = self.mask_token.to(x.dtype).expand(B, N - visible.shape[1], -1)
        x_ = torch.cat([visible, masked], dim=1)                        # [B, N, Dd], shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x_.shape[-1]))  # original order
        x_ = x_ + sincos_pos_embed_2d(x_.shape[-1], *grid).to(x_.device, x_.dtype)
        x = self.blocks(torch.cat([prefix, x_], dim=1))
        return self.pred(self.norm(x))[:, num_prefix_tokens:]
