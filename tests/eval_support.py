"""Shared helpers of the eval tests: a tiny CPU config and the source regex of the H&E-vs-IHC tiles."""

from __future__ import annotations

from omegaconf import DictConfig

from foundation.config import load_config

#: source id of a stain_he_vs_ihc crop: the file name without its "_x<col>_y<row>" crop position
HE_IHC_GROUPS = r"^(.*)_x\d+_y\d+"

TINY = [
    "model=vit_test",
    "objective.dino.head_n_prototypes=32",
    "objective.dino.head_hidden_dim=32",
    "objective.dino.head_bottleneck_dim=16",
    "eval.embed.num_workers=0",
    "eval.embed.image_size=32",
    "eval.device=cpu",
]


def tiny_cfg(*overrides: str) -> DictConfig:
    """The default config with the tiny test ViT, small heads, CPU, 32 px inputs."""
    return load_config(None, [*TINY, *overrides])

