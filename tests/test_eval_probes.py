"""kNN and logistic-regression probes: independent references, separable and random-label data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from foundation.config import ConfigError
from foundation.eval.classification import ProbeSettings, evaluate_features
from foundation.eval.knn import KnnParams, knn_proba
from foundation.eval.linear import LinearParams, linear_proba

KNN = KnnParams(k=5, voting="weighted", temperature=0.07, center=False)
LINEAR = LinearParams(C=1.0, C_grid=(0.1, 1.0), cv_folds=3, max_iter=500)


def settings(folds: int = 3, seeds: int = 2, linear: LinearParams = LINEAR, knn: KnnParams = KNN) -> ProbeSettings:
    return ProbeSettings(folds=folds, seeds=seeds, seed=0, knn=knn, linear=linear)


def clusters(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * 10
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = centres[y] + spread * rng.normal(size=(len(y), dim))
    groups = np.array([f"src{i // 4}_{c}" for i, c in enumerate(y)])  # 4 tiles per source
    return x, y, groups


def dinov2_reference(train_x, train_y, test_x, num_classes, k, T):
    """dinov2/eval/knn.py: L2-normalise, cosine top-k, weights exp(sim / T), summed one-hot votes."""
    train = torch.nn.functional.normalize(torch.tensor(train_x), dim=1)
    test = torch.nn.functional.normalize(torch.tensor(test_x), dim=1)
    sims, idx = (test @ train.T).topk(k, dim=1)
    onehot = torch.nn.functional.one_hot(torch.tensor(train_y)[idx], num_classes).double()
    scores = (onehot * (sims / T).exp().unsqueeze(-1)).sum(1)
    return (scores / scores.sum(1, keepdim=True)).numpy()


@pytest.mark.parametrize("voting", ["weighted", "majority"])
def test_knn_matches_a_direct_implementation(voting):
    rng = np.random.default_rng(1)
    train_x, train_y = rng.normal(size=(50, 8)), rng.integers(0, 3, 50)
    test_x = rng.normal(size=(20, 8))
    params = KnnParams(k=7, voting=voting, temperature=0.1, center=False)
    got = knn_proba(train_x, train_y, test_x, 3, params)
    if voting == "weighted":
        want = dinov2_reference(train_x, train_y, test_x, 3, 7, 0.1)
    else:
        want = dinov2_reference(train_x, train_y, test_x, 3, 7, np.inf)  # exp(0) = 1: one vote each
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_knn_center_subtracts_the_training_mean():
    rng = np.random.default_rng(2)
    train_x, train_y, test_x = rng.normal(size=(30, 4)) + 5, rng.integers(0, 2, 30), rng.normal(size=(9, 4)) + 5
    mean = train_x.mean(0)
    got = knn_proba(train_x, train_y, test_x, 2, KnnParams(5, "weighted", 0.1, center=True))
    np.testing.assert_allclose(got, dinov2_reference(train_x - mean, train_y, test_x - mean, 2, 5, 0.1), atol=1e-12)


def test_k_is_capped_at_the_training_set():
    got = knn_proba(np.eye(3), np.array([0, 1, 1]), np.eye(3), 2, KnnParams(50, "majority", 0.1, False))
    np.testing.assert_allclose(got, np.tile([1 / 3, 2 / 3], (3, 1)))


@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_well_separated_features_are_classified_perfectly(protocol):
    x, y, groups = clusters(24, 3, 16, spread=0.5, seed=0)
    result = evaluate_features(x, y, groups, [protocol], settings())[protocol]
    for run in result["runs"]:
        assert run["balanced_accuracy"] == 1.0 and run["auroc"] == 1.0
    assert result["summary"]["balanced_accuracy"] == {"mean": 1.0, "std": 0.0, "n": 2}


@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_random_labels_give_chance(protocol):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 16))
    y = rng.integers(0, 4, 400)
    groups = np.arange(400).astype(str)
    summary = evaluate_features(x, y, groups, [protocol], settings(seeds=2))[protocol]["summary"]
    assert abs(summary["balanced_accuracy"]["mean"] - 0.25) < 0.08
    assert abs(summary["auroc"]["mean"] - 0.5) < 0.08


def test_linear_probe_grid_search_picks_from_the_grid_and_keeps_missing_classes_at_zero():
    x, y, groups = clusters(12, 3, 8, spread=1.0, seed=4)
    train = y != 2  # class 2 never seen in training
    grid = LinearParams(C=None, C_grid=(0.01, 1.0), cv_folds=3, max_iter=500)
    proba = linear_proba(x[train], y[train], groups[train], x, 3, grid, seed=0)
    assert proba.shape == (len(y), 3)
    assert (proba[:, 2] == 0).all()
    np.testing.assert_allclose(proba.sum(1), 1.0)
    assert (proba[train].argmax(1) == y[train]).all()


def test_probe_settings_reject_bad_values():
    with pytest.raises(ConfigError, match="eval.knn.voting"):
        KnnParams.from_config({"k": 5, "voting": "soft", "temperature": 0.1, "center": False})
    with pytest.raises(ConfigError, match="eval.knn.k"):
        KnnParams.from_config({"k": 0, "voting": "majority", "temperature": 0.1, "center": False})
    with pytest.raises(ConfigError, match="C_grid"):
        LinearParams.from_config({"C": None, "C_grid": [], "cv_folds": 3, "max_iter": 10})
    with pytest.raises(ValueError, match="at least two classes"):
        evaluate_features(np.zeros((6, 2)), np.zeros(6, int), np.arange(6).astype(str), ["knn"], settings())
