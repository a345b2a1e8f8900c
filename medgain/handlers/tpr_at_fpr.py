"""Ignite handler: sensitivity at a very low false-alarm rate, plus the decision threshold reaching it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from monai.handlers import IgniteMetricHandler

from medgain.metrics.roc import TPRAtFPRMetric, scores_and_labels

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["TPRAtFPR"]


class TPRAtFPR(IgniteMetricHandler):
    """TPR at a false-positive rate of at most ``max_fpr`` over an epoch, on the exact ROC curve.

    Besides ``engine.state.metrics[name]``, the decision threshold reaching that TPR (log-odds of being ill >=
    threshold means "ill", see :func:`~medgain.metrics.scores.positive_score`) is written to
    ``engine.state.metrics[name + "_threshold"]`` when it is finite; when it is not (TPR 0 at the budget: +inf; a
    single-class epoch: NaN, with a warning) the key is left out, so no infinite threshold is ever logged or
    stored. What the threshold was chosen on goes to ``name + "_negatives"``, ``name + "_positives"`` and, with a
    finite threshold, ``name + "_false_alarms"`` (negatives at or above it), from which
    :class:`~medgain.handlers.best_checkpoint.BestModelSaver` bounds the false-alarm rate of the stored point.

    Args:
        max_fpr: the false-alarm budget in [0, 1], e.g. 0.001 for 0.1 %.
        output_transform: callable turning ``engine.state.output`` into ``(scores (B,), labels (B,))``; the
            default reads the probability of being ill and the ill/healthy label from the evaluator output.
        save_details: also keep the accumulated ``[scores, labels]`` in ``engine.state.metric_details[name]``.
    """

    def __init__(
        self, max_fpr: float, output_transform: Callable = scores_and_labels, save_details: bool = True
    ) -> None:
        super().__init__(
            metric_fn=TPRAtFPRMetric(max_fpr), output_transform=output_transform, save_details=save_details
        )

    def completed(self, engine: Engine, name: str) -> None:
        """Store the TPR under ``name``, its finite threshold under ``name + "_threshold"`` and the counts."""
        super().completed(engine, name)
        finite = math.isfinite(self.metric_fn.threshold)
        if finite:
            engine.state.metrics[f"{name}_threshold"] = self.metric_fn.threshold
        else:
            engine.state.metrics.pop(f"{name}_threshold", None)
        for count in ("negatives", "positives", "false_alarms"):
            value = self.metric_fn.counts.get(count)
            if value is None or (count == "false_alarms" and not finite):
                engine.state.metrics.pop(f"{name}_{count}", None)
            else:
                engine.state.metrics[f"{name}_{count}"] = float(value)
