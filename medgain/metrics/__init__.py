"""medgain.metrics: classification scores, TPR at a low false-alarm rate and attention localisation."""

from medgain.metrics.bootstrap import auc_score, bootstrap_auc, oof_auc_summary, weighted_auc
from medgain.metrics.confidence import (
    CONFIDENCE,
    format_percent_upper,
    fpr_upper_bound,
    negatives_needed,
    operating_point_words,
)
from medgain.metrics.froc import CAMELYON_FP_RATES, FROCResult, froc, lesion_regions, slide_auc
from medgain.metrics.localization import (
    AttentionInMaskMetric,
    AttentionIoUMetric,
    attention_in_mask,
    attention_inputs,
    attention_iou,
)
from medgain.metrics.roc import (
    TPRAtFPRMetric,
    fpr_budget_note,
    min_negatives,
    operating_point,
    roc_curve,
    scores_and_labels,
    tpr_at_fpr,
)
from medgain.metrics.scores import (
    binary_labels,
    decisions_and_labels,
    positive_probability,
    positive_score,
    score_to_probability,
    stack_output,
)
from medgain.metrics.unveil import UnveilCounts, equal_area_mask, lesion_instances, unveil_counts, unveil_recall

__all__ = [
    "CONFIDENCE",
    "format_percent_upper",
    "fpr_upper_bound",
    "negatives_needed",
    "operating_point_words",
    "CAMELYON_FP_RATES",
    "FROCResult",
    "froc",
    "lesion_regions",
    "slide_auc",
    "auc_score",
    "bootstrap_auc",
    "oof_auc_summary",
    "weighted_auc",
    "AttentionInMaskMetric",
    "AttentionIoUMetric",
    "TPRAtFPRMetric",
    "attention_in_mask",
    "attention_inputs",
    "attention_iou",
    "binary_labels",
    "decisions_and_labels",
    "operating_point",
    "fpr_budget_note",
    "min_negatives",
    "positive_probability",
    "positive_score",
    "score_to_probability",
    "roc_curve",
    "scores_and_labels",
    "stack_output",
    "tpr_at_fpr",
    "UnveilCounts",
    "equal_area_mask",
    "lesion_instances",
    "unveil_counts",
    "unveil_recall",
]
