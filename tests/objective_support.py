"""Test helpers for models and objectives: the tiny config (vit_test, small heads) and contract batches."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from foundation.config import load_config

IMG = 64          # vit_test img_size
LOCAL = 32        # local crop side
PATCH = 16        # vit_test patch_size
N_PATCHES = (IMG // PATCH) ** 2

SMALL_HEADS = (
    "objective.dino.head_n_prototypes=32", "objective.dino.head_hidden_dim=32", "objective.dino.head_bottleneck_dim=16",
    "objective.ibot.head_n_prototypes=24", "objective.ibot.head_hidden_dim=32", "objective.ibot.head_bottleneck_dim=16",
    "objective.mae.decoder_embed_dim=32", "objective.mae.decoder_depth=1", "objective.mae.decoder_num_heads=2",
    "objective.projection.hidden_dim=32", "objective.projection.out_dim=16",
    "objective.projection.predictor_hidden_dim=32",
)


@functools.cache
def _base_cfg(objective: str) -> DictConfig:
    return load_config(overrides=["model=vit_test", f"objective={objective}", *SMALL_HEADS])


def tiny_cfg(objective: str = "ibot", *overrides: str) -> DictConfig:
    """The full config with ``model=vit_test``, small heads and ``overrides`` (dotlist) applied last.

    The composed base is cached per objective (composition deep-copies the whole tree per override);
    overrides are merged in one step onto a copy, and the struct flag still rejects unknown keys.
    """
    base = _base_cfg(objective)
    return OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides))) if overrides else base


def tiny_batch(n_global: int = 2, batch: int = 3, n_local: int = 2, seed: int = 0,
               mask_ratio: float = 0.4) -> dict[str, torch.Tensor]:
    """A batch following the contract of foundation/objectives/base.py, deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "global_crops": torch.randn(n_global, batch, 3, IMG, IMG, generator=g),
        "local_crops": torch.randn(n_local, batch, 3, LOCAL, LOCAL, generator=g),
        "masks": torch.rand(n_global, batch, N_PATCHES, generator=g) < mask_ratio,
        "stain_ids": torch.randint(0, 4, (batch,), generator=g),
        "marker_ids": torch.randint(0, 3, (batch,), generator=g),
    }


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run ~20x faster on one thread than on two on the shared, loaded 2-core machine.

    Import it into a test module (``from tests.objective_support import one_thread  # noqa: F401``).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
