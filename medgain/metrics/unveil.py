"""How much of the evidence do the unveiled regions find? Lesion-level recall and pixel precision of region masks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from skimage.measure import label as connected_components

__all__ = ["UnveilCounts", "equal_area_mask", "lesion_instances", "unveil_counts", "unveil_recall"]


@dataclass(frozen=True)
class UnveilCounts:
    """Per-image counts behind :func:`unveil_recall`.

    Attributes:
        lesions: ground-truth lesions in the image.
        found: lesions that the region mask overlaps by at least the minimum fraction of their area.
        region_pixels: pixels of the region mask.
        region_in_lesion: pixels of the region mask inside a lesion.
    """

    lesions: int
    found: int
    region_pixels: int
    region_in_lesion: int

    def __add__(self, other: UnveilCounts) -> UnveilCounts:
        return UnveilCounts(
            self.lesions + other.lesions,
            self.found + other.found,
            self.region_pixels + other.region_pixels,
            self.region_in_lesion + other.region_in_lesion,
        )

    @property
    def recall(self) -> float:
        """found / lesions; NaN without lesions."""
        return self.found / self.lesions if self.lesions else float("nan")

    @property
    def precision(self) -> float:
        """Fraction of the region's pixels inside lesions; NaN for an empty region."""
        return self.region_in_lesion / self.region_pixels if self.region_pixels else float("nan")


def _as_2d(array: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    arr = arr.reshape(arr.shape[-2:]) if arr.ndim > 2 and int(np.prod(arr.shape[:-2])) == 1 else arr
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected an (H, W) map, got shape {arr.shape}")
    return arr


def lesion_instances(lesions: np.ndarray | torch.Tensor, per_lesion: bool = False) -> np.ndarray:
    """One integer label per ground-truth lesion: (H, W) int32, 0 background, 1..n the lesions.

    Args:
        lesions: (H, W) lesion mask or label map (any value > 0 is lesion).
        per_lesion: the map already holds one value per lesion (e.g. the synthetic generator's ``lesions/``
            maps); otherwise lesions are the 8-connected components of ``lesions > 0``.
    """
    arr = _as_2d(lesions, "lesion_instances")
    if per_lesion:
        values = np.unique(arr[arr > 0])
        return np.where(arr > 0, np.searchsorted(values, arr) + 1, 0).astype(np.int32)
    return connected_components(arr > 0, connectivity=2).astype(np.int32)


def unveil_counts(
    region: np.ndarray | torch.Tensor,
    lesions: np.ndarray | torch.Tensor,
    min_overlap: float = 0.25,
    per_lesion: bool = False,
) -> UnveilCounts:
    """Count the lesions of one image that a region mask finds.

    A lesion is found when at least ``min_overlap`` of its pixels lie inside ``region``.

    Args:
        region: (H, W) bool mask (e.g. the union of the unveiled regions).
        lesions: (H, W) lesion mask or label map of the same size.
        min_overlap: fraction of a lesion's area that must be covered, in (0, 1].
        per_lesion: see :func:`lesion_instances`.

    Raises:
        ValueError: for maps of different sizes or ``min_overlap`` outside (0, 1].
    """
    if not 0.0 < min_overlap <= 1.0:
        raise ValueError(f"unveil_counts: min_overlap must be in (0, 1], got {min_overlap}")
    mask = _as_2d(region, "unveil_counts") > 0
    instances = lesion_instances(lesions, per_lesion)
    if mask.shape != instances.shape:
        raise ValueError(f"unveil_counts: region {mask.shape} and lesion map {instances.shape} differ in size")
    n = int(instances.max())
    area = np.bincount(instances.ravel(), minlength=n + 1)[1:]
    covered = np.bincount(instances[mask], minlength=n + 1)[1:]
    return UnveilCounts(
        lesions=n,
        found=int((covered >= min_overlap * area).sum()),
        region_pixels=int(mask.sum()),
        region_in_lesion=int(covered.sum()),
    )


def unveil_recall(
    regions: Iterable[np.ndarray | torch.Tensor],
    lesions: Iterable[np.ndarray | torch.Tensor],
    min_overlap: float = 0.25,
    per_lesion: bool = False,
) -> UnveilCounts:
    """Lesion-level recall (and pixel precision) of region masks over a set of images.

    ``unveil_recall`` = fraction of all ground-truth lesions (connected components, or the values of per-lesion
    maps) that the region mask of their image overlaps by at least ``min_overlap`` of their area; images without
    lesions add only to the precision.

    Args:
        regions: one (H, W) bool mask per image (e.g. :attr:`medgain.unveil.UnveilResult.cumulative`).
        lesions: the matching lesion masks or label maps.
        min_overlap: see :func:`unveil_counts`.
        per_lesion: see :func:`lesion_instances`.

    Returns:
        the summed :class:`UnveilCounts`; ``.recall`` and ``.precision`` give the figures.

    Raises:
        ValueError: when the two sequences differ in length, or see :func:`unveil_counts`.
    """
    regions, lesions = list(regions), list(lesions)
    if len(regions) != len(lesions):
        raise ValueError(f"unveil_recall: {len(regions)} region masks for {len(lesions)} lesion maps")
    total = UnveilCounts(0, 0, 0, 0)
    for region, lesion in zip(regions, lesions):
        total = total + unveil_counts(region, lesion, min_overlap, per_lesion)
    return total


def equal_area_mask(saliency: np.ndarray | torch.Tensor, pixels: int) -> np.ndarray:
    """The ``pixels`` most salient pixels of one map as a bool mask: a single thresholded map with the area of
    another mask (the baseline unveiling is compared with). Ties are broken by position (stable sort).

    Args:
        saliency: (H, W) map.
        pixels: number of pixels to keep, 0 <= pixels <= H * W.
    """
    arr = _as_2d(saliency, "equal_area_mask").astype(np.float64)
    if not 0 <= pixels <= arr.size:
        raise ValueError(f"equal_area_mask: pixels must be in [0, {arr.size}], got {pixels}")
    order = np.argsort(-arr.ravel(), kind="stable")
    mask = np.zeros(arr.size, bool)
    mask[order[:pixels]] = True
    return mask.reshape(arr.shape)
