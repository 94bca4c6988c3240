"""Logistic-regression (linear) probe: standardised features, L2-regularised multinomial logistic regression
(scikit-learn, lbfgs). ``C`` is fixed by config or chosen from a grid by grouped, stratified cross-validation on
the training part only (balanced accuracy), so the test tiles never influence it."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from foundation.config import ConfigError


@dataclass(frozen=True)
class LinearParams:
    C: float | None
    C_grid: tuple[float, ...]
    cv_folds: int
    max_iter: int

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> LinearParams:
        C = None if cfg["C"] is None else float(cfg["C"])
        grid: Sequence[float] = tuple(float(c) for c in cfg["C_grid"])
        params = cls(C, tuple(grid), int(cfg["cv_folds"]), int(cfg["max_iter"]))
        if params.C is not None and params.C <= 0:
            raise ConfigError(f"eval.linear.C must be > 0 or null, got {params.C}")
        if params.C is None and (not grid or min(grid) <= 0):
            raise ConfigError(f"eval.linear.C_grid must hold positive values when C is null, got {list(grid)}")
        if params.cv_folds < 2 or params.max_iter < 1:
            raise ConfigError(f"eval.linear.cv_folds must be >= 2 and max_iter >= 1, got {params.cv_folds}, "
                              f"{params.max_iter}")
        return params


def _pipeline(C: float, params: LinearParams, seed: int) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=params.max_iter, random_state=seed))


def fit_probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, params: LinearParams, seed: int) -> Pipeline:
    """The fitted probe; with ``C`` null, the grid value of best grouped-CV balanced accuracy (refit on all of x).

    The inner folds are capped at the number of training sources; with fewer than two sources the search is
    impossible and the grid's middle value is used.
    """
    with warnings.catch_warnings():
        # Small probe sets: lbfgs may stop at max_iter, inner folds may miss a class; all expected here.
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        warnings.filterwarnings("ignore", message=".*y_pred contains classes not in y_true.*")  # balanced accuracy
        if params.C is not None:
            return _pipeline(params.C, params, seed).fit(x, y)
        folds = min(params.cv_folds, len(np.unique(groups)))
        if folds < 2:
            return _pipeline(params.C_grid[len(params.C_grid) // 2], params, seed).fit(x, y)
        search = GridSearchCV(_pipeline(params.C_grid[0], params, seed),
                              {"logisticregression__C": list(params.C_grid)}, scoring="balanced_accuracy",
                              cv=StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed),
                              refit=True, error_score=np.nan)
        search.fit(x, y, groups=groups)
        return search.best_estimator_


def linear_proba(train_x: np.ndarray, train_y: np.ndarray, train_groups: np.ndarray, test_x: np.ndarray,
                 num_classes: int, params: LinearParams, seed: int) -> np.ndarray:
    """Class probabilities ``[N_test, C]``; classes missing from the training part get probability 0."""
    if len(np.unique(train_y)) < 2:
        raise ValueError("linear probe: the training part holds a single class; use more folds or sources")
    probe = fit_probe(train_x, train_y, train_groups, params, seed)
    out = np.zeros((len(test_x), num_classes))
    out[:, probe.classes_] = probe.predict_proba(test_x)
    return out
