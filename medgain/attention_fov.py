"""The field of view of a frame (capsule endoscopy: the lit disc inside the dark vignette) and how much of a
Grad-CAM map falls outside it: attention outside the field of view looks at no tissue, it is an artefact to flag
(never to erase: the maps stay what the model computed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

__all__ = ["FieldOfView", "attention_outside_fov", "attention_peak_outside_fov", "fov_display_scale"]


class FieldOfView:
    """Which pixels of a frame show tissue.

    Without ``mask_file`` the field of view is found per frame: a pixel is dark when its brightness (largest
    channel, min-max scaled over the frame) is below ``dark_threshold``; the dark pixels connected to the frame's
    border are the vignette, everything else (dark lumen or lesions inside the disc included) is the field of
    view. A frame without any bright pixel keeps the whole frame. With ``mask_file`` (a PNG, non-zero inside, or a
    ``.npy`` array) the same fixed mask is used for every frame, resized (nearest) to the frame's size.

    Args:
        dark_threshold: brightness, in [0, 1) of the frame's range, below which a pixel can be vignette.
        mask_file: a fixed field-of-view mask instead of the per-frame vignette.

    Raises:
        ValueError: for a threshold outside [0, 1) or an unreadable or empty mask file.
    """

    def __init__(self, dark_threshold: float = 0.1, mask_file: str | None = None) -> None:
        if not 0.0 <= dark_threshold < 1.0:
            raise ValueError(f"FieldOfView: dark_threshold must be in [0, 1), got {dark_threshold}")
        self.dark_threshold = float(dark_threshold)
        self.mask_file = mask_file
        self._mask = None if mask_file is None else _read_mask(Path(mask_file))

    def describe(self) -> str:
        """How the field of view is found, in words (for captions)."""
        if self.mask_file is not None:
            return "field of view: a fixed mask file"
        return f"field of view: the frame minus the dark border (below {self.dark_threshold:g} of its brightness)"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """The field of view of a batch of frames.

        Args:
            image: (B, C, H, W) frames (any intensity range).

        Returns:
            (B, 1, H, W) bool, True inside the field of view, on the frames' device.

        Raises:
            ValueError: for another shape.
        """
        if image.ndim != 4:
            raise ValueError(f"FieldOfView: expected (B, C, H, W) frames, got shape {tuple(image.shape)}")
        b, _, h, w = image.shape
        if self._mask is not None:
            mask = Image.fromarray(self._mask.astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST)
            fixed = torch.from_numpy(np.asarray(mask) > 0)
            return fixed.expand(b, 1, h, w).clone().to(image.device)
        bright = image.detach().float().amax(1).cpu().numpy()
        out = np.ones((b, 1, h, w), dtype=bool)
        for i, frame in enumerate(bright):
            lo, hi = float(frame.min()), float(frame.max())
            if hi <= lo:
                continue
            lit = (frame - lo) / (hi - lo) >= self.dark_threshold
            if lit.any():
                out[i, 0] = ndimage.binary_fill_holes(lit)
        return torch.from_numpy(out).to(image.device)


def _read_mask(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("L"))
    except (OSError, ValueError, UnidentifiedImageError) as err:
        raise ValueError(f"{path}: cannot read the field-of-view mask ({err})") from err
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ValueError(f"{path}: a field-of-view mask must be one (H, W) plane, got shape {arr.shape}")
    if not (arr > 0).any():
        raise ValueError(f"{path}: the field-of-view mask is empty (no non-zero pixel)")
    return arr > 0


def _check(name: str, cam: torch.Tensor, fov: torch.Tensor) -> None:
    if cam.ndim != 4 or cam.shape[1] != 1 or tuple(cam.shape) != tuple(fov.shape):
        raise ValueError(
            f"{name}: cam and field of view must both be (B, 1, H, W) of the same size, got cam {tuple(cam.shape)} "
            f"and field of view {tuple(fov.shape)}"
        )


def attention_outside_fov(cam: torch.Tensor, fov: torch.Tensor) -> torch.Tensor:
    """Per-frame fraction of the attention mass outside the field of view: ``sum(cam * ~fov) / sum(cam)``.

    Args:
        cam: (B, 1, H, W) raw attention maps; negative values count as 0.
        fov: (B, 1, H, W) bool field of view (see :class:`FieldOfView`).

    Returns:
        (B,) float in [0, 1]; 0 where the map is all zero.

    Raises:
        ValueError: when the shapes differ.
    """
    _check("attention_outside_fov", cam, fov)
    mass = cam.detach().float().clamp_min(0).flatten(1)
    outside = (mass * (~fov.to(mass.device).bool()).flatten(1)).sum(1)
    total = mass.sum(1)
    return outside / torch.where(total > 0, total, torch.ones_like(total))


def attention_peak_outside_fov(cam: torch.Tensor, fov: torch.Tensor) -> torch.Tensor:
    """Per frame, whether the map's maximum lies outside the field of view (the first maximum, row-major).

    Args:
        cam: (B, 1, H, W) raw attention maps.
        fov: (B, 1, H, W) bool field of view.

    Returns:
        (B,) bool; False for an all-zero map.
    """
    _check("attention_peak_outside_fov", cam, fov)
    flat = cam.detach().float().flatten(1)
    peak = flat.argmax(1)
    inside = fov.to(flat.device).bool().flatten(1).gather(1, peak[:, None])[:, 0]
    return ~inside & (flat.amax(1) > 0)


def fov_display_scale(cams: list[torch.Tensor], fovs: list[torch.Tensor] | None) -> float:
    """The top of a colour scale shared by several maps: their largest value inside the field of view.

    Pixels outside the field of view never set the scale (they are shown at the top colour when above it).

    Args:
        cams: (H, W) maps.
        fovs: their (H, W) bool fields of view, or None to use the whole frames.

    Returns:
        the largest value, or 1.0 when it is not positive.
    """
    if fovs is None:
        values = [float(c.max()) for c in cams]
    else:
        values = [float(c[f.bool()].max()) if f.any() else float(c.max()) for c, f in zip(cams, fovs, strict=True)]
    top = max(values, default=0.0)
    return top if top > 0 else 1.0
