"""Ensembles of binary classifiers: a weighted mean of their log-odds, weights chosen on out-of-fold predictions."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.utils import convert_to_numpy

from medgain.metrics.bootstrap import auc_score

__all__ = ["EnsembleWeights", "ensemble_scores", "search_ensemble_weights"]


@dataclass(frozen=True)
class EnsembleWeights:
    """The chosen weights (summing to 1) of each model and the out-of-fold AUC they reach."""

    weights: dict[str, float]
    auc: float
    model_auc: dict[str, float]


def _stack(scores: Mapping[str, np.ndarray | torch.Tensor | Sequence[float]], names: Sequence[str]) -> np.ndarray:
    arrays = []
    for name in names:
        if name not in scores:
            raise KeyError(f"ensemble: no scores for model {name!r} (given: {sorted(scores)})")
        a = np.asarray(convert_to_numpy(scores[name]), dtype=np.float64).reshape(-1)
        if not np.isfinite(a).all():
            raise ValueError(f"ensemble: model {name!r} has {int((~np.isfinite(a)).sum())} NaN/inf scores")
        arrays.append(a)
    sizes = {a.size for a in arrays}
    if len(sizes) != 1:
        counts = dict(zip(names, map(len, arrays)))
        raise ValueError(f"ensemble: the models score different numbers of samples: {counts}")
    return np.stack(arrays)


def ensemble_scores(
    scores: Mapping[str, np.ndarray | torch.Tensor | Sequence[float]], weights: Mapping[str, float]
) -> np.ndarray:
    """Weighted mean of the models' scores (log-odds, float64) with ``weights`` (model name → weight).

    Raises:
        KeyError: when a weighted model has no scores.
        ValueError: for non-finite scores, different sample counts or weights that do not sum to a positive value.
    """
    names = list(weights)
    w = np.asarray([float(weights[n]) for n in names])
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"ensemble_scores: weights must be non-negative with a positive sum, got {dict(weights)}")
    return (w / w.sum()) @ _stack(scores, names)


def search_ensemble_weights(
    oof_scores: Mapping[str, np.ndarray | torch.Tensor | Sequence[float]],
    labels: np.ndarray | torch.Tensor | Sequence[int],
    step: float = 0.05,
    groups: np.ndarray | Sequence[int] | None = None,
) -> EnsembleWeights:
    """Grid search of the ensemble weights that maximise the AUC of :func:`ensemble_scores`.

    Pass **out-of-fold** predictions (every sample scored by a model that did not see it); weights chosen on a
    test split would make its AUC optimistic. Scores are log-odds, so that a weighted mean is meaningful.
    Every weight vector on the simplex grid of spacing ``step`` is tried; among equal AUCs the one closest to
    uniform weights wins (then the first in grid order), so the choice is deterministic.

    With ``groups`` (the fold of each sample) the objective is the mean of the per-fold AUCs: each fold's scores
    come from another model, whose log-odds may sit on another scale, and pooling them ranks those shifts
    together with the samples (a model better in every fold can lose on the pooled AUC).

    Args:
        oof_scores: model name → (N,) out-of-fold scores, all for the same samples in the same order.
        labels: (N,) 0/1 ground truth with both classes.
        step: grid spacing; ``1 / step`` must be an integer.
        groups: (N,) fold of each sample, or None for the pooled AUC. Folds with a single class are left out.

    Returns:
        the chosen weights, their AUC and each model's own AUC (both the objective: pooled or fold mean).

    Raises:
        ValueError: for fewer than one model, an invalid ``step``, a single class or mismatched inputs.
    """
    names = list(oof_scores)
    if not names:
        raise ValueError("search_ensemble_weights: no models given")
    n_steps = round(1.0 / step) if step > 0 else 0
    if n_steps < 1 or not np.isclose(n_steps * step, 1.0):
        raise ValueError(f"search_ensemble_weights: 1 / step must be a positive integer, got step={step}")
    stacked = _stack(oof_scores, names)
    y = np.asarray(convert_to_numpy(labels)).reshape(-1)
    if y.size != stacked.shape[1]:
        raise ValueError(f"search_ensemble_weights: {y.size} labels for {stacked.shape[1]} scores")
    if np.unique(y).size != 2:
        raise ValueError("search_ensemble_weights: the labels must hold both classes")
    if groups is None:
        parts = [np.arange(y.size)]
    else:
        g = np.asarray(groups).reshape(-1)
        if g.size != y.size:
            raise ValueError(f"search_ensemble_weights: {g.size} groups for {y.size} labels")
        parts = [np.flatnonzero(g == k) for k in np.unique(g)]
        parts = [idx for idx in parts if np.unique(y[idx]).size == 2]
        if not parts:
            raise ValueError("search_ensemble_weights: no group holds both classes")

    def objective(scores: np.ndarray) -> float:
        return float(np.mean([auc_score(scores[idx], y[idx]) for idx in parts]))

    model_auc = {name: objective(stacked[i]) for i, name in enumerate(names)}
    uniform = np.full(len(names), 1.0 / len(names))
    best: tuple[float, float, np.ndarray] | None = None
    for counts in itertools.product(range(n_steps + 1), repeat=len(names) - 1):
        if sum(counts) > n_steps:
            continue
        w = np.asarray([*counts, n_steps - sum(counts)], np.float64) / n_steps
        auc = round(objective(w @ stacked), 12)  # float noise must not break ties
        distance = float(np.square(w - uniform).sum())
        if best is None or (auc, -distance) > (best[0], -best[1]):
            best = (auc, distance, w)
    assert best is not None
    return EnsembleWeights({n: float(v) for n, v in zip(names, best[2])}, float(best[0]), model_auc)
