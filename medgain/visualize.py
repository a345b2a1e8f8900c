"""Rendering helpers shared by the artifact handlers: images and Grad-CAM maps as RGB pictures."""

from __future__ import annotations

import matplotlib
import matplotlib.font_manager
import numpy as np
import torch
from monai.utils import convert_to_numpy

from medgain.metrics.scores import score_to_probability

__all__ = ["cam_overlay", "colorize", "decision_words", "heatmap_panel", "to_display_rgb"]


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


def decision_words(score: float, threshold: float | None) -> str:
    """p(ill) against the threshold and the decision, e.g. ``"p 0.97 < 0.9987 → healthy"``.

    Both numbers get as many digits (4 to 8 significant) as it takes to tell them apart.

    Args:
        score: the frame's log-odds of being ill.
        threshold: the operating point's log-odds threshold (ill when ``score >= threshold``), or None.

    Returns:
        one line; ``"p(ill) 0.1523 · no operating point: no decision"`` without a threshold.
    """
    p = float(score_to_probability(score))
    if threshold is None:
        return f"p(ill) {p:.4f} · no operating point: no decision"
    t = float(score_to_probability(threshold))
    digits = 4
    while digits < 8 and f"{p:.{digits}g}" == f"{t:.{digits}g}":
        digits += 1
    ill = score >= threshold
    return f"p {p:.{digits}g} {'≥' if ill else '<'} {t:.{digits}g} → {'ILL' if ill else 'healthy'}"


def heatmap_panel(overlay: np.ndarray, top: str, caption: str, cmap: str = "jet", min_height: int = 256) -> np.ndarray:
    """An overlay picture that explains itself: the overlay (enlarged, nearest, to at least ``min_height`` rows),
    a colour bar on its right labelled ``0`` and ``top``, and ``caption`` (one or more lines) under both.

    Args:
        overlay: (H, W, 3) uint8 RGB, e.g. from :func:`cam_overlay`.
        top: the label of the colour bar's top (the value shown at the top colour).
        caption: text under the picture; lines separated by ``"\\n"``.
        cmap: the overlay's matplotlib colour map.
        min_height: least height of the enlarged overlay in pixels.

    Returns:
        (H', W', 3) uint8 RGB.
    """
    from PIL import Image, ImageDraw, ImageFont

    factor = max(1, -(-min_height // overlay.shape[0]))
    picture = Image.fromarray(overlay).resize((overlay.shape[1] * factor, overlay.shape[0] * factor),
                                              Image.Resampling.NEAREST)
    font = ImageFont.truetype(matplotlib.font_manager.findfont("DejaVu Sans"), 13)  # matplotlib's: has → and ≥
    lines = caption.split("\n")
    bar_w, label_w, pad, line_h = 14, 8 + max(font.getbbox(s)[2] for s in ("0", top)), 6, 17
    width = max(picture.width + pad + bar_w + label_w, max(font.getbbox(s)[2] for s in lines) + 2 * pad)
    canvas = Image.new("RGB", (width, picture.height + pad + line_h * len(lines) + pad), "white")
    canvas.paste(picture, (0, 0))
    ramp = colorize(np.linspace(1.0, 0.0, picture.height)[:, None].repeat(bar_w, 1), cmap)
    canvas.paste(Image.fromarray(np.round(ramp * 255).astype(np.uint8)), (picture.width + pad, 0))
    draw = ImageDraw.Draw(canvas)
    x = picture.width + pad + bar_w + 4
    draw.text((x, 0), top, fill="black", font=font)
    draw.text((x, picture.height - line_h), "0", fill="black", font=font)
    for i, line in enumerate(lines):
        draw.text((pad, picture.height + pad + i * line_h), line, fill="black", font=font)
    return np.asarray(canvas)
