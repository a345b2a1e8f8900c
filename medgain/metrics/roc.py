"""Sensitivity at a very low false-alarm rate, read off the exact ROC step function."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from monai.utils import convert_to_numpy

from medgain.metrics.scores import binary_labels, output_items, positive_score, stack_output

__all__ = [
    "TPRAtFPRMetric",
    "checked_scores",
    "fpr_budget_note",
    "min_negatives",
    "operating_point",
    "roc_curve",
    "scores_and_labels",
    "tpr_at_fpr",
]


def checked_scores(
    scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, caller: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, labels)`` as flat float64 arrays after checking them, errors prefixed with ``caller``.

    Raises:
        ValueError: when the shapes differ, a score is not finite or a label is not 0 / 1.
    """
    s = np.asarray(convert_to_numpy(scores), dtype=np.float64).reshape(-1)
    y = np.asarray(convert_to_numpy(labels)).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{caller}: {s.size} scores but {y.size} labels")
    if not np.isfinite(s).all():
        raise ValueError(f"{caller}: {int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    bad = np.setdiff1d(np.unique(y), [0, 1])
    if bad.size:
        raise ValueError(f"{caller}: labels must be 0 or 1, found {bad.tolist()}")
    return s, y.astype(np.float64)


def _step_function(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`roc_curve` of checked scores and labels holding both classes."""
    n_pos = y.sum()
    values, inverse = np.unique(s, return_inverse=True)
    # counts per distinct score, from the highest score (strictest threshold) down
    pos = np.bincount(inverse, weights=y, minlength=values.size)[::-1]
    neg = np.bincount(inverse, weights=1.0 - y, minlength=values.size)[::-1]
    tpr = np.concatenate(([0.0], np.cumsum(pos))) / n_pos
    fpr = np.concatenate(([0.0], np.cumsum(neg))) / (y.size - n_pos)
    return fpr, tpr, np.concatenate(([np.inf], values[::-1]))


def roc_curve(
    scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact ROC step function of the data: one point per distinct score (ties form one threshold).

    Args:
        scores: (N,) finite scores, higher meaning "positive".
        labels: (N,) ground truth, 1 = positive, 0 = negative; both classes must be present.

    Returns:
        ``(fpr, tpr, thresholds)``, each (K + 1,) for K distinct scores, thresholds decreasing from +inf (the
        (0, 0) point); predicting positive when ``score >= thresholds[k]`` gives ``(fpr[k], tpr[k])``.

    Raises:
        ValueError: when the shapes differ, a score is not finite, a label is not 0/1 or a class is missing.
    """
    s, y = checked_scores(scores, labels, "roc_curve")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(f"roc_curve: needs both classes, got {n_pos} positive and {y.size - n_pos} negative")
    return _step_function(s, y)


def operating_point(
    fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray, max_fpr: float
) -> tuple[float, float, float]:
    """The point of a :func:`roc_curve` with the highest TPR at an FPR of at most ``max_fpr``.

    Among the thresholds reaching that TPR the largest one (fewest false alarms) is taken.

    Args:
        fpr: (K + 1,) non-decreasing false-positive rates, starting at 0.
        tpr: (K + 1,) matching non-decreasing true-positive rates.
        thresholds: (K + 1,) matching decreasing thresholds.
        max_fpr: the false-alarm budget in [0, 1].

    Returns:
        ``(fpr, tpr, threshold)`` of that point.
    """
    last = int(np.count_nonzero(fpr <= max_fpr)) - 1  # FPR is non-decreasing along the curve
    first = int(np.searchsorted(tpr, tpr[last], side="left"))
    return float(fpr[first]), float(tpr[first]), float(thresholds[first])


def tpr_at_fpr(
    scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, max_fpr: float
) -> tuple[float, float]:
    """Highest true-positive rate whose false-positive rate is at most ``max_fpr``, and its threshold.

    The operating point (:func:`operating_point`) of the exact ROC step function (:func:`roc_curve`): one point
    per distinct score (tied scores form a single threshold) plus the (0, 0) point at threshold +inf. No fixed
    threshold grid is used, so rare operating points such as FPR 0.05 % are found exactly.

    Args:
        scores: (N,) scores, higher meaning "positive" (e.g. the log-odds of being ill, :func:`positive_score`).
        labels: (N,) ground truth, 1 = positive, 0 = negative.
        max_fpr: the false-alarm budget in [0, 1].

    Returns:
        ``(tpr, threshold)``: predicting positive when ``score >= threshold`` reaches ``tpr`` with an FPR of at
        most ``max_fpr``. The threshold is the largest one reaching that TPR (the fewest false alarms), +inf
        when the TPR is 0. ``(nan, nan)`` with a warning when only one class is present.

    Raises:
        ValueError: when ``max_fpr`` is outside [0, 1], the shapes differ, a score is not finite or a label is
            not 0/1.
    """
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"tpr_at_fpr: max_fpr must be in [0, 1], got {max_fpr}")
    s, y = checked_scores(scores, labels, "tpr_at_fpr")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        warnings.warn(
            f"tpr_at_fpr: {n_pos} positive and {y.size - n_pos} negative samples; TPR at FPR needs both "
            "classes, returning NaN.",
            stacklevel=2,
        )
        return math.nan, math.nan
    _, tpr, threshold = operating_point(*_step_function(s, y), max_fpr)
    return tpr, threshold


def min_negatives(max_fpr: float) -> int:
    """Fewest negatives for which a false-alarm budget allows one false alarm: ``ceil(1 / max_fpr)`` (1,000 for
    0.1 %); with fewer, "TPR at FPR <= max_fpr" is the TPR at zero false alarms."""
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"min_negatives: max_fpr must be in (0, 1], got {max_fpr}")
    return math.ceil(1.0 / max_fpr - 1e-9)


def fpr_budget_note(n_negatives: int, max_fpr: float) -> str | None:
    """A warning to print next to a TPR-at-FPR figure measured on too few negatives, or None when enough."""
    needed = min_negatives(max_fpr)
    if n_negatives >= needed:
        return None
    return (
        f"only {n_negatives} negatives: an FPR budget of {max_fpr:g} needs >= {needed} negatives to allow a single "
        "false alarm, so this figure is the TPR at zero false alarms"
    )


def scores_and_labels(
    output: Any, pred_key: str = "pred", label_key: str = "label"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output transform: ``(log-odds of being ill (B,) float64, ill/healthy labels (B,))`` from an evaluator output.

    The log-odds (:func:`~medgain.metrics.scores.positive_score`) do not saturate, so thresholds found on them
    separate frames whose probabilities would tie at 1.0.

    Args:
        output: ``engine.state.output``, a dict of batched tensors or a decollated list of per-sample dicts.
        pred_key: key of the logits, (B, C) or (B, 1).
        label_key: key of the class indices (0 = healthy).

    Raises:
        KeyError: when the output lacks ``pred_key`` or ``label_key``.
    """
    output_items(output, (pred_key, label_key), "scores_and_labels")
    logits, labels = stack_output(output, (pred_key, label_key))
    return positive_score(logits), binary_labels(labels)


class TPRAtFPRMetric(CumulativeIterationMetric):
    """Accumulates per-sample scores and labels; ``aggregate()`` gives the TPR at ``max_fpr`` (see
    :func:`tpr_at_fpr`) and stores the matching decision threshold in ``self.threshold``.

    Args:
        max_fpr: the false-alarm budget in [0, 1], e.g. 0.001 for 0.1 %.
    """

    def __init__(self, max_fpr: float) -> None:
        if not 0.0 <= max_fpr <= 1.0:
            raise ValueError(f"TPRAtFPRMetric: max_fpr must be in [0, 1], got {max_fpr}")
        super().__init__()
        self.max_fpr = float(max_fpr)
        self.threshold = math.nan
        self.counts: dict[str, int] = {}

    def reset(self) -> None:
        """Empty the buffers and forget the last threshold and counts."""
        super().reset()
        self.threshold = math.nan
        self.counts = {}

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        """Flatten one score and one 0/1 label per sample to (B,) each."""
        batch = y_pred.shape[0]
        if y_pred.reshape(batch, -1).shape[1] != 1 or y.reshape(y.shape[0], -1).shape[1] != 1:
            raise ValueError(
                f"TPRAtFPRMetric: expected one score and one label per sample, got y_pred {tuple(y_pred.shape)} "
                f"and y {tuple(y.shape)}"
            )
        return [y_pred.reshape(batch).double(), y.reshape(-1)]

    def aggregate(self) -> float:  # type: ignore[override]
        """TPR at ``max_fpr`` over everything accumulated; NaN with a warning when only one class was seen.

        Also stores in ``self.counts`` what the threshold was chosen on: ``negatives``, ``positives`` and, when the
        threshold is not NaN, ``false_alarms`` (negatives scoring at or above it; 0 for +inf).
        """
        buffers = self.get_buffer()
        scores, labels = buffers if buffers is not None else (torch.zeros(0), torch.zeros(0))
        tpr, self.threshold = tpr_at_fpr(scores, labels, self.max_fpr)
        s, y = checked_scores(scores, labels, "TPRAtFPRMetric")
        self.counts = {"negatives": int((y == 0).sum()), "positives": int((y == 1).sum())}
        if not math.isnan(self.threshold):
            self.counts["false_alarms"] = int(((y == 0) & (s >= self.threshold)).sum())
        return tpr
