"""Conversions from network outputs to the per-sample scores and labels the metrics consume."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "binary_labels",
    "decisions_and_labels",
    "output_items",
    "positive_probability",
    "positive_score",
    "score_to_probability",
    "stack_output",
]


def positive_score(logits: torch.Tensor) -> torch.Tensor:
    """Log-odds that a sample is ill, float64, shape (B,): the score medgain ranks and thresholds.

    A single logit: the logit itself. Several classes (class 0 = healthy): ``logsumexp(z[1:]) - z[0]``, i.e.
    ``log(p_ill / p_healthy)``. Unlike a probability it does not saturate: two frames whose probabilities are both
    1.0 in float32 (logit margins of 18 and 30) keep distinct scores, so rankings, ROC curves and thresholds at
    very low false-alarm rates stay exact.
    """
    logits = logits.detach().reshape(logits.shape[0], -1).double()
    if logits.shape[1] == 1:
        return logits[:, 0]
    return torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]


def score_to_probability(score: torch.Tensor | float) -> torch.Tensor:
    """Probability of being ill for display, from a :func:`positive_score` (float64 sigmoid)."""
    return torch.sigmoid(torch.as_tensor(score, dtype=torch.float64))


def positive_probability(logits: torch.Tensor) -> torch.Tensor:
    """Probability that a sample is ill, float64, shape (B,), for display only (rank and threshold with
    :func:`positive_score`: probabilities of confident frames round to 1.0 and tie)."""
    return score_to_probability(positive_score(logits))


def binary_labels(labels: torch.Tensor) -> torch.Tensor:
    """Ill (1) / healthy (0) per sample from class indices (B,), (B, 1) or one-hot (B, C) labels."""
    labels = torch.as_tensor(labels).detach().reshape(labels.shape[0], -1)
    if labels.shape[1] > 1:
        labels = labels.argmax(1, keepdim=True)
    return (labels[:, 0] != 0).long()


def stack_output(output: Any, keys: Sequence[str]) -> list[torch.Tensor]:
    """Batched tensors for ``keys`` from an engine output: a dict of batches or a decollated list of dicts."""
    if isinstance(output, list):
        return [torch.stack([torch.as_tensor(item[k]) for item in output]) for k in keys]
    return [torch.as_tensor(output[k]) for k in keys]


def output_items(output: Any, keys: Sequence[str], owner: str, hint: str = "") -> list[dict]:
    """The per-sample view of an engine output (a dict of batches becomes a one-item list), after checking that
    it holds ``keys``.

    Raises:
        KeyError: naming ``owner``, the missing keys, the available ones and ``hint``.
    """
    items = output if isinstance(output, list) else [output]
    available = set(items[0].keys()) if items else set()
    missing = [k for k in keys if k not in available]
    if missing:
        raise KeyError(f"{owner}: engine output has no {missing} (available: {sorted(available)}){hint}")
    return items


def decisions_and_labels(output: Any, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Output transform for accuracy-type metrics: ``(ill decision (B,), ill/healthy label (B,))``; the decision
    is ``positive_score >= threshold`` (log-odds; 0 is a probability of 0.5)."""
    logits, labels = stack_output(output, ("pred", "label"))
    return (positive_score(logits) >= threshold).long(), binary_labels(labels)
