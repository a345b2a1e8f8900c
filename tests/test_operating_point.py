"""The operating point a clinician acts on: ranked in a space that does not saturate, finite, never re-tuned."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from sklearn.metrics import roc_curve as sk_roc_curve

from medgain.handlers import OperatingPointMetrics
from medgain.metrics import (
    fpr_budget_note,
    min_negatives,
    positive_probability,
    positive_score,
    scores_and_labels,
    tpr_at_fpr,
)


def _confident_study(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """4,000 negatives (5 lesion-like at logit margins 18-20) and 200 positives, most of them very confident."""
    rng = np.random.default_rng(seed)
    neg = rng.normal(-4.0, 2.0, 4000)
    neg[:5] = [18.0, 18.5, 19.0, 19.5, 20.0]
    pos = np.concatenate([rng.uniform(17.0, 40.0, 150), rng.normal(2.0, 3.0, 50)])
    margins = np.concatenate([neg, pos])
    logits = torch.tensor(np.stack([np.zeros_like(margins), margins], 1), dtype=torch.float32)
    labels = torch.tensor([0] * 4000 + [1] * 200)
    return logits, labels


def _sklearn_tpr(scores: np.ndarray, labels: np.ndarray, max_fpr: float) -> float:
    fpr, tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max())


def test_scores_do_not_saturate_so_the_low_false_alarm_operating_point_exists() -> None:
    logits, labels = _confident_study()
    saturated = 1.0 - torch.softmax(logits, 1)[:, 0]  # float32 probabilities: every margin above ~17 is 1.0
    assert tpr_at_fpr(saturated, labels, 0.001) == (0.0, math.inf)  # what ranking by probability gave
    scores, ill = scores_and_labels({"pred": logits, "label": labels})
    assert scores.dtype == torch.float64
    margins = (logits[:, 1] - logits[:, 0]).double()
    torch.testing.assert_close(scores, margins)  # two-class log-odds = the logit margin, exactly
    torch.testing.assert_close(positive_probability(logits), torch.sigmoid(margins))  # for display only
    for max_fpr in (0.0005, 0.001):
        tpr, threshold = tpr_at_fpr(scores, ill, max_fpr)
        assert tpr == pytest.approx(_sklearn_tpr(margins.numpy(), labels.numpy(), max_fpr)) and tpr > 0.6
        assert math.isfinite(threshold)
    # more than two classes: log(p_ill / p_healthy) = logsumexp(z[1:]) - z[0], stable at large margins
    three = torch.tensor([[0.0, 30.0, 25.0], [0.0, -1.0, -2.0]])
    expected = torch.logsumexp(three[:, 1:].double(), 1) - three[:, 0].double()
    torch.testing.assert_close(positive_score(three), expected)
    single = torch.tensor([[35.0], [36.0]])
    assert positive_score(single).tolist() == [35.0, 36.0]  # a single logit is its own log-odds


def test_false_alarm_budgets_say_when_the_split_is_too_small() -> None:
    assert min_negatives(0.001) == 1000 and min_negatives(0.0005) == 2000
    assert fpr_budget_note(1000, 0.001) is None
    assert "only 98 negatives" in fpr_budget_note(98, 0.001) and ">= 1000" in fpr_budget_note(98, 0.001)
    with pytest.raises(ValueError, match="max_fpr"):
        min_negatives(0.0)


def _run(metric: OperatingPointMetrics, batches: list[dict]) -> dict:
    engine = Engine(lambda e, batch: batch)
    metric.attach(engine, metric.names[0])
    engine.run(batches, max_epochs=1)
    return engine.state.metrics


def test_operating_point_metrics_count_at_the_fixed_threshold() -> None:
    margins = torch.tensor([3.0, 1.0, -1.0, 2.5, -2.0, 0.5, -3.0, 1.5])
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0])
    logits = torch.stack([torch.zeros(8), margins], 1)
    batches = [{"pred": logits[:5], "label": labels[:5]}, {"pred": logits[5:], "label": labels[5:]}]
    metrics = _run(OperatingPointMetrics("test", threshold=1.0), batches)
    # ill at >= 1.0: TP = 2 (3.0, 1.0), FN = 1; FP = 2 (2.5, 1.5), TN = 3
    assert metrics["test_sensitivity"] == pytest.approx(2 / 3)
    assert metrics["test_specificity"] == pytest.approx(3 / 5)
    assert metrics["test_false_alarms"] == 2 and metrics["test_false_alarms_per_1000"] == pytest.approx(400.0)
    assert metrics["test_accuracy"] == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match="exactly one of checkpoint and threshold"):
        OperatingPointMetrics("test")
