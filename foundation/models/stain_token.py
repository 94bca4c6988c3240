"""The learned stain-type embedding: one vector per (stain, IHC marker) label.

The vector of a sample is ``stain_table[stain_id] + marker_table[marker_id]`` (the marker table is
optional). Id 0 of both tables is ``unknown`` (see :mod:`stain.vocabulary`), so an unlabelled
tile always has a token. Stain-token dropout replaces a sample's ids by ``unknown`` with
probability ``p`` during training, so the model also learns to work without labels.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

STAIN_MODES = ("token", "add", "none")


class StainEmbedding(nn.Module):
    """Stain (+ marker) embedding tables with id checking and stain-token dropout."""

    def __init__(self, num_stains: int, num_markers: int, dim: int, use_markers: bool,
                 dropout: float, init_std: float) -> None:
        super().__init__()
        if num_stains < 1 or (use_markers and num_markers < 1):
            raise ValueError(f"stain vocabulary needs at least the unknown entry: {num_stains} stains, "
                             f"{num_markers} markers")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"model.stain_token.dropout must lie in [0, 1], got {dropout}")
        self.stain_table = nn.Embedding(num_stains, dim)
        self.marker_table = nn.Embedding(num_markers, dim) if use_markers else None
        self.dropout = dropout
        for table in (self.stain_table, self.marker_table):
            if table is not None:
                trunc_normal_(table.weight, std=init_std)

    @property
    def num_stains(self) -> int:
        return self.stain_table.num_embeddings

    @property
    def num_markers(self) -> int:
        return self.marker_table.num_embeddings if self.marker_table is not None else 0

    def check_ids(self, stain_ids: torch.Tensor, marker_ids: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the offending id when one lies outside the tables."""
        for name, ids, size in (("stain_ids", stain_ids, self.num_stains),
                                ("marker_ids", marker_ids, self.num_markers)):
            if name == "marker_ids" and self.marker_table is None:
                continue
            if ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
            if ids.numel():
                lo, hi = torch.stack([ids.min(), ids.max()]).tolist()  # one host sync for both bounds
                if lo < 0 or hi >= size:
                    bad = lo if lo < 0 else hi
                    raise ValueError(f"{name} contains {bad}, outside the {size}-entry table "
                                     "(ids come from stain.vocabulary; extend it with stain.extra_*)")

    def drop_ids(self, stain_ids: torch.Tensor, marker_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stain-token dropout: in training, each sample's ids become ``unknown`` (0) with probability p."""
        if not self.training or self.dropout == 0.0:
            return stain_ids, marker_ids
        keep = torch.rand(stain_ids.shape, device=stain_ids.device) >= self.dropout
        return stain_ids * keep, marker_ids * keep

    def forward(self, stain_ids: torch.Tensor, marker_ids: torch.Tensor) -> torch.Tensor:
        """``[B]`` stain and marker ids -> ``[B, D]`` embeddings (no dropout here: see :meth:`drop_ids`)."""
        out = self.stain_table(stain_ids)
        if self.marker_table is not None:
            out = out + self.marker_table(marker_ids)
        return out
