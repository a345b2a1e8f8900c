"""Ignite handler: ROC AUC of the log-odds of being ill."""

from __future__ import annotations

from collections.abc import Callable

from monai.handlers import ROCAUC

from medgain.metrics.roc import scores_and_labels

__all__ = ["AUC"]


class AUC(ROCAUC):
    """MONAI's ``ROCAUC`` on the ill/healthy problem, reading the evaluator output directly.

    A single-class epoch gives NaN with a warning (MONAI's ``compute_roc_auc`` behaviour).

    Args:
        output_transform: callable turning ``engine.state.output`` into ``(scores (B,), labels (B,))``; the
            default reads the probability of being ill and the ill/healthy label from the evaluator output.
    """

    def __init__(self, output_transform: Callable = scores_and_labels) -> None:
        super().__init__(output_transform=output_transform)
