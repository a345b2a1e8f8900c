"""The set of metric handlers a clinical team reviews, named for one evaluator (validation or test)."""

from __future__ import annotations

from ignite.metrics import Accuracy, Metric

from medgain.handlers.attention_in_mask import AttentionInMask
from medgain.handlers.attention_iou import AttentionIoU
from medgain.handlers.auc import AUC
from medgain.handlers.tpr_at_fpr import TPRAtFPR
from medgain.metrics.scores import decisions_and_labels

__all__ = ["classification_metrics"]


def classification_metrics(prefix: str = "val", key_metric: str | None = None) -> tuple[dict[str, Metric], dict[str, Metric]]:
    """Sensitivity at 0.1 % and 0.05 % false alarms, AUC, attention IoU, attention in mask and accuracy.

    Returned as ``(key_val_metric, additional_metrics)`` for a MONAI ``SupervisedEvaluator``; names are
    ``<prefix>_tpr_at_fpr_0.001``, ``<prefix>_tpr_at_fpr_0.0005``, ``<prefix>_auc``, ``<prefix>_iou``,
    ``<prefix>_attention_in_mask`` and ``<prefix>_accuracy`` (the TPR handlers also write ``<name>_threshold``).

    Args:
        prefix: name prefix, e.g. "val" or "test".
        key_metric: the evaluator's key metric (its best value is tracked); default ``<prefix>_tpr_at_fpr_0.001``.

    Raises:
        ValueError: when ``key_metric`` is not one of the names.
    """
    metrics: dict[str, Metric] = {
        f"{prefix}_tpr_at_fpr_0.001": TPRAtFPR(max_fpr=0.001),
        f"{prefix}_tpr_at_fpr_0.0005": TPRAtFPR(max_fpr=0.0005),
        f"{prefix}_auc": AUC(),
        f"{prefix}_iou": AttentionIoU(),
        f"{prefix}_attention_in_mask": AttentionInMask(),
        f"{prefix}_accuracy": Accuracy(output_transform=decisions_and_labels),
    }
    key = key_metric or f"{prefix}_tpr_at_fpr_0.001"
    if key not in metrics:
        raise ValueError(f"key_metric {key!r} is not one of {sorted(metrics)}")
    return {key: metrics.pop(key)}, metrics
