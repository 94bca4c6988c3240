"""k-nearest-neighbour probe on cosine similarity (DINOv2 ``eval/knn.py``, UNI ``fewshot.py``).

Features are L2-normalised (after subtracting the training mean with ``center``, as UNI does), the ``k``
most similar training tiles vote (scikit-learn ``NearestNeighbors``, cosine metric), and the class scores are:

* ``weighted`` (DINOv2): each neighbour votes ``exp(cos / temperature)`` for its class;
* ``majority``: each neighbour votes 1.

Scores are divided by their sum to give class probabilities (what AUROC ranks); the prediction is the
arg-max, ties going to the lowest class id. ``k`` is capped at the number of training tiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.neighbors import NearestNeighbors

from foundation.config import ConfigError

VOTING = ("weighted", "majority")


@dataclass(frozen=True)
class KnnParams:
    k: int
    voting: str
    temperature: float
    center: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> KnnParams:
        params = cls(int(cfg["k"]), str(cfg["voting"]), float(cfg["temperature"]), bool(cfg["center"]))
        if params.k < 1:
            raise ConfigError(f"eval.knn.k must be >= 1, got {params.k}")
        if params.voting not in VOTING:
            raise ConfigError(f"eval.knn.voting = {params.voting!r} is not one of {list(VOTING)}")
        if params.temperature <= 0:
            raise ConfigError(f"eval.knn.temperature must be > 0, got {params.temperature}")
        return params


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, np.finfo(x.dtype).tiny)


def vote(similarities: np.ndarray, neighbour_labels: np.ndarray, num_classes: int,
         params: KnnParams) -> np.ndarray:
    """Class probabilities ``[N, C]`` from the neighbours' cosine similarities and labels ``[N, k]``."""
    if params.voting == "weighted":
        weights = np.exp((similarities - 1.0) / params.temperature)  # exp(cos/T), scaled by exp(-1/T): no overflow
    else:
        weights = np.ones_like(similarities)
    scores = np.zeros((len(similarities), num_classes))
    np.add.at(scores, (np.arange(len(similarities))[:, None], neighbour_labels), weights)
    return scores / scores.sum(axis=1, keepdims=True)


def knn_proba(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int,
              params: KnnParams) -> np.ndarray:
    """Class probabilities ``[N_test, C]`` of the kNN probe trained on ``(train_x, train_y)``."""
    if len(train_x) == 0:
        raise ValueError("kNN probe: the training set is empty")
    train_x = np.asarray(train_x, dtype=np.float64)
    test_x = np.asarray(test_x, dtype=np.float64)
    if params.center:
        mean = train_x.mean(axis=0, keepdims=True)
        train_x, test_x = train_x - mean, test_x - mean
    k = min(params.k, len(train_x))
    index = NearestNeighbors(n_neighbors=k, metric="cosine").fit(l2_normalise(train_x))
    distances, neighbours = index.kneighbors(l2_normalise(test_x))
    return vote(1.0 - distances, np.asarray(train_y)[neighbours], num_classes, params)
