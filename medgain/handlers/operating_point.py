"""Ignite metric: sensitivity, specificity and false alarms at the operating point that ships with the model."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from ignite.metrics import Metric

from medgain.metrics.roc import scores_and_labels
from medgain.model_file import load_operating_point

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["OperatingPointMetrics"]

#: the figures written, as ``<prefix>_<name>``
FIGURES = ("sensitivity", "specificity", "false_alarms", "false_alarms_per_1000", "accuracy")


class OperatingPointMetrics(Metric):
    """Confusion counts at a fixed, stored threshold, never re-tuned on the data it is measured on.

    At ``Events.EPOCH_COMPLETED`` it writes ``<prefix>_sensitivity``, ``<prefix>_specificity``,
    ``<prefix>_false_alarms`` (count of healthy samples flagged), ``<prefix>_false_alarms_per_1000`` (per 1,000
    healthy samples) and ``<prefix>_accuracy`` to ``engine.state.metrics``. The threshold is on the log-odds of
    being ill (:func:`~medgain.metrics.scores.positive_score`): ``threshold`` as given, or the operating point of
    ``checkpoint`` read when the engine starts. A checkpoint without an operating point gives NaN figures with a
    warning; a rate without samples of its class is NaN.

    Args:
        prefix: name prefix, e.g. "test".
        checkpoint: model file whose operating point gives the threshold; exclusive with ``threshold``.
        threshold: log-odds threshold; exclusive with ``checkpoint``.
        output_transform: engine output → ``(scores (B,), ill/healthy labels (B,))``.
    """

    def __init__(
        self,
        prefix: str,
        checkpoint: str | None = None,
        threshold: float | None = None,
        output_transform: Callable = scores_and_labels,
    ) -> None:
        if (checkpoint is None) == (threshold is None):
            raise ValueError("OperatingPointMetrics: give exactly one of checkpoint and threshold")
        self.prefix = prefix
        self.checkpoint = checkpoint
        self.threshold = math.nan if threshold is None else float(threshold)
        super().__init__(output_transform=output_transform)

    @property
    def names(self) -> list[str]:
        """The metric names written."""
        return [f"{self.prefix}_{figure}" for figure in FIGURES]

    def reset(self) -> None:
        """Zero the counts."""
        self.counts = torch.zeros(4, dtype=torch.int64)  # tp, fn, fp, tn

    def update(self, output: Any) -> None:
        """Count one batch at the threshold."""
        scores, labels = output
        flagged = torch.as_tensor(scores).reshape(-1) >= self.threshold
        ill = torch.as_tensor(labels).reshape(-1).bool().to(flagged.device)
        self.counts += torch.stack(
            [(flagged & ill).sum(), (~flagged & ill).sum(), (flagged & ~ill).sum(), (~flagged & ~ill).sum()]
        ).cpu()

    def compute(self) -> dict[str, float]:
        """The figures of everything counted."""
        tp, fn, fp, tn = (int(v) for v in self.counts)
        if math.isnan(self.threshold):
            return {figure: math.nan for figure in FIGURES}

        def ratio(a: int, b: int) -> float:
            return a / b if b else math.nan

        return {
            "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp),
            "false_alarms": float(fp),
            "false_alarms_per_1000": 1000.0 * ratio(fp, fp + tn),
            "accuracy": ratio(tp + tn, tp + fn + fp + tn),
        }

    def started(self, engine: Engine) -> None:
        """Read the checkpoint's threshold, then reset."""
        if self.checkpoint is not None:
            threshold = load_operating_point(self.checkpoint).get("threshold")
            self.threshold = math.nan if threshold is None else float(threshold)
            if math.isnan(self.threshold):
                warnings.warn(
                    f"{self.checkpoint}: the model has no operating point; {', '.join(self.names)} are NaN",
                    stacklevel=2,
                )
        super().started(engine)

    def completed(self, engine: Engine, name: str) -> None:
        """Write every figure as ``<prefix>_<figure>`` (``name`` is the first of :attr:`names`)."""
        for figure, value in self.compute().items():
            engine.state.metrics[f"{self.prefix}_{figure}"] = value
