"""Probe and segmentation metrics against computations from their definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from foundation.eval.metrics import classification_metrics, dice_per_class, summarise


def auc_by_pairs(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie): the Mann-Whitney definition of ROC AUC."""
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(positive, negative))
    return wins / (len(positive) * len(negative))


def reference(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    classes = np.arange(proba.shape[1])
    pred = proba.argmax(1)
    recall = [np.mean(pred[y == c] == c) for c in classes if (y == c).any()]
    f1s = []
    for c in np.union1d(y, pred):
        tp = np.sum((pred == c) & (y == c))
        precision = tp / max(np.sum(pred == c), 1)
        rec = tp / max(np.sum(y == c), 1)
        f1s.append(0.0 if tp == 0 else 2 * precision * rec / (precision + rec))
    if proba.shape[1] == 2:
        auroc = auc_by_pairs(proba[y == 1, 1], proba[y == 0, 1])
    else:
        auroc = np.mean([auc_by_pairs(proba[y == c, c], proba[y != c, c]) for c in classes])
    return {"balanced_accuracy": float(np.mean(recall)), "macro_f1": float(np.mean(f1s)), "auroc": float(auroc)}


@pytest.mark.parametrize("num_classes", [2, 4])
def test_classification_metrics_match_their_definitions(num_classes):
    rng = np.random.default_rng(num_classes)
    y = rng.integers(0, num_classes, size=60)
    logits = rng.normal(size=(60, num_classes)) + 1.5 * np.eye(num_classes)[y]  # informative but imperfect
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    got = classification_metrics(y, proba)
    want = reference(y, proba)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert 0.5 < got["balanced_accuracy"] < 1.0


def test_auroc_is_nan_with_one_class_and_perfect_when_separated():
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    assert np.isnan(classification_metrics(np.array([0, 0, 0]), proba)["auroc"])
    assert classification_metrics(np.array([0, 1, 0]), proba)["auroc"] == 1.0


def test_dice_per_class_matches_the_definition_and_skips_ignored_pixels():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, size=(40, 40)).astype(np.uint8)
    pred = np.where(rng.random((40, 40)) < 0.7, target, rng.integers(0, 3, size=(40, 40))).astype(np.uint8)
    target[:5] = 255  # ignored rows: whatever is predicted there must not count
    got = dice_per_class(pred, target, 4, ignore_index=255)
    keep = target != 255
    for c in range(3):
        p, t = (pred == c) & keep, (target == c) & keep
        assert got[c] == pytest.approx(2 * np.sum(p & t) / (np.sum(p) + np.sum(t)), abs=1e-12)
    assert np.isnan(got[3])  # absent from prediction and target
    assert dice_per_class(target, target, 3, 255).tolist() == [1.0, 1.0, 1.0]


def test_summarise_gives_mean_and_population_std_without_nan_runs():
    runs = [{"a": 1.0, "b": np.nan}, {"a": 2.0, "b": 4.0}, {"a": 4.0, "b": 6.0}]
    got = summarise(runs)
    assert got["a"] == {"mean": pytest.approx(7 / 3), "std": pytest.approx(np.std([1, 2, 4])), "n": 3}
    assert got["b"] == {"mean": 5.0, "std": 1.0, "n": 2}
