"""Bilinear resize of plain image tensors, without MONAI's metadata tracking (inference on many small frames)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["ResizeImaged"]


class ResizeImaged(MapTransform):
    """Resize (C, H, W) image tensors to ``spatial_size`` bilinearly (``align_corners=False``, no anti-aliasing):
    the same values as MONAI's ``Resized(mode="bilinear")``, as a plain tensor. MONAI's transform wraps each
    frame in a ``MetaTensor`` and records its affine, which costs several times the interpolation itself on a
    small frame; inference, which keeps no metadata, does not need it.

    Args:
        keys: keys of the (C, H, W) float images.
        spatial_size: output (H, W).
        allow_missing_keys: don't raise when a key is missing.

    Raises:
        ValueError: for an image that is not (C, H, W) or a ``spatial_size`` that is not two positive integers.
    """

    def __init__(self, keys: KeysCollection, spatial_size: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        size = tuple(int(s) for s in spatial_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"ResizeImaged: spatial_size must be two positive integers, got {spatial_size!r}")
        self.spatial_size = size

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            if image.ndim != 3:
                raise ValueError(f"ResizeImaged: {key!r} must be a (C, H, W) image, got shape {tuple(image.shape)}")
            if tuple(image.shape[1:]) != self.spatial_size:
                image = F.interpolate(image[None].float(), size=self.spatial_size, mode="bilinear",
                                      align_corners=False)[0]
            d[key] = image
        return d
