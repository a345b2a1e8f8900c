"""Image + patient-metadata classifier: a registered backbone and a small metadata MLP, joined before the head."""

from __future__ import annotations

import os
from typing import Any
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from medgain.networks.classifiers import TARGET_LAYERS, build_classifier
from medgain.networks.architectures import Architecture, register_architecture

__all__ = ["FusionClassifier", "backbone_features"]


def backbone_features(
    name: str,
    in_channels: int = 3,
    pretrained_path: str | Path | None = None,
    normalization: dict[str, list[float]] | None = None,
) -> tuple[nn.Module, int]:
    """A registered classifier (see ``build_classifier`` for the arguments) with its final linear layer replaced by
    the identity.

    Returns:
        the network, mapping (B, C, H, W) images to (B, F) features, and F.
    """
    net = build_classifier(name, 1, in_channels, pretrained_path, normalization)
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"backbone {name!r} has no final linear layer to remove")
    path, last = linears[-1]
    parent = net.get_submodule(path.rpartition(".")[0]) if "." in path else net
    setattr(parent, path.rpartition(".")[2], nn.Identity())
    return net, last.in_features


class FusionClassifier(nn.Module):
    """A registered backbone on the image and an MLP on the encoded metadata, concatenated before a linear head.

    ``forward(image, metadata)``: in a MONAI ``SupervisedTrainer`` pass the metadata with
    ``prepare_batch=monai.engines.PrepareBatchExtraInput({"metadata": "metadata"})``. Grad-CAM and GAIN work
    on the image branch: its layers are named ``image_branch.<layer>``, and :attr:`target_layer` is the default
    Grad-CAM layer of the backbone. Nothing after the target layer mixes samples (no BatchNorm in the MLP or the
    head), as batched Grad-CAM requires.

    Args:
        backbone: registry name (see ``medgain.networks.TARGET_LAYERS``).
        num_metadata: length of the encoded metadata vector (``MetadataEncoder.num_features``); 0 for none.
        num_classes: number of output logits.
        in_channels: image channels.
        pretrained_path: local weights of the backbone (see ``build_classifier``).
        normalization: input normalisation the image branch applies itself (see ``build_classifier``), e.g.
            ``medgain.networks.default_normalization(pretrained_path)``.
        metadata_hidden: widths of the MLP layers (Linear + ReLU each).
        dropout: dropout before the head.
    """

    def __init__(
        self,
        backbone: str,
        num_metadata: int,
        num_classes: int = 2,
        in_channels: int = 3,
        pretrained_path: str | Path | None = None,
        normalization: dict[str, list[float]] | None = None,
        metadata_hidden: Sequence[int] = (32, 32),
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if num_metadata < 0:
            raise ValueError(f"num_metadata must be >= 0, got {num_metadata}")
        self.image_branch, image_features = backbone_features(backbone, in_channels, pretrained_path, normalization)
        self.target_layer = f"image_branch.{TARGET_LAYERS[backbone]}"
        self.num_metadata = int(num_metadata)
        layers: list[nn.Module] = []
        width = self.num_metadata
        for hidden in metadata_hidden if num_metadata else ():
            layers += [nn.Linear(width, int(hidden)), nn.ReLU(inplace=True)]
            width = int(hidden)
        self.metadata_branch = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(image_features + width, num_classes))

    def forward(self, image: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_classes) of images (B, C, H, W) and their encoded metadata (B, num_metadata).

        ``metadata`` may also be nested lists of numbers, the form in which MONAI's ``verify_net_in_out``
        passes ``--extra_forward_args`` from the command line (bundles/dermoscopy_gain/docs/README.md). The
        network is scriptable (``torch.jit.script``, MONAI's ``ckpt_export``): hence the string concatenation in
        the errors.
        """
        features = self.image_branch(image)
        if self.num_metadata:
            if metadata is None:
                raise ValueError(
                    "FusionClassifier expects metadata of " + str(self.num_metadata) + " features, got none"
                )
            vector = torch.as_tensor(metadata, dtype=features.dtype, device=features.device)
            vector = vector.reshape(vector.shape[0], -1)
            if vector.shape[0] != image.shape[0] or vector.shape[1] != self.num_metadata:
                raise ValueError(
                    "FusionClassifier: metadata of shape " + str(list(vector.shape)) + " for "
                    + str(image.shape[0]) + " images of " + str(self.num_metadata) + " features"
                )
            features = torch.cat([features, self.metadata_branch(vector)], dim=1)
        return self.head(features)


def _build_fusion(spec: Any, pretrained_path: str | os.PathLike | None, logits_only: bool) -> nn.Module:
    """The registry's builder (:data:`medgain.networks.architectures.Builder`)."""
    from medgain.data.dermoscopy import MetadataEncoder  # the encoder's state gives the metadata width

    return FusionClassifier(spec.network, MetadataEncoder.from_state(spec.metadata_encoder).num_features,
                            spec.num_classes, in_channels=spec.in_channels, pretrained_path=pretrained_path,
                            normalization=spec.normalization)


register_architecture("fusion", Architecture(
    "image_branch.", _build_fusion,
    lambda spec: None if isinstance(spec.metadata_encoder, Mapping) else "metadata_encoder (MetadataEncoder.state())",
))
