"""In-training monitor: a cheap kNN probe of the teacher on a small labelled tile set, plus collapse signals.

The trainer builds one :class:`KnnMonitor` from the config (``None`` when ``eval.monitor.tiles`` is null) and
calls it every ``eval.monitor.every`` steps with the teacher backbone (and, where the objective has one, the
teacher's projection head and the current teacher temperature); it logs the returned scalars. At ZeRO-3 call
it on every rank: the forward gathers the partitioned parameters (the result is the same on each rank).

The tiles (at most ``max_tiles_per_class`` per class, first in sorted order) are decoded once, at
``data.crops.global_size``, and kept as a uint8 tensor; the backbone sees them with stain ``unknown``. The
probe is leave-one-source-out kNN: each tile is classified by the ``eval.knn`` vote of its nearest tiles
from other sources (``group_by``; without it, from the other tiles). Scalars:

* ``knn_balanced_accuracy``: of that probe;
* ``feature_std``: per-dimension std of the L2-normalised CLS features across tiles, averaged over dimensions
  (DINO's collapse signal: near 0 when every tile maps to one point; about ``1/sqrt(D)`` when spread out);
* ``head_entropy`` / ``head_marginal_entropy`` (with a head): mean entropy of the teacher's softmax
  ``head(cls) / teacher_temp`` per tile, and entropy of its mean over tiles, both divided by ``log K`` (so in
  [0, 1]). Collapse to one prototype drives both to 0; collapse to the uniform distribution drives the
  per-tile entropy to 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from foundation.config import ConfigError
from foundation.eval.knn import KnnParams, vote
from foundation.eval.tiles import load_tile, scan_tiles, source_ids
from foundation.models.backbone import StainViT


def leave_one_source_out_knn(features: torch.Tensor, labels: np.ndarray, groups: np.ndarray,
                             params: KnnParams) -> np.ndarray:
    """Class probabilities ``[N, C]``: each tile voted on by its ``k`` most similar tiles of other sources."""
    x = torch.nn.functional.normalize(features.double(), dim=1)
    if params.center:
        x = torch.nn.functional.normalize(features.double() - features.double().mean(0, keepdim=True), dim=1)
    sim = (x @ x.T).cpu().numpy()
    _, group_ids = np.unique(groups, return_inverse=True)
    same = group_ids[:, None] == group_ids[None, :]
    sim[same] = -np.inf
    candidates = int((~same).sum(axis=1).min())
    if candidates < 1:
        raise ValueError("kNN monitor: a source holds every tile; it needs tiles from at least two sources")
    # k at most the fewest candidates a class has for any tile: with more, a tile's own class (its source left
    # out) is out-voted by numbers alone, and features that carry nothing score below chance instead of at it
    per_class = (~same).astype(np.int64) @ (labels[:, None] == np.unique(labels)[None, :]).astype(np.int64)
    k = min(params.k, candidates, int(per_class[per_class > 0].min()))
    neighbours = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    sims = np.take_along_axis(sim, neighbours, axis=1)
    return vote(sims, labels[neighbours], int(labels.max()) + 1, params)


def normalised_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy of distributions along the last dim, divided by ``log K``."""
    return -(p * p.clamp(min=torch.finfo(p.dtype).tiny).log()).sum(-1) / math.log(p.shape[-1])


def cls_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLS ``[B, D]`` (fp32) of a :class:`StainViT` (stain ``unknown``) or of a plain timm ViT."""
    if isinstance(backbone, StainViT):
        unknown = torch.zeros(len(x), dtype=torch.long, device=x.device)
        return backbone.forward_features(x, unknown, unknown)["cls"].float()
    return backbone.forward_features(x)[:, 0].float()


class KnnMonitor:
    """See the module docstring; ``monitor(backbone, head=None, teacher_temp=None) -> {name: float}``."""

    def __init__(self, tiles_dir: str, size: int, mean: Any, std: Any, params: KnnParams, max_per_class: int,
                 group_by: str | None, extensions: Any) -> None:
        tiles = scan_tiles(tiles_dir, extensions, labelled=True)
        if len(tiles.class_names) < 2:
            raise ConfigError(f"eval.monitor.tiles = {tiles_dir}: needs at least two class folders, "
                              f"found {list(tiles.class_names)}")
        if max_per_class < 1:
            raise ConfigError(f"eval.monitor.max_tiles_per_class must be >= 1, got {max_per_class}")
        keep = np.concatenate([np.flatnonzero(tiles.labels == c)[:max_per_class]
                               for c in range(len(tiles.class_names))])
        self.paths = [tiles.paths[i] for i in keep]
        self.labels = tiles.labels[keep]
        self.class_names = tiles.class_names
        self.groups = source_ids([str(p) for p in self.paths], group_by)
        self.images = torch.from_numpy(np.stack([load_tile(p, size) for p in self.paths])).permute(0, 3, 1, 2)
        self.mean = torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(1, 3, 1, 1)
        self.params = params

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> KnnMonitor | None:
        """The monitor of ``cfg.eval.monitor`` (``None`` when its ``tiles`` is null)."""
        mon = cfg["eval"]["monitor"]
        if mon["tiles"] is None:
            return None
        crops = cfg["data"]["crops"]
        return cls(str(mon["tiles"]), int(crops["global_size"]), crops["mean"], crops["std"],
                   KnnParams.from_config(cfg["eval"]["knn"]), int(mon["max_tiles_per_class"]), mon["group_by"],
                   cfg["eval"]["embed"]["extensions"])

    def __len__(self) -> int:
        return len(self.labels)

    @torch.no_grad()
    def __call__(self, backbone: nn.Module, head: nn.Module | None = None, teacher_temp: float | None = None,
                 batch_size: int = 64) -> dict[str, float]:
        was_training = backbone.training
        backbone.eval()
        try:
            device = next(backbone.parameters()).device
            x = ((self.images.to(device).float() / 255.0) - self.mean.to(device)) / self.std.to(device)
            cls = torch.cat([cls_features(backbone, xb) for xb in x.split(batch_size)])
            proba = leave_one_source_out_knn(cls, self.labels, self.groups, self.params)
            out = {
                "knn_balanced_accuracy": float(balanced_accuracy_score(self.labels, proba.argmax(axis=1))),
                "feature_std": float(torch.nn.functional.normalize(cls, dim=1).std(dim=0).mean()),
            }
            if head is not None:
                if teacher_temp is None or teacher_temp <= 0:
                    raise ValueError(f"a head needs a positive teacher_temp, got {teacher_temp}")
                probs = torch.softmax(head(cls).float() / teacher_temp, dim=-1)
                out["head_entropy"] = float(normalised_entropy(probs).mean())
                out["head_marginal_entropy"] = float(normalised_entropy(probs.mean(dim=0)))
            return out
        finally:
            backbone.train(was_training)
