"""Attention maps of a trained model (its checkpoint) over datalist items, for attention-guided cropping."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureTyped, Resized, SelectItemsd

from medgain.attention import grad_cam
from medgain.data.dermoscopy import MetadataEncoder
from medgain.model_file import load_model, load_model_spec
from medgain.transforms.io import LoadFramed

__all__ = ["model_attention_maps"]


def model_attention_maps(
    checkpoint: str | os.PathLike,
    items: Sequence[Mapping[str, Any]],
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> list[np.ndarray]:
    """The attention map of every item under the model of ``checkpoint`` (a medgain model file).

    Images are loaded and resized to the model's input size as in training; a fused model gets each item's
    metadata (``clinical``) encoded with the encoder stored in the checkpoint. The map is the Grad-CAM of the
    positive class (class 1) at the input resolution for a classifier or a fused model, and the softmax grid of
    chips for ChipNet.

    Args:
        checkpoint: model file written by :class:`medgain.handlers.BestModelSaver`.
        items: datalist items with ``image`` (and ``clinical`` for a fused model).
        batch_size: images per forward.
        device: where the model runs.
        num_workers: data-loading processes.

    Returns:
        one float32 (h, w) map per item, in item order.
    """
    spec = load_model_spec(checkpoint)
    model = load_model(checkpoint, device)
    data = [dict(item) for item in items]
    keys = ["image"]
    if spec.architecture == "fusion":
        assert spec.metadata_encoder is not None
        data = MetadataEncoder.from_state(spec.metadata_encoder).encode(data)
        keys.append("metadata")
    transform = Compose(
        [
            LoadFramed(keys=["image"]),
            Resized(keys=["image"], spatial_size=spec.image_size, mode="area"),
            EnsureTyped(keys=keys, track_meta=False),
            SelectItemsd(keys=keys),
        ]
    )
    loader = DataLoader(Dataset(data, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    maps: list[np.ndarray] = []
    with torch.no_grad():
        for batch in loader:
            images = batch["image"].to(device)
            if spec.architecture == "chipnet":
                attention = model.forward_with_attention(images)[1]
            else:
                extra = {"metadata": batch["metadata"].to(device)} if "metadata" in batch else {}
                attention = grad_cam(model, images, spec.target_layer, 1, forward_kwargs=extra)[1]
            maps.extend(a[0].float().cpu().numpy() for a in attention)
    return maps
