"""Synthetic batches that follow the batch contract (``foundation.objectives.base``) for a composed config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from foundation.objectives.base import validate_batch


def synthetic_batch(cfg: Any, keys: Sequence[str], patch: int, device: torch.device, seed: int = 0,
                    mask_ratio: float = 0.3) -> dict[str, torch.Tensor]:
    """One batch of ``data.pipeline.batch_size`` samples with ``data.crops`` shapes, seeded.

    Crops are standard normal (what normalised pixels look like); half of the global crops get a random
    ``mask_ratio`` iBOT mask (as ``data.masking.mask_sample_probability`` 0.5); stain and marker ids are small.
    Only the ``keys`` the objective reads are produced (plus ``global_crops``, ``stain_ids`` for the contract).
    """
    gen = torch.Generator().manual_seed(seed)
    crops = cfg.data.crops
    batch = int(cfg.data.pipeline.batch_size)
    g, size = int(crops.global_count), int(crops.global_size)
    out: dict[str, torch.Tensor] = {
        "global_crops": torch.randn(g, batch, 3, size, size, generator=gen),
        "stain_ids": torch.randint(0, 3, (batch,), generator=gen),
        "marker_ids": torch.randint(0, 3, (batch,), generator=gen),
    }
    if "local_crops" in keys:
        lsize = int(crops.local_size)
        out["local_crops"] = torch.randn(int(crops.local_count), batch, 3, lsize, lsize, generator=gen)
    if "masks" in keys:
        n = (size // patch) ** 2
        masks = torch.rand(g, batch, n, generator=gen) < mask_ratio
        masks[:, batch // 2:] = False
        out["masks"] = masks
    validate_batch(out, [k for k in keys if k in out])
    return {k: v.to(device) for k, v in out.items()}
