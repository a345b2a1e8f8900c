"""Tissue detection at a low pyramid level and the tissue / tumour fraction of patches."""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

from medgain.wsi.slide import Slide, SlideError

__all__ = ["TISSUE_DOWNSAMPLE", "area_fraction", "slide_tissue_mask", "tissue_mask"]

#: default downsample of the level the tissue mask is computed at.
TISSUE_DOWNSAMPLE = 32.0


def tissue_mask(
    rgb: np.ndarray, min_saturation: float = 0.05, min_object_px: int = 16, max_hole_px: int = 64
) -> np.ndarray:
    """Boolean tissue mask of a low-resolution RGB image.

    Tissue is where the HSV saturation exceeds its Otsu threshold (and ``min_saturation``, so that an empty
    slide stays empty); holes up to ``max_hole_px`` pixels are filled and objects up to ``min_object_px``
    pixels removed.

    Args:
        rgb: (H, W, 3) or (3, H, W) uint8 image.
        min_saturation: lowest saturation in [0, 1] that can count as tissue.
        min_object_px: tissue objects of at most this many pixels are dropped (dust, noise).
        max_hole_px: holes of at most this many pixels are filled (nuclei-free gaps, fat).
    """
    image = np.asarray(rgb)
    if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[-1] not in (3, 4):
        image = np.moveaxis(image, 0, -1)
    if image.ndim != 3 or image.shape[-1] < 3:
        raise ValueError(f"tissue_mask expects an RGB image, got shape {np.asarray(rgb).shape}")
    saturation = rgb2hsv(image[..., :3])[..., 1]
    threshold = min_saturation
    if float(saturation.max()) > float(saturation.min()):
        threshold = max(float(threshold_otsu(saturation)), min_saturation)
    mask = saturation > threshold
    if max_hole_px > 0:
        mask = remove_small_holes(mask, max_size=max_hole_px)
    if min_object_px > 0:
        mask = remove_small_objects(mask, max_size=min_object_px)
    return mask


def slide_tissue_mask(
    slide: Slide,
    level: int | None = None,
    min_saturation: float = 0.05,
    min_object_um2: float = 20_000.0,
    max_hole_um2: float = 20_000.0,
) -> tuple[np.ndarray, int]:
    """Tissue mask of a slide at a low level (see :func:`tissue_mask`).

    Args:
        slide: an open slide.
        level: the pyramid level; None takes the level closest below a downsample of
            :data:`TISSUE_DOWNSAMPLE`.
        min_saturation: see :func:`tissue_mask`.
        min_object_um2: tissue objects smaller than this area (square microns) are dropped.
        max_hole_um2: holes smaller than this area are filled.

    Returns:
        ``(mask, level)``: the (H, W) boolean mask at ``level``.

    Raises:
        SlideError: when no tissue is found, or the slide has no resolution and no assumed one.
    """
    if level is None:
        level = slide.level_for_downsample(TISSUE_DOWNSAMPLE)
    px_um2 = slide.mpp_at(level, "the tissue mask (areas in square microns)") ** 2
    mask = tissue_mask(
        slide.read_level(level),
        min_saturation=min_saturation,
        min_object_px=int(min_object_um2 / px_um2),
        max_hole_px=int(max_hole_um2 / px_um2),
    )
    if not mask.any():
        raise SlideError(
            f"{slide.path}: no tissue found (level {level}, saturation above {min_saturation}, objects of at least "
            f"{min_object_um2:g} square microns); is the slide blank?"
        )
    return mask, level


def area_fraction(mask: np.ndarray, mask_downsample: float, xs: np.ndarray, ys: np.ndarray, size0: float) -> np.ndarray:
    """Fraction of each square (level-0 top-left ``xs``, ``ys``, side ``size0``) covered by ``mask``.

    The squares are mapped onto the mask grid (rounded, at least one mask pixel each) and summed with an
    integral image, so millions of patches cost one pass over the mask. Parts outside the mask count as empty.

    Args:
        mask: (H, W) boolean mask whose pixel covers ``mask_downsample`` level-0 pixels per side.
        mask_downsample: level-0 pixels per mask pixel.
        xs: (N,) left edges in level-0 pixels.
        ys: (N,) top edges in level-0 pixels.
        size0: side of the squares in level-0 pixels.
    """
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    side = max(size0 / mask_downsample, 1.0)
    x0 = np.rint(np.asarray(xs, dtype=np.float64) / mask_downsample).astype(np.int64)
    y0 = np.rint(np.asarray(ys, dtype=np.float64) / mask_downsample).astype(np.int64)
    x1 = x0 + max(int(round(side)), 1)
    y1 = y0 + max(int(round(side)), 1)
    area = (x1 - x0) * (y1 - y0)
    x0, x1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    y0, y1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / area
