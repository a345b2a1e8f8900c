"""Rendering helpers shared by the artifact handlers: images and Grad-CAM maps as RGB pictures."""

from __future__ import annotations

import matplotlib
import numpy as np
import torch
from monai.utils import convert_to_numpy

__all__ = ["cam_overlay", "colorize", "to_display_rgb"]


def to_display_rgb(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """An image as (H, W, 3) float32 RGB in [0, 1] for display.

    Images already in [0, 1] (as the medgain loaders produce them) are shown as they are; any other range
    (e.g. after intensity normalisation) is min-max scaled per image.

    Args:
        image: (C, H, W) with C = 1 (grey) or 3 (RGB), or (H, W).

    Raises:
        ValueError: for another shape.
    """
    arr = np.asarray(convert_to_numpy(image), dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise ValueError(f"to_display_rgb: expected a (1 or 3, H, W) or (H, W) image, got shape {arr.shape}")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        arr = (arr - lo) / max(hi - lo, 1e-8)
    return np.ascontiguousarray(np.repeat(arr, 3 // arr.shape[0], axis=0).transpose(1, 2, 0))


def colorize(cam: np.ndarray | torch.Tensor, cmap: str = "jet") -> np.ndarray:
    """Colour a normalised attention map with a matplotlib colour map.

    Args:
        cam: (H, W) or (1, H, W) map in [0, 1] (values outside are clipped).
        cmap: name of a matplotlib colour map.

    Returns:
        (H, W, 3) float32 RGB in [0, 1].
    """
    arr = np.asarray(convert_to_numpy(cam), dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"colorize: expected a (H, W) or (1, H, W) map, got shape {arr.shape}")
    return matplotlib.colormaps[cmap](np.clip(arr, 0.0, 1.0))[..., :3].astype(np.float32)


def cam_overlay(
    image: np.ndarray | torch.Tensor, cam: np.ndarray | torch.Tensor, alpha: float = 0.5, cmap: str = "jet"
) -> np.ndarray:
    """Alpha blend of a coloured attention map over its image: ``(1 - alpha) * image + alpha * colour(cam)``.

    Args:
        image: (C, H, W) image, C = 1 or 3 (see :func:`to_display_rgb`).
        cam: (H, W) or (1, H, W) normalised attention map in [0, 1], the image's spatial size.
        alpha: weight of the coloured map, in [0, 1].
        cmap: name of a matplotlib colour map.

    Returns:
        (H, W, 3) uint8 RGB picture.

    Raises:
        ValueError: when the map and the image sizes differ or ``alpha`` is outside [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"cam_overlay: alpha must be in [0, 1], got {alpha}")
    rgb = to_display_rgb(image)
    colour = colorize(cam, cmap)
    if colour.shape != rgb.shape:
        raise ValueError(f"cam_overlay: map of size {colour.shape[:2]} for an image of size {rgb.shape[:2]}")
    blend = (1.0 - alpha) * rgb + alpha * colour
    return np.round(np.clip(blend, 0.0, 1.0) * 255.0).astype(np.uint8)
