"""ChipNet: attention-weighted pooling over a grid of image chips, whose softmax grid is the attention map."""

from __future__ import annotations

import os
from typing import Any
from pathlib import Path

import torch
from torch import nn

from medgain.networks.fusion import backbone_features
from medgain.networks.architectures import Architecture, register_architecture

__all__ = ["ChipNet"]


class ChipNet(nn.Module):
    """Cuts the image into non-overlapping square chips, embeds each with a registered backbone, re-stacks the
    embeddings into a grid, scores every chip with two 3×3 convolutions (BatchNorm + ReLU between), turns the
    scores into attention with a softmax over the grid and classifies the attention-weighted mean embedding.

    ``forward`` returns the logits; :meth:`forward_with_attention` also returns the (B, 1, rows, cols) softmax grid,
    the attention map of the cropping pipeline (``medgain.crop.attention_box`` maps it to the original image).

    Args:
        backbone: registry name of the chip encoder (see ``medgain.networks.TARGET_LAYERS``).
        chip_size: side of a chip in pixels; the input height and width must be multiples of it.
        num_classes: number of output logits.
        in_channels: image channels.
        pretrained_path: local weights of the backbone (see ``build_classifier``).
        normalization: input normalisation the encoder applies to every chip (see ``build_classifier``).
        hidden: channels of the first scoring convolution.
        dropout: dropout before the head.
    """

    def __init__(
        self,
        backbone: str,
        chip_size: int,
        num_classes: int = 2,
        in_channels: int = 3,
        pretrained_path: str | Path | None = None,
        normalization: dict[str, list[float]] | None = None,
        hidden: int = 64,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if chip_size < 1:
            raise ValueError(f"chip_size must be >= 1, got {chip_size}")
        self.chip_size = int(chip_size)
        self.encoder, features = backbone_features(backbone, in_channels, pretrained_path, normalization)
        self.scorer = nn.Sequential(
            nn.Conv2d(features, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 3, padding=1),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))

    def forward_with_attention(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, num_classes) and attention (B, 1, H / chip, W / chip), summing to 1 per image."""
        b, c, h, w = image.shape
        cs = self.chip_size
        if h % cs or w % cs:
            raise ValueError(f"ChipNet: image size {h}x{w} is not a multiple of the chip size {cs}")
        rows, cols = h // cs, w // cs
        chips = image.unfold(2, cs, cs).unfold(3, cs, cs)  # (B, C, rows, cols, cs, cs)
        chips = chips.permute(0, 2, 3, 1, 4, 5).reshape(b * rows * cols, c, cs, cs)
        grid = self.encoder(chips).reshape(b, rows, cols, -1).permute(0, 3, 1, 2)
        scores = self.scorer(grid).flatten(1)
        attention = torch.softmax(scores, dim=1).reshape(b, 1, rows, cols)
        pooled = (grid * attention).sum(dim=(2, 3))
        return self.head(pooled), attention

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of images (B, C, H, W)."""
        return self.forward_with_attention(image)[0]


def _build_chipnet(spec: Any, pretrained_path: str | os.PathLike | None, logits_only: bool) -> nn.Module:
    """The registry's builder (:data:`medgain.networks.architectures.Builder`)."""
    return ChipNet(spec.network, spec.chip_size, spec.num_classes, in_channels=spec.in_channels,
                   pretrained_path=pretrained_path, normalization=spec.normalization)


register_architecture("chipnet", Architecture(
    "encoder.", _build_chipnet,
    lambda spec: None if isinstance(spec.chip_size, int) and not isinstance(spec.chip_size, bool)
    and spec.chip_size > 0 else f"a positive chip_size, got {spec.chip_size!r}",
))
