"""Per-patch identifiers from the metadata of a patch read by MONAI's ``PatchWSIDataset`` family."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.transforms import MapTransform

__all__ = ["PatchIdd"]


class PatchIdd(MapTransform):
    """Copies a patch's slide path and table row from its image metadata into the data dict.

    Sets ``d[path_key]`` to the slide path (metadata ``path``) and ``d[index_key]`` to the patch's row in its
    patch table (metadata ``index_meta_key``; pass it in the dataset's ``additional_meta_keys``), the keys
    medgain's review handlers (``PredictionCSVWriter``, ``AttentionOverlaySaver``) identify samples by.

    Args:
        image_key: key of the patch (a MetaTensor with the WSI metadata).
        index_meta_key: metadata key of the patch's row index.
        path_key: output key of the slide path.
        index_key: output key of the row index.
    """

    def __init__(
        self,
        image_key: str = "image",
        index_meta_key: str = "index",
        path_key: str = "image_path",
        index_key: str = "frame",
    ) -> None:
        super().__init__(keys=[image_key])
        self.image_key = image_key
        self.index_meta_key = index_meta_key
        self.path_key = path_key
        self.index_key = index_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        meta = getattr(d[self.image_key], "meta", None) or {}
        missing = [k for k in ("path", self.index_meta_key) if k not in meta]
        if missing:
            raise KeyError(
                f"PatchIdd: {self.image_key!r} metadata lacks {missing}; read patches with MONAI's PatchWSIDataset "
                f"and additional_meta_keys=[{self.index_meta_key!r}]"
            )
        d[self.path_key] = str(meta["path"])
        d[self.index_key] = int(np.asarray(meta[self.index_meta_key]).reshape(-1)[0])
        return d
