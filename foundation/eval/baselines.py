"""Baselines run next to every encoder: an RGB colour histogram (here) and a random init (Encoder.random_twin).

The colour histogram answers "how much of the task is colour alone": per tile (or per patch for segmentation),
the normalised joint RGB histogram (Swain & Ballard's colour indexing). Joint, not three per-channel
histograms: H&E and IHC differ in which colours co-occur (pink-purple vs brown-blue), which per-channel
marginals blur (on the H&E-vs-IHC tiles, grouped 3-fold kNN: 0.82 balanced accuracy with 16 marginal bins,
0.94 with the 8x8x8 joint histogram).
"""

from __future__ import annotations

import torch

BASELINES = ("random", "color_histogram")


def color_histogram(images: torch.Tensor, bins: int) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> ``[B, bins**3]``: the share of pixels in each cell of a joint RGB histogram
    (``bins`` equal-width bins per channel over 0..255; cell index ``(r * bins + g) * bins + b``)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"color_histogram needs uint8 [B, 3, H, W], got {images.dtype} {list(images.shape)}")
    if not 1 <= bins <= 256:
        raise ValueError(f"eval.color_histogram.bins must lie in 1..256, got {bins}")
    q = images.long().flatten(2) * bins // 256  # [B, 3, HW] bin of each channel value
    cell = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]  # [B, HW]
    counts = torch.zeros(images.shape[0], bins**3, device=images.device)
    counts.scatter_add_(1, cell, torch.ones_like(cell, dtype=counts.dtype))
    return counts / cell.shape[-1]


def patch_color_histogram(images: torch.Tensor, patch_size: int, bins: int) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> ``[B, H/p, W/p, bins**3]``: :func:`color_histogram` of each ``p x p`` patch."""
    B, C, H, W = images.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"image {H}x{W} is not a multiple of the patch size {patch_size}")
    h, w = H // patch_size, W // patch_size
    patches = images.reshape(B, C, h, patch_size, w, patch_size).permute(0, 2, 4, 1, 3, 5)
    return color_histogram(patches.reshape(B * h * w, C, patch_size, patch_size), bins).reshape(B, h, w, -1)


class ColorHistogram:
    """The colour-histogram baseline, with the interface the eval loops use (``features``, ``patch_features``)."""

    name = "color histogram"

    def __init__(self, bins: int, patch_size: int) -> None:
        self.bins = int(bins)
        self.patch_size = int(patch_size)

    def features(self, images: torch.Tensor, pooling: str, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-tile histogram (``pooling`` and stain ``labels`` do not apply: there are no tokens)."""
        return color_histogram(images, self.bins)

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        return patch_color_histogram(images, self.patch_size, self.bins)

    def describe(self) -> dict[str, int | str]:
        return {"name": self.name, "bins": self.bins, "dim": self.bins**3, "patch_size": self.patch_size}
