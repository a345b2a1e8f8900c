"""The set of metrics a clinical team reviews, attached to one evaluator (validation or test)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ignite.metrics import Accuracy, Metric

from medgain.handlers.attention_in_mask import AttentionInMask
from medgain.handlers.attention_iou import AttentionIoU
from medgain.handlers.attention_outside_fov import AttentionOutsideFOV
from medgain.handlers.auc import AUC
from medgain.handlers.operating_point import OperatingPointMetrics
from medgain.handlers.tpr_at_fpr import TPRAtFPR
from medgain.metrics.scores import decisions_and_labels

if TYPE_CHECKING:
    from ignite.engine import Engine

    from medgain.attention_fov import FieldOfView

__all__ = ["ClassificationMetrics"]

#: the false-alarm budgets of the TPR-at-FPR figures
MAX_FPRS = (0.001, 0.0005)


class ClassificationMetrics:
    """Sensitivity at 0.1 % and 0.05 % false alarms, AUC, attention IoU, attention in mask and accuracy.

    Names are ``<prefix>_tpr_at_fpr_0.001``, ``<prefix>_tpr_at_fpr_0.0005`` (the TPR handlers also write the
    finite ``<name>_threshold``), ``<prefix>_auc``, ``<prefix>_iou``, ``<prefix>_attention_in_mask`` and
    ``<prefix>_accuracy`` (at a log-odds of 0, i.e. p = 0.5).

    With ``checkpoint`` (evaluating a trained model) the headline figures are taken at the model's stored
    operating point, never re-tuned on the evaluated split: ``<prefix>_sensitivity``, ``<prefix>_specificity``,
    ``<prefix>_false_alarms``, ``<prefix>_false_alarms_per_1000`` and ``<prefix>_accuracy``
    (:class:`~medgain.handlers.operating_point.OperatingPointMetrics`); the TPR-at-FPR figures re-tuned on this
    split are kept under the separate names ``<prefix>_retuned_tpr_at_fpr_<budget>``.

    Every round it also records in ``engine.state.metric_notes`` (name → text) why a TPR-at-FPR figure cannot
    mean what its name says: a budget that allows no single false alarm on this many negatives.

    The evaluator is given no MONAI ``key_val_metric``: the best model is judged by
    :class:`~medgain.handlers.best_checkpoint.BestModelSaver`, which also says so in the log.

    Args:
        prefix: name prefix, e.g. "val" or "test".
        checkpoint: model file whose operating point the headline figures use; None on validation rounds.
        fov: with it, also ``<prefix>_attention_outside_fov``, the mean fraction of the Grad-CAM mass outside the
            frames' field of view (:class:`~medgain.handlers.attention_outside_fov.AttentionOutsideFOV`).
    """

    def __init__(self, prefix: str = "val", checkpoint: str | None = None, fov: FieldOfView | None = None) -> None:
        self.prefix = prefix
        self.checkpoint = checkpoint
        tpr_name = f"{prefix}_retuned_tpr_at_fpr" if checkpoint is not None else f"{prefix}_tpr_at_fpr"
        self.tpr_names = {f"{tpr_name}_{max_fpr:g}": max_fpr for max_fpr in MAX_FPRS}
        self.metrics: dict[str, Metric] = {name: TPRAtFPR(max_fpr=f) for name, f in self.tpr_names.items()}
        self.metrics |= {
            f"{prefix}_auc": AUC(),
            f"{prefix}_iou": AttentionIoU(),
            f"{prefix}_attention_in_mask": AttentionInMask(),
        }
        if fov is not None:
            self.metrics[f"{prefix}_attention_outside_fov"] = AttentionOutsideFOV(fov)
        if checkpoint is None:
            self.metrics[f"{prefix}_accuracy"] = Accuracy(output_transform=decisions_and_labels)
        else:
            at_point = OperatingPointMetrics(prefix, checkpoint=checkpoint)
            self.metrics[at_point.names[0]] = at_point

    @property
    def names(self) -> list[str]:
        """Every metric name written (thresholds and notes aside)."""
        names = [n for n in self.metrics if not isinstance(self.metrics[n], OperatingPointMetrics)]
        for metric in self.metrics.values():
            if isinstance(metric, OperatingPointMetrics):
                names += metric.names
        return names

    def attach(self, engine: Engine) -> None:
        """Attach every metric to ``engine`` under its name, and the false-alarm-budget notes."""
        from ignite.engine import Events

        for name, metric in self.metrics.items():
            metric.attach(engine, name)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write_notes)

    def write_notes(self, engine: Engine) -> None:
        """Record in ``engine.state.metric_notes`` the budgets this round's negatives cannot resolve."""
        from medgain.metrics.roc import fpr_budget_note

        notes = getattr(engine.state, "metric_notes", None) or {}
        for name, max_fpr in self.tpr_names.items():
            details = getattr(engine.state, "metric_details", {}).get(name)
            if details is None or len(details) < 2:
                continue
            labels = details[1]
            n_neg = int((labels.reshape(-1) == 0).sum())
            note = fpr_budget_note(n_neg, max_fpr) if not math.isnan(engine.state.metrics.get(name, math.nan)) else None
            if note is None:
                notes.pop(name, None)
            else:
                notes[name] = note
        engine.state.metric_notes = notes
