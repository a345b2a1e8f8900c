"""Evaluator-side Grad-CAM: logits and attention maps from one forward, even under ``torch.no_grad``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from torch import nn

from medgain.attention import grad_cam

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["GradCamInferer"]


class GradCamInferer(Inferer):
    """A MONAI inferer that returns the logits and keeps the Grad-CAM of the same forward.

    MONAI evaluators run the inferer under ``torch.no_grad``; this one enables gradients locally so that the
    attention is measured on every validation round without a second forward. Once attached to the evaluator,
    each iteration's ``engine.state.output`` also holds ``cam_key`` (B, 1, H, W, raw Grad-CAM, detached) and the
    batch entries named in ``batch_keys`` (e.g. lesion masks), moved to the output's device, for the
    localisation metrics and the attention-overlay artifacts. Models with further inputs (image + metadata)
    get them from the evaluator's ``prepare_batch`` (``monai.engines.PrepareBatchExtraInput``).

    Args:
        target_layer: ``named_modules()`` name of the Grad-CAM layer.
        class_index: class to explain for every sample (e.g. 1, the lesion class); None explains the prediction.
        cam_key: output key of the attention maps.
        batch_keys: batch keys copied into the output when present.
    """

    def __init__(
        self,
        target_layer: str,
        class_index: int | None = None,
        cam_key: str = "cam",
        batch_keys: Sequence[str] = ("mask", "has_mask"),
    ) -> None:
        super().__init__()
        self.target_layer = target_layer
        self.class_index = class_index
        self.cam_key = cam_key
        self.batch_keys = tuple(batch_keys)
        self.last_cam: torch.Tensor | None = None

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Forward ``inputs`` (and the extra model inputs ``args`` / ``kwargs`` that MONAI's
        ``PrepareBatchExtraInput`` gives, e.g. metadata); returns detached logits and stores the cam in
        ``last_cam``."""
        logits, cam = grad_cam(
            network, inputs, self.target_layer, self.class_index, forward_args=args, forward_kwargs=kwargs
        )
        self.last_cam = cam.detach()
        return logits.detach()

    def attach(self, engine: Engine) -> None:
        """Copy the cam (and ``batch_keys``) into ``engine.state.output`` after each forward."""
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._publish)

    def _publish(self, engine: Engine) -> None:
        output = engine.state.output
        device = output["pred"].device
        output[self.cam_key] = self.last_cam
        self.last_cam = None
        batch = engine.state.batch
        if isinstance(batch, Mapping):
            for key in self.batch_keys:
                if key in batch:
                    value = batch[key]
                    output[key] = value.to(device) if isinstance(value, torch.Tensor) else value
