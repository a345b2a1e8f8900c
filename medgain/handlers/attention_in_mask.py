"""Ignite handler: fraction of the attention energy that falls inside the lesion mask."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from ignite.metrics.metric import reinit__is_reduced
from monai.handlers import IgniteMetricHandler

from medgain.metrics.localization import AttentionInMaskMetric, attention_inputs

__all__ = ["AttentionInMask"]


class AttentionInMask(IgniteMetricHandler):
    """Mean ``sum(cam * mask) / sum(cam)`` of the raw Grad-CAM over the ill samples with a real lesion mask.

    NaN with a warning when an epoch has no such sample.

    Args:
        output_transform: callable turning ``engine.state.output`` into ``(cam, mask, include)``; the default
            reads the ``GradCamInferer`` output (see :func:`medgain.metrics.localization.attention_inputs`).
    """

    def __init__(self, output_transform: Callable = attention_inputs) -> None:
        super().__init__(metric_fn=AttentionInMaskMetric(), output_transform=output_transform, save_details=False)

    @reinit__is_reduced
    def update(self, output: Sequence[torch.Tensor]) -> None:
        """Add a batch given as ``(cam, mask, include)``."""
        cam, mask, include = output
        self.metric_fn(cam, mask, include=include)
