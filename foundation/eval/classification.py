"""The tile-classification protocol: kNN and linear probes over grouped folds, repeated over seeds.

Per seed, ``StratifiedGroupKFold`` assigns every source to one of ``folds`` test folds; each probe is trained on
the other folds and predicts the held-out one, so every tile gets exactly one out-of-fold prediction. The metrics
are computed on those pooled predictions (tiny sets: a per-fold AUROC would often see a single class), then
mean and std over the seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from foundation.config import ConfigError
from foundation.eval.knn import KnnParams, knn_proba
from foundation.eval.linear import LinearParams, linear_proba
from foundation.eval.metrics import classification_metrics, summarise
from foundation.eval.splits import grouped_folds

PROTOCOLS = ("knn", "linear")


@dataclass(frozen=True)
class ProbeSettings:
    folds: int
    seeds: int
    seed: int
    knn: KnnParams
    linear: LinearParams

    @classmethod
    def from_config(cls, eval_cfg: Mapping[str, Any]) -> ProbeSettings:
        splits = eval_cfg["splits"]
        settings = cls(int(splits["folds"]), int(splits["seeds"]), int(eval_cfg["seed"]),
                       KnnParams.from_config(eval_cfg["knn"]), LinearParams.from_config(eval_cfg["linear"]))
        if settings.seeds < 1:
            raise ConfigError(f"eval.splits.seeds must be >= 1, got {settings.seeds}")
        return settings


def check_protocols(protocols: Sequence[str]) -> list[str]:
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ConfigError(f"protocols {list(protocols)}: choose one or more of {list(PROTOCOLS)}")
    return list(dict.fromkeys(protocols))


def out_of_fold_proba(protocol: str, x: np.ndarray, y: np.ndarray, groups: np.ndarray, num_classes: int,
                      settings: ProbeSettings, seed: int) -> np.ndarray:
    """``[N, C]`` class probabilities, each row predicted by a probe that never saw that row's source."""
    proba = np.full((len(y), num_classes), np.nan)
    for train, test in grouped_folds(y, groups, settings.folds, seed):
        if protocol == "knn":
            proba[test] = knn_proba(x[train], y[train], x[test], num_classes, settings.knn)
        else:
            proba[test] = linear_proba(x[train], y[train], groups[train], x[test], num_classes, settings.linear,
                                       seed)
    return proba


def evaluate_features(x: np.ndarray, y: np.ndarray, groups: np.ndarray, protocols: Sequence[str],
                      settings: ProbeSettings) -> dict[str, dict[str, Any]]:
    """``{protocol: {"runs": [metrics per seed], "summary": {metric: {mean, std, n}}}}``."""
    y = np.asarray(y, dtype=np.int64)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} feature rows but {len(y)} labels")
    num_classes = int(y.max()) + 1 if len(y) else 0
    if len(np.unique(y)) < 2:
        raise ValueError(f"classification needs at least two classes, got {len(np.unique(y))}")
    out = {}
    for protocol in check_protocols(protocols):
        runs = []
        for r in range(settings.seeds):
            seed = settings.seed + r
            proba = out_of_fold_proba(protocol, x, y, groups, num_classes, settings, seed)
            runs.append({"seed": seed, **classification_metrics(y, proba)})
        metrics = [{k: v for k, v in run.items() if k != "seed"} for run in runs]
        out[protocol] = {"runs": runs, "summary": summarise(metrics)}
    return out
