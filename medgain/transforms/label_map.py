"""Turning physician-drawn lesion label maps into GAIN's binary attention masks."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform
from skimage.measure import label as connected_components

__all__ = ["LabelMapToMaskd", "ResizeLesionMaskd", "as_label_tuple", "resize_lesion_mask"]

logger = logging.getLogger(__name__)


def as_label_tuple(labels: Sequence[int] | int, name: str = "lesion_labels") -> tuple[int, ...]:
    """Validate a config list of integer label values.

    Args:
        labels: one integer or a non-empty list of integers.
        name: argument name used in the error message.

    Raises:
        ValueError: when ``labels`` is empty or holds a non-integer.
    """
    items = (labels,) if isinstance(labels, (int, np.integer)) else tuple(labels)
    if not items or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must be a non-empty list of integers, got {labels!r}")
    return tuple(int(v) for v in items)


class LabelMapToMaskd(MapTransform):
    """Binary lesion mask (1, H, W) float32 from an integer label map, plus a ``has_mask`` flag.

    ``d[has_mask_key]`` is True when the item has a label map and is allowed a mask: an item that already
    carries ``has_mask`` False (see :func:`medgain.data.datalist.apply_mask_budget`) gets a zero mask and keeps
    False. Items without a label map get a zero mask of the reference image's size and False, so batches
    collate. The label map key (and its path key) is removed from the output.

    A label map may hold only the background 0, ``lesion_labels`` and ``ignore_labels`` (values drawn for
    something else, e.g. instruments, that count as background): any other value means the map does not follow
    the bundle's label convention (e.g. 0 / 255 masks for ``lesion_labels`` [1, 2, 3, 4]), which would give a
    silently empty mask, and raises an error naming the label map file and the values found.

    Args:
        label_map_key: key of the loaded (1, H, W) integer label map.
        mask_key: key that receives the mask.
        lesion_labels: label values that count as lesion.
        has_mask_key: key of the has-mask flag (read when present, always written).
        reference_key: key of the loaded (C, H, W) image, giving the mask size.
        ignore_labels: further label values allowed in a label map, counted as background.
        path_key_postfix: postfix of the keys holding the source paths (as :class:`LoadLabelMapd` and
            :class:`LoadFramed` write them), named in errors.

    Raises:
        ValueError: when ``lesion_labels`` is empty or a list holds a non-integer, when ``ignore_labels`` shares
            a value with ``lesion_labels`` or holds 0; when called, for a label map with values outside
            0, ``lesion_labels`` and ``ignore_labels``.
    """

    def __init__(
        self,
        label_map_key: str = "label_map",
        mask_key: str = "mask",
        lesion_labels: Sequence[int] | int = (1,),
        has_mask_key: str = "has_mask",
        reference_key: str = "image",
        ignore_labels: Sequence[int] = (),
        path_key_postfix: str = "_path",
    ) -> None:
        super().__init__(label_map_key, allow_missing_keys=True)
        self.label_map_key = label_map_key
        self.mask_key = mask_key
        self.lesion_labels = as_label_tuple(lesion_labels)
        self.ignore_labels = as_label_tuple(ignore_labels, "ignore_labels") if len(ignore_labels) else ()
        clash = sorted(set(self.ignore_labels) & {0, *self.lesion_labels})
        if clash:
            raise ValueError(f"ignore_labels must not hold the background 0 or a lesion label, got {clash}")
        self.allowed_values = (0, *self.lesion_labels, *self.ignore_labels)
        self.has_mask_key = has_mask_key
        self.reference_key = reference_key
        self.path_key_postfix = path_key_postfix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_name = d.get(f"{self.reference_key}{self.path_key_postfix}", "(unknown image)")
        reference = d.get(self.reference_key)
        if not isinstance(reference, (torch.Tensor, np.ndarray)) or reference.ndim != 3:
            raise ValueError(
                f"{image_name}: '{self.reference_key}' must be a loaded (C, H, W) image before LabelMapToMaskd"
            )
        size = tuple(reference.shape[1:])
        allowed = bool(d.get(self.has_mask_key, True))
        label_map = d.pop(self.label_map_key, None)
        label_map_name = d.pop(f"{self.label_map_key}{self.path_key_postfix}", f"label map of {image_name}")
        if label_map is None:
            d[self.mask_key] = torch.zeros((1, *size), dtype=torch.float32)
            d[self.has_mask_key] = False
            return d
        if not isinstance(label_map, (torch.Tensor, np.ndarray)):
            raise ValueError(f"{image_name}: label map {label_map!r} must be loaded before LabelMapToMaskd")
        label_map = torch.as_tensor(label_map)
        values = torch.unique(label_map)
        unknown = values[~torch.isin(values, torch.tensor(self.allowed_values, dtype=values.dtype))]
        if unknown.numel():
            raise ValueError(
                f"{label_map_name}: label map holds values {values.tolist()}, of which {unknown.tolist()} are "
                f"neither background 0 nor lesion_labels {list(self.lesion_labels)}"
                + (f" nor ignore_labels {list(self.ignore_labels)}" if self.ignore_labels else "")
                + " (list values to treat as background in ignore_labels)"
            )
        if tuple(label_map.shape) != (1, *size):
            raise ValueError(
                f"{image_name}: label map of shape {tuple(label_map.shape)} does not match the image, "
                f"expected (1, {size[0]}, {size[1]})"
            )
        if allowed:
            mask = torch.isin(label_map, torch.tensor(self.lesion_labels, dtype=label_map.dtype))
        else:
            mask = torch.zeros_like(label_map, dtype=torch.bool)
        d[self.mask_key] = mask.to(torch.float32)
        d[self.has_mask_key] = allowed
        return d


def resize_lesion_mask(mask: torch.Tensor | np.ndarray, spatial_size: Sequence[int]) -> torch.Tensor:
    """Resize binary lesion masks so that no lesion vanishes.

    Each output pixel is set when the lesion covers at least half of its area (area interpolation, as
    ``torch.nn.functional.interpolate(mode="area")``). A lesion (8-connected component of a channel) none of whose
    pixels falls in a set output pixel is then drawn at the output pixels that hold its pixels: source pixel
    ``(r, c)`` of an ``(H, W)`` mask lies in output pixel ``(r * h // H, c * w // W)``. So a lesion of any size
    keeps at least one pixel, at its place, while large lesions keep their area.

    Args:
        mask: (C, H, W) mask, non-zero = lesion.
        spatial_size: output (h, w).

    Returns:
        (C, h, w) float32 mask of 0 / 1.
    """
    source = torch.as_tensor(mask).detach().cpu().as_subclass(torch.Tensor) != 0
    h, w = (int(v) for v in spatial_size)
    height, width = source.shape[-2:]
    keep = F.interpolate(source[None].float(), size=(h, w), mode="area")[0] >= 0.5
    rows = (np.arange(height) * h) // height
    cols = (np.arange(width) * w) // width
    out = keep.numpy()
    for channel, lesion in enumerate(source.numpy()):
        components = connected_components(lesion, connectivity=2)
        if not components.any():
            continue
        kept_home = out[channel][np.ix_(rows, cols)]  # is the output pixel holding each source pixel set?
        represented = np.unique(components[kept_home & lesion])
        vanished = lesion & ~np.isin(components, represented)
        r, c = np.nonzero(vanished)
        out[channel, rows[r], cols[c]] = True
    return torch.from_numpy(out.astype(np.float32))


class ResizeLesionMaskd(MapTransform):
    """Resize binary lesion masks to the network input size without losing small lesions, and drop the
    ``has_mask`` flag of positives whose mask is empty at that size.

    Masks are resized by :func:`resize_lesion_mask` (area coverage >= 0.5, plus every lesion that would vanish
    kept at its place), not by nearest-neighbour sampling, which skips lesions smaller than about the scale
    factor. A positive item (``label_key`` absent or with a non-zero value) whose ``has_mask`` is true but whose
    masks are all empty after resizing (e.g. its label map holds no lesion label) gets ``has_mask`` False and a
    logged warning naming its file: training then gives it no mask supervision and evaluation does not score its
    attention, the same treatment in both.

    Args:
        keys: keys of the (C, H, W) masks to resize.
        spatial_size: output (h, w), or one integer for a square, e.g. the network input size.
        has_mask_key: key of the has-mask flag (read when present).
        label_key: key of the class label (integer or multi-hot).
        path_key: key of the source file path used in warnings and errors.
        allow_missing_keys: don't raise when a key is missing.

    Raises:
        ValueError: when ``spatial_size`` is not one or two positive integers, or a mask is not (C, H, W).
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int] | int,
        has_mask_key: str = "has_mask",
        label_key: str = "label",
        path_key: str = "image_path",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        size = tuple(spatial_size) if isinstance(spatial_size, Sequence) else (spatial_size, spatial_size)
        integers = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size)
        if len(size) != 2 or not integers or min(size) < 1:
            raise ValueError(f"spatial_size must be one or two positive integers (h, w), got {spatial_size!r}")
        self.spatial_size = (int(size[0]), int(size[1]))
        self.has_mask_key = has_mask_key
        self.label_key = label_key
        self.path_key = path_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        name = d.get(self.path_key, "(unknown image)")
        lesion = False
        for key in self.key_iterator(d):
            if not isinstance(d[key], (torch.Tensor, np.ndarray)) or d[key].ndim != 3:
                raise ValueError(f"{name}: {key!r} must be a (C, H, W) mask, got {getattr(d[key], 'shape', d[key])!r}")
            d[key] = resize_lesion_mask(d[key], self.spatial_size)
            lesion = lesion or bool(d[key].any())
        label = d.get(self.label_key)
        positive = label is None or bool(torch.as_tensor(label).ne(0).any())
        if positive and not lesion and bool(d.get(self.has_mask_key, False)):
            logger.warning(
                "%s: lesion mask is empty at %s x %s; has_mask set to False (no mask supervision, not scored)",
                name,
                *self.spatial_size,
            )
            d[self.has_mask_key] = False
        return d
