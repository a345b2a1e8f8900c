"""Test-time augmentation with attention: logits and Grad-CAM averaged over flips / 90° rotations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from medgain.attention import grad_cam
from medgain.handlers.cam_inferer import GradCamInferer

__all__ = ["DIHEDRAL_VIEWS", "TTAGradCamInferer", "average_over_views", "check_num_views"]

#: the views of the dihedral group in the order they are used: (quarter turns, horizontal flip after the turns).
DIHEDRAL_VIEWS: tuple[tuple[int, bool], ...] = (
    (0, False),  # identity
    (0, True),  # horizontal flip
    (2, True),  # vertical flip
    (2, False),  # 180°
    (1, False),  # 90°
    (3, False),  # 270°
    (1, True),  # transpose
    (3, True),  # anti-transpose
)


def _view(images: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    out = torch.rot90(images, turns, dims=(-2, -1)) if turns else images
    return torch.flip(out, dims=(-1,)) if flip else out


def _unview(maps: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    out = torch.flip(maps, dims=(-1,)) if flip else maps
    return torch.rot90(out, -turns, dims=(-2, -1)) if turns else out


def check_num_views(owner: str, num_views: int) -> int:
    """``num_views`` as an int, or a ValueError naming ``owner`` when it is not 1 to 8."""
    if not 1 <= int(num_views) <= len(DIHEDRAL_VIEWS):
        raise ValueError(f"{owner}: num_views must be 1 to {len(DIHEDRAL_VIEWS)}, got {num_views}")
    return int(num_views)


def average_over_views(
    owner: str,
    inputs: torch.Tensor,
    num_views: int,
    explain: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean logits and mean attention map over the first ``num_views`` of :data:`DIHEDRAL_VIEWS`.

    Args:
        owner: the caller's name, for the error message.
        inputs: (B, C, H, W) images.
        num_views: views averaged; 90° turns (views 5 to 8) need square inputs.
        explain: one view's images -> (logits, attention maps on that view's grid).

    Returns:
        the detached float mean logits and the mean of the maps turned back onto the original image grid.

    Raises:
        ValueError: when the views include 90° turns and the inputs are not square.
    """
    views = DIHEDRAL_VIEWS[:num_views]
    if inputs.shape[-1] != inputs.shape[-2] and any(turns % 2 for turns, _ in views):
        raise ValueError(
            f"{owner}: {num_views} views include 90° turns, which need square inputs; got "
            f"{tuple(inputs.shape[-2:])} (use num_views <= 4)"
        )
    logits_sum: torch.Tensor | None = None
    cam_sum: torch.Tensor | None = None
    for turns, flip in views:
        logits, cam = explain(_view(inputs, turns, flip))
        logits, cam = logits.detach().float(), _unview(cam.detach(), turns, flip)
        logits_sum = logits if logits_sum is None else logits_sum + logits
        cam_sum = cam if cam_sum is None else cam_sum + cam
    assert logits_sum is not None and cam_sum is not None
    return logits_sum / len(views), cam_sum / len(views)


class TTAGradCamInferer(GradCamInferer):
    """A :class:`GradCamInferer` that averages over ``num_views`` views of each image.

    The views are the first ``num_views`` of :data:`DIHEDRAL_VIEWS` (identity, horizontal flip, vertical flip,
    180°, 90°, 270°, the two transposes); 90° turns need square inputs. The logits of the views are averaged
    (a mean of log-odds for a binary classifier), and so are their Grad-CAM maps after each is turned back onto
    the original image grid. Extra model inputs (metadata) are passed unchanged to every view. Under
    ``torch.no_grad`` every view costs about one inference forward.

    Args:
        target_layer: ``named_modules()`` name of the Grad-CAM layer.
        num_views: views averaged, 1 (no augmentation) to 8.
        class_index: class to explain for every sample; None explains the prediction of each view.
        cam_key: output key of the attention maps.
        batch_keys: batch keys copied into the output when present.
    """

    def __init__(
        self,
        target_layer: str,
        num_views: int = 4,
        class_index: int | None = None,
        cam_key: str = "cam",
        batch_keys: tuple[str, ...] = ("mask", "has_mask"),
    ) -> None:
        super().__init__(target_layer, class_index, cam_key, batch_keys)
        self.num_views = check_num_views("TTAGradCamInferer", num_views)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Mean logits of the views (detached); the mean cam is kept in ``last_cam``."""

        def explain(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return grad_cam(network, view, self.target_layer, self.class_index, forward_args=args,
                            forward_kwargs=kwargs)

        logits, self.last_cam = average_over_views("TTAGradCamInferer", inputs, self.num_views, explain)
        return logits
