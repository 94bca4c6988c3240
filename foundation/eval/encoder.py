"""A frozen encoder behind one interface: uint8 tiles in, CLS and patch tokens out.

Two kinds: :class:`StainEncoder` wraps a :class:`~foundation.models.backbone.StainViT` (a training checkpoint or
a random init) and passes the stain label per call; :class:`TimmEncoder` wraps the plain timm ViT of an export
(:func:`foundation.export.load_exported`), whose stain label is folded into its weights. Both normalise on the
device with the mean/std the encoder was trained with, and both can build a randomly initialised twin of the
same architecture (the random-init baseline).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import timm
import torch
from torch import nn

from foundation.models.backbone import StainViT, build_backbone

POOLINGS = ("cls", "mean_patch", "both")


def pool(cls: torch.Tensor, patch: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[B, D]`` (``both``: ``[B, 2D]``) from CLS ``[B, D]`` and patch tokens ``[B, h, w, D]``."""
    if pooling == "cls":
        return cls
    mean_patch = patch.flatten(1, 2).mean(dim=1)
    if pooling == "mean_patch":
        return mean_patch
    if pooling == "both":
        return torch.cat([cls, mean_patch], dim=-1)
    raise ValueError(f"pooling {pooling!r} is not one of {list(POOLINGS)}")


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under ``torch.manual_seed(seed)`` without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class Encoder(ABC):
    """A frozen ViT with its input normalisation; ``name`` says where the weights came from."""

    def __init__(self, model: nn.Module, name: str, mean: Sequence[float], std: Sequence[float],
                 image_size: int, patch_size: int, label: str = "unknown") -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"{name}: normalisation needs 3 means and 3 positive stds, got {list(mean)} / {list(std)}")
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.label = label  # the stain label every tile is given, as the vocabulary describes it

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    def to(self, device: torch.device | str) -> Encoder:
        self.model.to(device)
        return self

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` -> float ``(x / 255 - mean) / std`` on the encoder's device."""
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def check_size(self, height: int, width: int) -> None:
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"{self.name}: input {height}x{width} is not a multiple of the patch size "
                             f"{self.patch_size} (set eval.embed.image_size)")

    @torch.no_grad()
    def tokens(self, images: torch.Tensor,
               labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[B, 3, H, W]`` -> CLS ``[B, D]`` and patch tokens ``[B, H/p, W/p, D]`` (after the final norm).

        ``labels`` ``[B, 2]`` (stain id, marker id per tile, vocabulary ids) replace the encoder's one label.
        """
        self.check_size(images.shape[-2], images.shape[-1])
        x = self.normalise(images)
        cls, patch = self._forward(x) if labels is None else self._forward_labelled(x, labels.to(x.device))
        B, h, w = images.shape[0], images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        return cls.float(), patch.float().reshape(B, h, w, -1)

    def features(self, images: torch.Tensor, pooling: str, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features ``[B, D]`` (``both``: ``[B, 2D]``) of uint8 tiles (``labels``: see :meth:`tokens`)."""
        return pool(*self.tokens(images, labels), pooling)

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``[B, H/p, W/p, D]`` of uint8 tiles."""
        return self.tokens(images)[1]

    @property
    @abstractmethod
    def takes_labels(self) -> bool:
        """Whether the model has a stain token, so that tiles can be given their own labels."""

    @abstractmethod
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images -> CLS ``[B, D]`` and patch tokens ``[B, N, D]``."""

    @abstractmethod
    def _forward_labelled(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_forward` with a stain label per image (``labels`` ``[B, 2]``)."""

    @abstractmethod
    def random_twin(self, seed: int) -> Encoder:
        """The same architecture, stain label and normalisation with a fresh random init (seeded)."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "embed_dim": self.embed_dim, "patch_size": self.patch_size,
                "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "stain_label": self.label}


class StainEncoder(Encoder):
    """A :class:`StainViT` given the same stain and marker id for every tile."""

    def __init__(self, backbone: StainViT, name: str, mean: Sequence[float], std: Sequence[float], image_size: int,
                 model_cfg: Mapping[str, Any], stain_id: int = 0, marker_id: int = 0,
                 label: str = "unknown") -> None:
        super().__init__(backbone, name, mean, std, image_size, backbone.patch_embed.patch_size[0], label)
        self.model_cfg = model_cfg
        self.stain_id = int(stain_id)
        self.marker_id = int(marker_id)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((x.shape[0], 2), 0, dtype=torch.long, device=x.device)
        ids[:, 0], ids[:, 1] = self.stain_id, self.marker_id
        return self._forward_labelled(x, ids)

    @property
    def takes_labels(self) -> bool:
        return self.model.stain_token is not None

    def _forward_labelled(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.forward_features(x, labels[:, 0], labels[:, 1])
        return out["cls"], out["patch"]

    def random_twin(self, seed: int) -> StainEncoder:
        table = self.model.stain_token
        num_stains = table.num_stains if table is not None else 1
        num_markers = table.num_markers if table is not None else 1
        twin = seeded(seed, lambda: build_backbone(self.model_cfg, num_stains, num_markers, mask_token=False))
        return StainEncoder(twin, f"random init ({self.model_cfg['arch']})", self.mean, self.std, self.image_size,
                            self.model_cfg, self.stain_id, self.marker_id, self.label).to(self.device)


class TimmEncoder(Encoder):
    """A plain timm ``VisionTransformer`` (an export): prefix tokens are CLS, the folded stain token, registers.

    ``refold(stain_id, marker_id)`` (vocabulary ids) folds another label in place; with it, images with their
    own labels run label by label, and the model's own label is put back after each batch.
    """

    def __init__(self, model: nn.Module, name: str, mean: Sequence[float], std: Sequence[float], image_size: int,
                 arch: str, model_args: Mapping[str, Any], label: str = "unknown",
                 refold: Callable[[int, int], None] | None = None) -> None:
        super().__init__(model, name, mean, std, image_size, model.patch_embed.patch_size[0], label)
        self.arch = arch
        self.model_args = dict(model_args)
        self.refold = refold

    @property
    def takes_labels(self) -> bool:
        return self.refold is not None

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model.forward_features(x)
        return tokens[:, 0], tokens[:, self.model.num_prefix_tokens:]

    def _forward_labelled(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.refold is None:
            raise ValueError(f"{self.name}: this model has no stain token to give each tile its own label")
        tokens = [t for t in (self.model.cls_token, getattr(self.model, "reg_token", None)) if t is not None]
        own = [t.detach().clone() for t in tokens]  # what refold changes: the model's own label
        cls = patch = None
        try:
            for label in torch.unique(labels, dim=0):
                rows = (labels == label).all(dim=1)
                self.refold(int(label[0]), int(label[1]))
                part_cls, part_patch = self._forward(x[rows])
                if cls is None:
                    cls = part_cls.new_empty((len(x), *part_cls.shape[1:]))
                    patch = part_patch.new_empty((len(x), *part_patch.shape[1:]))
                cls[rows], patch[rows] = part_cls, part_patch
        finally:
            with torch.no_grad():
                for token, value in zip(tokens, own, strict=True):
                    token.copy_(value)
        return cls, patch

    def random_twin(self, seed: int) -> TimmEncoder:
        twin = seeded(seed, lambda: timm.create_model(self.arch, pretrained=False, **self.model_args))
        return TimmEncoder(twin, f"random init ({self.arch})", self.mean, self.std, self.image_size, self.arch,
                           self.model_args, self.label).to(self.device)
