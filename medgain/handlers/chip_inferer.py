"""Evaluator-side attention of ChipNet: its softmax chip grid, upsampled to the input size, as the attention map."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medgain.handlers.cam_inferer import GradCamInferer
from medgain.handlers.tta_inferer import average_over_views, check_num_views

__all__ = ["ChipAttentionInferer"]


class ChipAttentionInferer(GradCamInferer):
    """A MONAI inferer for :class:`medgain.networks.ChipNet` that returns the logits and keeps the chip attention.

    The attention is the network's own softmax grid (``forward_with_attention``), not a Grad-CAM: each chip's
    weight is spread over its pixels (nearest-neighbour upsampling to the input height and width), so the
    localisation metrics (attention IoU, attention-in-mask), the overlays and the heatmaps read it like a cam.
    With ``num_views`` > 1 the logits and the grids (turned back onto the original image) are averaged over the
    first views of :data:`medgain.handlers.DIHEDRAL_VIEWS` (test-time augmentation; 90° turns need square inputs).
    Attached to an evaluator it publishes ``cam_key`` and ``batch_keys`` into ``engine.state.output`` as
    :class:`GradCamInferer` does.

    Args:
        num_views: views averaged, 1 (no augmentation) to 8.
        cam_key: output key of the attention maps.
        batch_keys: batch keys copied into the output when present.
    """

    def __init__(
        self, num_views: int = 1, cam_key: str = "cam", batch_keys: Sequence[str] = ("mask", "has_mask")
    ) -> None:
        super().__init__(target_layer="", class_index=None, cam_key=cam_key, batch_keys=batch_keys)
        self.num_views = check_num_views("ChipAttentionInferer", num_views)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Mean logits of the views (detached); the mean upsampled chip attention is kept in ``last_cam``."""
        model = network.module if hasattr(network, "module") else network
        if not hasattr(model, "forward_with_attention"):
            raise TypeError(
                f"ChipAttentionInferer needs a ChipNet (forward_with_attention), got {type(model).__name__}"
            )
        if args or kwargs:
            raise TypeError("ChipAttentionInferer: ChipNet takes the image only; use the default prepare_batch")

        def explain(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, grid = model.forward_with_attention(view)
            return logits, F.interpolate(grid.detach().float(), size=tuple(view.shape[-2:]), mode="nearest")

        logits, self.last_cam = average_over_views("ChipAttentionInferer", inputs, self.num_views, explain)
        return logits
