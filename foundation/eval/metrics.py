"""Metrics of the probes (scikit-learn) and of the segmentation demonstrator, and mean/std summaries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

CLASSIFICATION_METRICS = ("balanced_accuracy", "macro_f1", "auroc")


def auroc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Binary: ROC AUC of class 1's score. Multiclass: macro one-vs-rest AUC over the classes present in
    ``y_true`` (scores renormalised over them). NaN with fewer than two classes present."""
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    if proba.shape[1] == 2:
        return float(roc_auc_score(y_true, proba[:, 1]))
    sub = proba[:, present]
    totals = sub.sum(axis=1, keepdims=True)
    sub = np.divide(sub, totals, out=np.full_like(sub, 1.0 / len(present)), where=totals > 0)
    if len(present) == 2:
        return float(roc_auc_score(y_true == present[1], sub[:, 1]))
    return float(roc_auc_score(y_true, sub, multi_class="ovr", average="macro", labels=present))


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Balanced accuracy, macro F1 (over the classes present in truth or prediction) and AUROC of class scores
    ``proba [N, C]``; the prediction is the arg-max (ties: the lowest class id)."""
    y_true = np.asarray(y_true)
    if proba.ndim != 2 or len(proba) != len(y_true):
        raise ValueError(f"proba must be [N, C] with N = {len(y_true)}, got {list(proba.shape)}")
    y_pred = proba.argmax(axis=1)
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
        "auroc": auroc(y_true, proba),
    }


def dice_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int,
                   ignore_index: int | None = None) -> np.ndarray:
    """``2 |P ∩ T| / (|P| + |T|)`` per class over all pixels (``ignore_index`` pixels excluded);
    NaN for a class absent from both prediction and target."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    keep = np.ones(target.shape, bool) if ignore_index is None else target != ignore_index
    p, t = pred[keep], target[keep]
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        denominator = np.count_nonzero(p == c) + np.count_nonzero(t == c)
        if denominator:
            out[c] = 2.0 * np.count_nonzero((p == c) & (t == c)) / denominator
    return out


def summarise(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``{metric: {"mean", "std", "n"}}`` over runs (population std, ``ddof=0``; NaN runs left out)."""
    if not runs:
        raise ValueError("nothing to summarise: no runs")
    out = {}
    for key in runs[0]:
        values = np.array([r[key] for r in runs], dtype=float)
        finite = values[~np.isnan(values)]
        out[key] = {"mean": float(finite.mean()) if len(finite) else float("nan"),
                    "std": float(finite.std()) if len(finite) else float("nan"), "n": len(finite)}
    return out
