"""Ignite handler: sensitivity at a very low false-alarm rate, plus the decision threshold reaching it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from monai.handlers import IgniteMetricHandler

from medgain.metrics.roc import TPRAtFPRMetric, scores_and_labels

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["TPRAtFPR"]


class TPRAtFPR(IgniteMetricHandler):
    """TPR at a false-positive rate of at most ``max_fpr`` over an epoch, on the exact ROC curve.

    Besides ``engine.state.metrics[name]``, the decision threshold reaching that TPR (probability >= threshold
    means "ill") is written to ``engine.state.metrics[name + "_threshold"]``. A single-class epoch gives NaN for
    both, with a warning.

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
        """Store the TPR under ``name`` and its threshold under ``name + "_threshold"``."""
        super().completed(engine, name)
        engine.state.metrics[f"{name}_threshold"] = self.metric_fn.threshold
