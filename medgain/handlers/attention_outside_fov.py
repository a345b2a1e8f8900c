"""Ignite metric: the mean fraction of the attention mass that falls outside the frames' field of view."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from medgain.attention_fov import FieldOfView, attention_outside_fov
from medgain.handlers.utils import require_keys
from medgain.metrics.scores import stack_output

__all__ = ["AttentionOutsideFOV"]


class AttentionOutsideFOV(Metric):
    """Mean over every frame of ``sum(cam outside the field of view) / sum(cam)``
    (:func:`medgain.attention_fov.attention_outside_fov`); NaN when no frame was seen.

    A high value means the model's Grad-CAM sits on the dark border, where no tissue is: an artefact, not a
    finding.

    Args:
        fov: finds each frame's field of view.
        cam_key: output key of the raw Grad-CAM maps (B, 1, H, W), at the image size.
        output_transform: turns ``engine.state.output`` into ``(image, cam)``; None reads ``image`` and
            ``cam_key`` from the evaluator output.
    """

    def __init__(
        self, fov: FieldOfView, cam_key: str = "cam", output_transform: Callable[[Any], Any] | None = None
    ) -> None:
        self.fov = fov
        self.cam_key = cam_key
        super().__init__(output_transform=output_transform or self._image_and_cam)

    def _image_and_cam(self, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        require_keys(output, ("image", self.cam_key), "AttentionOutsideFOV (needs GradCamInferer)")
        image, cam = stack_output(output, ("image", self.cam_key))
        return image, cam

    @reinit__is_reduced
    def reset(self) -> None:
        """Forget the frames of the previous round."""
        self._sum = torch.tensor(0.0, dtype=torch.float64)
        self._count = torch.tensor(0, dtype=torch.int64)

    @reinit__is_reduced
    def update(self, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Add a batch given as ``(image, cam)``: (B, C, H, W) frames and their (B, 1, H, W) raw Grad-CAM."""
        image, cam = output
        fraction = attention_outside_fov(cam, self.fov(image))
        self._sum += fraction.double().sum().cpu()
        self._count += fraction.numel()

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        """The mean fraction over the frames seen, NaN when none."""
        count = int(self._count)
        return math.nan if count == 0 else float(self._sum) / count
