"""DINO (Caron et al. 2021) with DINOv2's details: iBOT without the masked-patch term.

CLS self-distillation over global + local crops, EMA-centred or Sinkhorn-Knopp teacher targets,
optional KoLeo/KDE; no mask token, so the batch needs no ``masks``.
"""

from __future__ import annotations

from foundation.objectives.ibot import IBOT


class DINO(IBOT):
    """iBOT's code path with ``use_patch_loss = False``."""

    required_batch_keys = ("global_crops", "local_crops", "stain_ids", "marker_ids")
    schedule_names = ("teacher_temp", "dino_weight", "koleo_weight", "kde_weight")
    terms = ("dino", "koleo", "kde")
    use_patch_loss = False
