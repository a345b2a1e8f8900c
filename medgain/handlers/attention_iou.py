"""Ignite handler: IoU of the attended region with the lesion mask."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from ignite.metrics.metric import reinit__is_reduced
from monai.handlers import IgniteMetricHandler

from medgain.metrics.localization import AttentionIoUMetric, attention_inputs

__all__ = ["AttentionIoU"]


class AttentionIoU(IgniteMetricHandler):
    """Mean IoU of ``normalize_cam(cam) >= threshold`` with the lesion mask over the ill samples with a real mask.

    NaN with a warning when an epoch has no such sample.

    Args:
        threshold: level of the normalised cam above which a pixel counts as attended.
        output_transform: callable turning ``engine.state.output`` into ``(cam, mask, include)``; the default
            reads the ``GradCamInferer`` output (see :func:`medgain.metrics.localization.attention_inputs`).
    """

    def __init__(self, threshold: float = 0.5, output_transform: Callable = attention_inputs) -> None:
        super().__init__(
            metric_fn=AttentionIoUMetric(threshold), output_transform=output_transform, save_details=False
        )

    @reinit__is_reduced
    def update(self, output: Sequence[torch.Tensor]) -> None:
        """Add a batch given as ``(cam, mask, include)``."""
        cam, mask, include = output
        self.metric_fn(cam, mask, include=include)
