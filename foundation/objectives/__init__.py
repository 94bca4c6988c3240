"""Self-supervised objectives behind one interface (:class:`~foundation.objectives.base.Objective`).

``build_objective(cfg)`` reads ``cfg.objective.name`` (mae | ibot | dino | mae_ibot | simclr | byol),
``cfg.model`` for the backbone and ``cfg.stain`` for the stain-token table sizes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from foundation.models import cfgutil
from foundation.objectives.base import Objective
from foundation.objectives.byol import BYOL
from foundation.objectives.combined import MAEIBOT
from foundation.objectives.dino import DINO
from foundation.objectives.ibot import IBOT
from foundation.objectives.mae import MAE
from foundation.objectives.simclr import SimCLR
from stain.vocabulary import StainVocabulary

OBJECTIVES: dict[str, type[Objective]] = {
    "mae": MAE,
    "ibot": IBOT,
    "dino": DINO,
    "mae_ibot": MAEIBOT,
    "simclr": SimCLR,
    "byol": BYOL,
}


def build_objective(cfg: Mapping[str, Any]) -> Objective:
    """The objective named by ``cfg.objective.name``, built from the full composed config."""
    name = cfgutil.choice(cfgutil.get(cfg, "objective.name", ""), OBJECTIVES, "objective.name")
    vocab = StainVocabulary.from_config(cfg.get("stain"))
    return OBJECTIVES[name](cfgutil.get(cfg, "model", ""), cfgutil.get(cfg, "objective", ""), vocab)


__all__ = ["OBJECTIVES", "Objective", "build_objective"]
