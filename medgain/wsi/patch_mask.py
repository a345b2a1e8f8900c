"""Patch-level lesion masks for GAIN's extra supervision, rasterised from the slide's annotation polygons."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from medgain.wsi.annotations import read_annotations, tumour_mask
from medgain.wsi.slide import Slide

__all__ = ["LesionPatchMaskd"]


@lru_cache(maxsize=256)
def _slide_geometry(path: str, backend: str) -> tuple[tuple[int, int], tuple[float, ...]]:
    with Slide(path, backend=backend) as slide:
        return slide.shape, tuple(slide.downsamples)


class LesionPatchMaskd(MapTransform):
    """Adds the tumour mask of a patch read by MONAI's ``PatchWSIDataset`` family.

    The patch's geometry comes from the image's metadata as MONAI's WSI datasets set it (``path``,
    ``location`` = (top, left) in level-0 pixels, ``size``, ``level``); the annotation file comes from the
    metadata key ``annotation_key`` (pass it in the dataset's ``additional_meta_keys``). An empty or missing
    annotation means a slide without tumour: a zero mask. ``d[mask_key]`` is (1, h, w) float32 and
    ``d[has_mask_key]`` True, since the patches of a patch table come from annotated or tumour-free slides.

    Args:
        image_key: key of the patch (a MetaTensor with the WSI metadata).
        annotation_key: metadata key holding the annotation path.
        mask_key: output key of the mask.
        has_mask_key: output key of the flag.
        backend: WSI backend used to look up the level's downsample (cached per slide).
    """

    def __init__(
        self,
        image_key: str = "image",
        annotation_key: str = "annotation",
        mask_key: str = "mask",
        has_mask_key: str = "has_mask",
        backend: str = "tifffile",
    ) -> None:
        super().__init__(keys=[image_key])
        self.image_key = image_key
        self.annotation_key = annotation_key
        self.mask_key = mask_key
        self.has_mask_key = has_mask_key
        self.backend = backend

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        meta = getattr(d[self.image_key], "meta", None)
        if not meta or "location" not in meta or "path" not in meta:
            raise KeyError(
                f"LesionPatchMaskd: {self.image_key!r} carries no WSI metadata (path, location, size, level); read "
                "patches with MONAI's PatchWSIDataset family"
            )
        path = str(meta["path"])
        location = [int(v) for v in np.asarray(meta["location"]).reshape(-1)[:2]]
        size = [int(v) for v in np.asarray(meta["size"]).reshape(-1)[:2]]
        level = int(np.asarray(meta["level"]).reshape(-1)[0])
        annotation = meta.get(self.annotation_key) or ""
        mask = np.zeros(size, dtype=bool)
        if annotation:
            shape, downsamples = _slide_geometry(path, self.backend)
            mask = tumour_mask(
                read_annotations(annotation, shape), size, downsamples[level], origin=(location[0], location[1])
            )
        d[self.mask_key] = torch.from_numpy(mask[None].astype(np.float32))
        d[self.has_mask_key] = True
        return d
