"""Grouped, stratified splits: all tiles of one source (slide, image) fall on the same side of every split."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

Split = tuple[np.ndarray, np.ndarray]


def grouped_folds(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[Split]:
    """``(train, test)`` index arrays of ``StratifiedGroupKFold(folds, shuffle=True, random_state=seed)``:
    each tile is tested exactly once, and no group is split across train and test."""
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if len(labels) != len(groups):
        raise ValueError(f"{len(labels)} labels but {len(groups)} groups")
    n_groups = len(np.unique(groups))
    if folds < 2:
        raise ValueError(f"eval.splits.folds must be >= 2, got {folds}")
    if n_groups < folds:
        raise ValueError(f"{n_groups} sources (groups) cannot fill {folds} grouped folds: lower eval.splits.folds "
                         "or check the group-by regex")
    classes, tiles_per_class = np.unique(labels, return_counts=True)
    if tiles_per_class.max() < folds:
        raise ValueError(f"every class has fewer tiles than eval.splits.folds={folds} (tiles per class id: "
                         f"{dict(zip(classes.tolist(), tiles_per_class.tolist(), strict=True))}): add tiles or "
                         "lower eval.splits.folds")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = [(train, test) for train, test in splitter.split(np.zeros(len(labels)), labels, groups)]
    check_disjoint_groups(out, groups)
    return out


def check_disjoint_groups(splits: list[Split], groups: np.ndarray) -> None:
    """Raise ``AssertionError`` naming the group when a source sits on both sides of a split."""
    for i, (train, test) in enumerate(splits):
        shared = set(groups[train]) & set(groups[test])
        if shared:
            raise AssertionError(f"split {i}: source {sorted(shared)[0]!r} is in train and test")
