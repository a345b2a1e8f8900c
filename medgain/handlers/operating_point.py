"""Ignite metric: sensitivity, specificity and false alarms at the operating point that ships with the model."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from ignite.metrics import Metric

from medgain.metrics.confidence import format_percent_upper
from medgain.metrics.roc import scores_and_labels
from medgain.model_file import load_operating_point

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["OperatingPointMetrics"]

logger = logging.getLogger(__name__)

#: the figures written, as ``<prefix>_<name>``
FIGURES = (
    "sensitivity", "specificity", "false_alarms", "false_alarms_per_1000", "accuracy", "fpr_upper", "fpr_above_bound"
)


def _backed(point: Mapping[str, Any]) -> bool:
    """Whether the stored bound of the false-alarm rate is known and within the point's budget."""
    upper, budget = point.get("fpr_upper"), point.get("max_fpr")
    return upper is not None and budget is not None and float(upper) <= float(budget)


class OperatingPointMetrics(Metric):
    """Confusion counts at a fixed, stored threshold, never re-tuned on the data it is measured on.

    At ``Events.EPOCH_COMPLETED`` it writes ``<prefix>_sensitivity``, ``<prefix>_specificity``,
    ``<prefix>_false_alarms`` (count of healthy samples flagged), ``<prefix>_false_alarms_per_1000`` (per 1,000
    healthy samples) and ``<prefix>_accuracy`` to ``engine.state.metrics``. The threshold is on the log-odds of
    being ill (:func:`~medgain.metrics.scores.positive_score`): ``threshold`` as given, or the operating point of
    ``checkpoint`` read when the engine starts. A checkpoint without an operating point gives NaN figures with a
    warning; a rate without samples of its class is NaN.

    It also compares the false-alarm rate measured here with what the stored point was known to be worth:
    ``<prefix>_fpr_upper`` is the point's upper bound (``fpr_upper``, see
    :class:`~medgain.handlers.best_checkpoint.BestModelSaver`; NaN when the model file predates it or a bare
    ``threshold`` was given) and ``<prefix>_fpr_above_bound`` is 1.0 when the measured rate exceeds it (logged as a
    warning), 0.0 when not, NaN when either is unknown. ``engine.state.metric_notes`` receives the point's
    statement under ``<prefix>_fpr_upper`` when its bound is unknown or exceeds its budget, and the finding under
    ``<prefix>_fpr_above_bound``.

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
        self.point: dict[str, Any] = {}
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

        upper = self.point.get("fpr_upper")
        upper = math.nan if upper is None else float(upper)
        fpr = ratio(fp, fp + tn)
        return {
            "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp),
            "false_alarms": float(fp),
            "false_alarms_per_1000": 1000.0 * fpr,
            "accuracy": ratio(tp + tn, tp + fn + fp + tn),
            "fpr_upper": upper,
            "fpr_above_bound": math.nan if math.isnan(fpr) or math.isnan(upper) else float(fpr > upper),
        }

    def started(self, engine: Engine) -> None:
        """Read the checkpoint's threshold, then reset."""
        if self.checkpoint is not None:
            self.point = load_operating_point(self.checkpoint)
            threshold = self.point.get("threshold")
            self.threshold = math.nan if threshold is None else float(threshold)
            if math.isnan(self.threshold):
                warnings.warn(
                    f"{self.checkpoint}: the model has no operating point; {', '.join(self.names)} are NaN",
                    stacklevel=2,
                )
        super().started(engine)

    def completed(self, engine: Engine, name: str) -> None:
        """Write every figure as ``<prefix>_<figure>`` (``name`` is the first of :attr:`names`) and the notes on
        the stored point's bound."""
        figures = self.compute()
        for figure, value in figures.items():
            engine.state.metrics[f"{self.prefix}_{figure}"] = value
        notes = dict(getattr(engine.state, "metric_notes", None) or {})
        bound_name, flag_name = f"{self.prefix}_fpr_upper", f"{self.prefix}_fpr_above_bound"
        notes.pop(flag_name, None)
        notes.pop(bound_name, None)
        if self.point.get("threshold") is not None and not _backed(self.point):
            notes[bound_name] = f"stored operating point {self.point['statement']}"
        if figures["fpr_above_bound"] == 1.0:
            tp, fn, fp, tn = (int(v) for v in self.counts)
            notes[flag_name] = (
                f"the {self.prefix} false-alarm rate at the stored threshold, {fp:,} of {fp + tn:,} "
                f"({100.0 * fp / (fp + tn):.1f} %), is above the bound the operating point was stored with "
                f"(≤ {format_percent_upper(figures['fpr_upper'])}): the threshold does not hold on this data"
            )
            logger.warning("%s: %s", self.checkpoint, notes[flag_name])
        engine.state.metric_notes = notes
