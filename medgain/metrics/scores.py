"""Conversions from network outputs to the per-sample scores and labels the metrics consume."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["binary_labels", "decisions_and_labels", "output_items", "positive_probability", "stack_output"]


def positive_probability(logits: torch.Tensor) -> torch.Tensor:
    """Probability that a sample is ill, shape (B,).

    A single logit: its sigmoid. Several classes (class 0 = healthy): 1 - softmax probability of class 0.
    """
    logits = logits.detach().reshape(logits.shape[0], -1).float()
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    return 1.0 - torch.softmax(logits, dim=1)[:, 0]


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


def decisions_and_labels(output: Any, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Output transform for accuracy-type metrics: ``(ill decision at threshold (B,), ill/healthy label (B,))``."""
    logits, labels = stack_output(output, ("pred", "label"))
    return (positive_probability(logits) >= threshold).long(), binary_labels(labels)
