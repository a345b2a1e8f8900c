"""medgain.metrics: classification scores, TPR at a low false-alarm rate and attention localisation."""

from medgain.metrics.localization import (
    AttentionInMaskMetric,
    AttentionIoUMetric,
    attention_in_mask,
    attention_inputs,
    attention_iou,
)
from medgain.metrics.roc import TPRAtFPRMetric, operating_point, roc_curve, scores_and_labels, tpr_at_fpr
from medgain.metrics.scores import binary_labels, decisions_and_labels, positive_probability, stack_output

__all__ = [
    "AttentionInMaskMetric",
    "AttentionIoUMetric",
    "TPRAtFPRMetric",
    "attention_in_mask",
    "attention_inputs",
    "attention_iou",
    "binary_labels",
    "decisions_and_labels",
    "operating_point",
    "positive_probability",
    "roc_curve",
    "scores_and_labels",
    "stack_output",
    "tpr_at_fpr",
]
