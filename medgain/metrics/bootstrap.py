"""ROC AUC with ties, its bootstrap confidence interval and the out-of-fold (cross-validation) summary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medgain.metrics.roc import checked_scores

__all__ = ["auc_score", "bootstrap_auc", "cluster_indices", "oof_auc_summary", "weighted_auc"]


def weighted_auc(inverse: np.ndarray, y: np.ndarray, weights: np.ndarray, n_values: int) -> float:
    """AUC of samples with integer score ranks ``inverse`` (ties share a rank, ``np.unique(..., return_inverse=True)``)
    and sample weights (bootstrap counts); NaN when a class has zero weight. A tied positive-negative pair counts
    one half.

    Args:
        inverse: (N,) rank of each sample's score among the ``n_values`` distinct scores, ascending.
        y: (N,) 0/1 labels as floats.
        weights: (N,) non-negative sample weights.
        n_values: number of distinct scores.
    """
    pos = np.bincount(inverse, weights=weights * y, minlength=n_values)
    neg = np.bincount(inverse, weights=weights * (1.0 - y), minlength=n_values)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def cluster_indices(groups: Sequence[object] | None, n: int, caller: str) -> np.ndarray:
    """The resampling unit of each of ``n`` samples as indices 0..k-1: its group (e.g. a patient), else itself.

    Raises:
        ValueError: naming ``caller``, when ``groups`` does not hold one entry per sample.
    """
    if groups is None:
        return np.arange(n)
    if len(groups) != n:
        raise ValueError(f"{caller}: {len(groups)} groups for {n} scores")
    return np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1]


def auc_score(
    scores: np.ndarray | torch.Tensor | Sequence[float], labels: np.ndarray | torch.Tensor | Sequence[int]
) -> float:
    """Area under the ROC curve (the Mann-Whitney probability, ties counting one half), in float64.

    Args:
        scores: (N,) finite scores, higher meaning positive (e.g. the log-odds of being ill).
        labels: (N,) 0/1 ground truth.

    Returns:
        the AUC; NaN when only one class is present.

    Raises:
        ValueError: for mismatched shapes, non-finite scores or labels other than 0/1.
    """
    s, y = checked_scores(scores, labels, "auc_score")
    values, inverse = np.unique(s, return_inverse=True)
    return weighted_auc(inverse, y, np.ones_like(y), values.size)


def bootstrap_auc(
    scores: np.ndarray | torch.Tensor | Sequence[float],
    labels: np.ndarray | torch.Tensor | Sequence[int],
    groups: Sequence[Any] | None = None,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """AUC and its percentile bootstrap confidence interval.

    With ``groups`` (patient ids) whole patients are resampled, so images of one patient, which are correlated,
    move together. Resamples holding a single class are drawn again (they have no AUC).

    Args:
        scores: (N,) finite scores.
        labels: (N,) 0/1 ground truth with both classes.
        groups: (N,) patient ids for the cluster bootstrap; None resamples images.
        n_bootstrap: number of resamples.
        confidence: level of the interval in (0, 1).
        seed: resampling seed.

    Returns:
        ``(auc, low, high)``.

    Raises:
        ValueError: for invalid inputs, a single class, or ``n_bootstrap`` / ``confidence`` out of range.
    """
    s, y = checked_scores(scores, labels, "bootstrap_auc")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_auc: confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 1:
        raise ValueError(f"bootstrap_auc: n_bootstrap must be >= 1, got {n_bootstrap}")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(f"bootstrap_auc: needs both classes, got {n_pos} positive and {y.size - n_pos} negative")
    values, inverse = np.unique(s, return_inverse=True)
    cluster = cluster_indices(groups, y.size, "bootstrap_auc")
    n_clusters = int(cluster.max()) + 1
    rng = np.random.default_rng(seed)
    estimates = np.empty(n_bootstrap)
    done = 0
    while done < n_bootstrap:
        draws = np.bincount(rng.integers(0, n_clusters, n_clusters), minlength=n_clusters).astype(np.float64)
        value = weighted_auc(inverse, y, draws[cluster], values.size)
        if not math.isnan(value):
            estimates[done] = value
            done += 1
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(estimates, [alpha, 1.0 - alpha])
    return weighted_auc(inverse, y, np.ones_like(y), values.size), float(low), float(high)


def oof_auc_summary(
    scores: np.ndarray | torch.Tensor | Sequence[float],
    labels: np.ndarray | torch.Tensor | Sequence[int],
    folds: Sequence[int] | np.ndarray,
    groups: Sequence[Any] | None = None,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Cross-validation summary of out-of-fold predictions: AUC per fold, pooled AUC and its bootstrap interval.

    Each sample's score must come from the model that did not train on its fold. Pooling ranks all folds'
    scores together, which assumes the fold models' scores are on one scale (log-odds of models trained alike).

    Args:
        scores: (N,) out-of-fold scores.
        labels: (N,) 0/1 ground truth.
        folds: (N,) fold index of each sample.
        groups: (N,) patient ids for the cluster bootstrap of the pooled AUC.
        n_bootstrap: resamples of the interval.
        confidence: level of the interval.
        seed: resampling seed.

    Returns:
        ``{"per_fold": {fold: auc}, "fold_mean": float, "pooled": float, "ci_low": float, "ci_high": float,
        "confidence": float, "n": int, "n_positive": int}`` (a single-class fold has a NaN AUC and is left out of
        the mean).
    """
    s, y = checked_scores(scores, labels, "oof_auc_summary")
    f = np.asarray(folds).reshape(-1)
    if f.size != s.size:
        raise ValueError(f"oof_auc_summary: {f.size} fold indices for {s.size} scores")
    per_fold = {int(k): auc_score(s[f == k], y[f == k]) for k in np.unique(f)}
    finite = [v for v in per_fold.values() if not math.isnan(v)]
    pooled, low, high = bootstrap_auc(s, y, groups, n_bootstrap, confidence, seed)
    return {
        "per_fold": per_fold,
        "fold_mean": float(np.mean(finite)) if finite else math.nan,
        "pooled": pooled,
        "ci_low": low,
        "ci_high": high,
        "confidence": float(confidence),
        "n": int(s.size),
        "n_positive": int(y.sum()),
    }
