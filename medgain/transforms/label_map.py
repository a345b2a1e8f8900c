"""Turning physician-drawn lesion label maps into GAIN's binary attention masks."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

__all__ = ["LabelMapToMaskd", "as_label_tuple"]


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
    collate. The label map key is removed from the output.

    Args:
        label_map_key: key of the loaded (1, H, W) integer label map.
        mask_key: key that receives the mask.
        lesion_labels: label values that count as lesion.
        has_mask_key: key of the has-mask flag (read when present, always written).
        reference_key: key of the loaded (C, H, W) image, giving the mask size.
    """

    def __init__(
        self,
        label_map_key: str = "label_map",
        mask_key: str = "mask",
        lesion_labels: Sequence[int] | int = (1,),
        has_mask_key: str = "has_mask",
        reference_key: str = "image",
    ) -> None:
        super().__init__(label_map_key, allow_missing_keys=True)
        self.label_map_key = label_map_key
        self.mask_key = mask_key
        self.lesion_labels = as_label_tuple(lesion_labels)
        self.has_mask_key = has_mask_key
        self.reference_key = reference_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_name = d.get(f"{self.reference_key}_path", "(unknown image)")
        reference = d.get(self.reference_key)
        if not isinstance(reference, (torch.Tensor, np.ndarray)) or reference.ndim != 3:
            raise ValueError(
                f"{image_name}: '{self.reference_key}' must be a loaded (C, H, W) image before LabelMapToMaskd"
            )
        size = tuple(reference.shape[1:])
        allowed = bool(d.get(self.has_mask_key, True))
        label_map = d.pop(self.label_map_key, None)
        if label_map is None:
            d[self.mask_key] = torch.zeros((1, *size), dtype=torch.float32)
            d[self.has_mask_key] = False
            return d
        if not isinstance(label_map, (torch.Tensor, np.ndarray)):
            raise ValueError(f"{image_name}: label map {label_map!r} must be loaded before LabelMapToMaskd")
        label_map = torch.as_tensor(label_map)
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
