"""Recurrent glimpse attention: a model that chooses where to look, through differentiable Gaussian glimpses.

An LSTM predicts a sequence of glimpse locations (centre and scale); each glimpse is read from the image with
separable Gaussian filter banks (DRAW-style), so classification and location losses reach the location head.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medgain.networks.classifiers import build_classifier
from medgain.networks.architectures import Architecture, register_architecture

__all__ = [
    "GlimpseLogitsNetwork",
    "GlimpseOutput",
    "RecurrentGlimpseNetwork",
    "gaussian_filterbank",
    "gaussian_glimpses",
    "glimpse_geometry",
    "glimpse_encoder",
]


def gaussian_filterbank(
    centers: torch.Tensor, strides: torch.Tensor, sigmas: torch.Tensor, size: int, length: int
) -> torch.Tensor:
    """One-axis Gaussian filter banks, shape (B, G, size, length).

    Row ``i`` of glimpse ``g`` is a Gaussian over the ``length`` pixel positions centred at
    ``centers + (i - (size - 1) / 2) * strides`` with standard deviation ``sigmas``, normalised by its mass on
    the unbounded pixel grid (not on the image), so a glimpse reaching past the image border reads zeros there
    instead of being pulled towards the edge.

    Args:
        centers: (B, G) glimpse centres in pixels (0 = first pixel centre).
        strides: (B, G) distance between neighbouring glimpse samples in pixels.
        sigmas: (B, G) Gaussian width in pixels (clamped to at least 0.5).
        size: samples per glimpse along this axis.
        length: image size along this axis.
    """
    offsets = torch.arange(size, device=centers.device, dtype=centers.dtype) - (size - 1) / 2.0
    mu = centers[..., None] + offsets * strides[..., None]  # (B, G, size)
    # at least 0.5 pixels: narrower Gaussians fall between pixels and pass almost no gradient (a literal, as
    # TorchScript compiles this function and reads no module-level floats)
    sig = sigmas.clamp_min(0.5)[..., None, None]
    positions = torch.arange(length, device=centers.device, dtype=centers.dtype)
    weights = torch.exp(-0.5 * ((positions - mu[..., None]) / sig) ** 2)
    # mass of the Gaussian on the whole (unbounded) integer grid, summed around mu
    reach = int(math.ceil(4.0 * float(sig.detach().max()))) + 1
    grid = torch.arange(-reach, reach + 1, device=centers.device, dtype=centers.dtype)
    fraction = (mu - mu.detach().floor())[..., None]
    mass = torch.exp(-0.5 * ((grid - fraction) / sig) ** 2).sum(-1, keepdim=True)
    return weights / mass


def gaussian_glimpses(
    images: torch.Tensor, centers: torch.Tensor, strides: torch.Tensor, sigmas: torch.Tensor, size: int
) -> torch.Tensor:
    """Read ``G`` glimpses per image with separable Gaussian filter banks, differentiable in every argument.

    Args:
        images: (B, C, H, W) images (or masks).
        centers: (B, G, 2) glimpse centres (x, y) in pixels.
        strides: (B, G) sample spacing in pixels (isotropic).
        sigmas: (B, G) Gaussian width in pixels.
        size: glimpse height and width in samples.

    Returns:
        (B, G, C, size, size) glimpses.

    Raises:
        ValueError: on inconsistent shapes.
    """
    # errors by concatenation: the function is compiled by torch.jit.script (TorchScript export of the network)
    if images.ndim != 4:
        raise ValueError("images must be (B, C, H, W), got shape " + str(list(images.shape)))
    b, h, w = images.shape[0], images.shape[2], images.shape[3]
    if centers.ndim != 3 or centers.shape[0] != b or centers.shape[2] != 2:
        raise ValueError("centers must be (B=" + str(b) + ", G, 2), got shape " + str(list(centers.shape)))
    if list(strides.shape) != list(centers.shape[:2]) or list(sigmas.shape) != list(centers.shape[:2]):
        raise ValueError(
            "strides " + str(list(strides.shape)) + " and sigmas " + str(list(sigmas.shape))
            + " must be (B, G) = " + str(list(centers.shape[:2]))
        )
    dtype = images.dtype
    fx = gaussian_filterbank(centers[..., 0].to(dtype), strides.to(dtype), sigmas.to(dtype), size, w)
    fy = gaussian_filterbank(centers[..., 1].to(dtype), strides.to(dtype), sigmas.to(dtype), size, h)
    return torch.einsum("bgih,bchw,bgjw->bgcij", fy, images, fx)


def glimpse_geometry(
    centers: torch.Tensor, scales: torch.Tensor, height: int, width: int, size: int, sigma_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel centres, strides and widths of glimpses given in normalised coordinates.

    Args:
        centers: (B, G, 2) centres (x, y) in [-1, 1] (-1: first pixel, 1: last pixel).
        scales: (B, G) glimpse side as a fraction of the shorter image side.
        height: image height in pixels.
        width: image width in pixels.
        size: glimpse side in samples.
        sigma_ratio: Gaussian width as a fraction of the stride.

    Returns:
        ``(centers (B, G, 2) in pixels, strides (B, G), sigmas (B, G))``.
    """
    extent = torch.tensor([float(width - 1), float(height - 1)], dtype=centers.dtype, device=centers.device)
    pixels = (centers + 1.0) * 0.5 * extent
    strides = scales * min(height, width) / size
    return pixels, strides, strides * sigma_ratio


class GlimpseOutput(NamedTuple):
    """Everything a forward of :class:`RecurrentGlimpseNetwork` produces.

    Attributes:
        logits: (B, C) classification of the aggregated glimpse features.
        glimpse_logits: (B, G, C) classification after each glimpse (from the LSTM state).
        centers: (B, G, 2) glimpse centres (x, y) in [-1, 1].
        scales: (B, G) glimpse sides as fractions of the shorter image side.
        glimpse_size: glimpse side in samples.
        sigma_ratio: Gaussian width as a fraction of the stride.
    """

    logits: torch.Tensor
    glimpse_logits: torch.Tensor
    centers: torch.Tensor
    scales: torch.Tensor
    glimpse_size: int
    sigma_ratio: float


def glimpse_encoder(
    name: str, in_channels: int = 3, pretrained_path: str | None = None
) -> tuple[nn.Module, int]:
    """The feature extractor of a registered classifier (``build_classifier``) with global average pooling.

    Args:
        name: registered network name (see :data:`medgain.networks.TARGET_LAYERS`).
        in_channels: input channels.
        pretrained_path: local state dict of the full classifier (its head is discarded).

    Returns:
        ``(module mapping (N, C, h, w) to (N, F), F)``.
    """
    net = build_classifier(name, num_classes=1, in_channels=in_channels, pretrained_path=pretrained_path)
    if hasattr(net, "features"):
        body = [net.features, nn.ReLU()] if name == "densenet121" else [net.features]
    else:  # torchvision ResNets: every child before the pooling and the classifier
        body = [child for child_name, child in net.named_children() if child_name not in ("avgpool", "fc")]
    encoder = nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    encoder.eval()
    with torch.no_grad():  # the feature size of this backbone, from one tiny forward
        features = int(encoder(torch.zeros(1, in_channels, 64, 64)).shape[1])
    encoder.train()
    return encoder, features


class _ContextNetwork(nn.Module):
    """Three strided conv blocks on the downsampled whole image, pooled to a 4 × 4 map (so that the initial LSTM
    state can say *where* something is, which a global pooling would discard), then a linear map to the state."""

    def __init__(self, in_channels: int, hidden_size: int, context_size: int) -> None:
        super().__init__()
        self.context_size = context_size
        layers: list[nn.Module] = []
        for cin, cout in ((in_channels, 16), (16, 32), (32, 32)):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.state = nn.Linear(32 * 16, 2 * hidden_size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        small = F.interpolate(
            images, size=(self.context_size, self.context_size), mode="bilinear", align_corners=False, antialias=True
        )
        h, c = self.state(self.body(small)).chunk(2, dim=1)
        return torch.tanh(h), c


class RecurrentGlimpseNetwork(nn.Module):
    """Recurrent attention model: an LSTM chooses ``num_glimpses`` Gaussian glimpses and classifies the image.

    Step ``t``: the location head maps the LSTM state to a glimpse (centre through ``tanh`` in [-1, 1], scale
    through a sigmoid in ``[min_scale, max_scale]``); the glimpse is read with :func:`gaussian_glimpses`,
    encoded by the registered backbone ("what") and combined with the encoded location ("where") as
    ``what * (1 + tanh(where))`` — a gate around 1, so the product cannot collapse to 0 while the location
    still modulates every feature; the LSTM then takes that vector. The initial state comes from a context
    network on the whole image downsampled to ``context_size`` (its features pooled to a coarse 4 × 4 map).

    The location head's bias is learnable per step and starts at points spread on a circle of radius
    ``init_spread`` (step 0 at the centre), and its weights start at a standard deviation of
    ``0.5 / sqrt(hidden_size)`` (pre-activations of about 0.1–0.3), so the first glimpses are spread over the image
    and far from ``tanh`` saturation while the state can still steer them; gradients reach the head through the
    Gaussian filter banks.

    Classification: ``logits`` come from the element-wise maximum over glimpses of the what×where features,
    ``glimpse_logits[:, t]`` from the LSTM state after glimpse ``t``. With ``exclude_first_glimpse`` (default)
    the aggregate skips glimpse 0, whose location is chosen before anything was seen: a model cannot then
    classify from that glimpse alone and leave the others where they started (the glimpse-0 shortcut);
    ``docs/benchmarks.md`` reports the effect.

    Args:
        encoder: registered backbone name for the glimpse encoder (e.g. "small_cnn", "resnet18").
        num_classes: number of logits.
        in_channels: image channels.
        num_glimpses: glimpses per image (at least 2 with ``exclude_first_glimpse``).
        glimpse_size: glimpse side in samples.
        hidden_size: LSTM and feature size.
        context_size: side of the downsampled whole image seen by the context network.
        min_scale: smallest glimpse side, as a fraction of the shorter image side.
        max_scale: largest glimpse side, same unit.
        init_scale: initial glimpse side, in ``(min_scale, max_scale)``.
        init_spread: radius (normalised coordinates) of the circle of initial glimpse centres.
        sigma_ratio: Gaussian width as a fraction of the sample spacing.
        exclude_first_glimpse: aggregate classification from glimpses 1..G-1 only.
        freeze_encoder_norm: keep the glimpse encoder's BatchNorm layers in eval mode (their stored statistics:
            pretrained ones, or the identity for a fresh backbone). Glimpses of different steps differ in
            statistics, so per-step batch statistics in training would not match the running statistics used
            in evaluation; frozen statistics make both read glimpses alike.
        pretrained_path: local state dict of the backbone classifier (see ``build_classifier``).

    Raises:
        ValueError: on inconsistent sizes or scales.
    """

    def __init__(
        self,
        encoder: str = "small_cnn",
        num_classes: int = 2,
        in_channels: int = 3,
        num_glimpses: int = 4,
        glimpse_size: int = 32,
        hidden_size: int = 256,
        context_size: int = 64,
        min_scale: float = 0.1,
        max_scale: float = 0.8,
        init_scale: float = 0.4,
        init_spread: float = 0.5,
        sigma_ratio: float = 0.5,
        exclude_first_glimpse: bool = True,
        freeze_encoder_norm: bool = True,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        if num_glimpses < (2 if exclude_first_glimpse else 1):
            raise ValueError(
                f"num_glimpses must be >= {2 if exclude_first_glimpse else 1} "
                f"(exclude_first_glimpse={exclude_first_glimpse}), got {num_glimpses}"
            )
        if not 0.0 < min_scale < init_scale < max_scale:
            raise ValueError(
                f"scales must satisfy 0 < min_scale < init_scale < max_scale, got {min_scale}, {init_scale}, {max_scale}"
            )
        if glimpse_size < 4 or context_size < 8 or sigma_ratio <= 0 or not 0.0 <= init_spread < 1.0:
            raise ValueError(
                f"need glimpse_size >= 4, context_size >= 8, sigma_ratio > 0 and 0 <= init_spread < 1, got "
                f"{glimpse_size}, {context_size}, {sigma_ratio}, {init_spread}"
            )
        self.num_glimpses = num_glimpses
        self.glimpse_size = glimpse_size
        self.sigma_ratio = float(sigma_ratio)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.exclude_first_glimpse = exclude_first_glimpse
        self.freeze_encoder_norm = freeze_encoder_norm
        self.encoder, features = glimpse_encoder(encoder, in_channels, pretrained_path)
        self.what = nn.Sequential(nn.Linear(features, hidden_size), nn.ReLU())
        self.where = nn.Linear(3, hidden_size)
        self.context = _ContextNetwork(in_channels, hidden_size, context_size)
        self.core = nn.LSTMCell(hidden_size, hidden_size)
        self.location = nn.Linear(hidden_size, 3)
        self.location_bias = nn.Parameter(self._initial_bias(num_glimpses, init_scale, init_spread))
        self.classifier = nn.Linear(hidden_size, num_classes)
        self.glimpse_classifier = nn.Linear(hidden_size, num_classes)
        nn.init.normal_(self.location.weight, std=0.5 / math.sqrt(hidden_size))
        nn.init.zeros_(self.location.bias)
        self.train()

    def train(self, mode: bool = True) -> RecurrentGlimpseNetwork:
        """Set the training mode; with ``freeze_encoder_norm`` the encoder's BatchNorm layers stay in eval mode."""
        super().train(mode)
        if self.freeze_encoder_norm:
            for module in self.encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def _initial_bias(self, num_glimpses: int, init_scale: float, spread: float) -> torch.Tensor:
        angles = torch.arange(num_glimpses - 1, dtype=torch.float32) * (2.0 * math.pi / max(num_glimpses - 1, 1))
        points = torch.cat([torch.zeros(1, 2), spread * torch.stack([angles.cos(), angles.sin()], 1)])
        unit = (init_scale - self.min_scale) / (self.max_scale - self.min_scale)
        scale = torch.full((num_glimpses, 1), math.log(unit / (1.0 - unit)))
        return torch.cat([torch.atanh(points), scale], 1)

    def locate(self, state: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Glimpse centre (B, 2) in [-1, 1] and scale (B,) for ``step`` from the LSTM state (B, hidden)."""
        raw = self.location(state) + self.location_bias[step]
        centre = torch.tanh(raw[:, :2])
        scale = self.min_scale + (self.max_scale - self.min_scale) * torch.sigmoid(raw[:, 2])
        return centre, scale

    def forward(self, images: torch.Tensor) -> GlimpseOutput:
        """Run all glimpses on (B, C, H, W) images."""
        return self.run_glimpses(images)

    def run_glimpses(self, images: torch.Tensor) -> GlimpseOutput:
        """Run all glimpses on (B, C, H, W) images (the forward; subclasses pick from its output)."""
        h, w = images.shape[2], images.shape[3]
        state, cell = self.context(images)
        centers: list[torch.Tensor] = []
        scales: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        glimpse_logits: list[torch.Tensor] = []
        for step in range(self.num_glimpses):
            centre, scale = self.locate(state, step)
            pixels, strides, sigmas = glimpse_geometry(
                centre[:, None], scale[:, None], h, w, self.glimpse_size, self.sigma_ratio
            )
            patch = gaussian_glimpses(images, pixels, strides, sigmas, self.glimpse_size)[:, 0]
            what = self.what(self.encoder(patch))
            where = self.where(torch.cat([centre, scale[:, None]], 1))
            glimpse = what * (1.0 + torch.tanh(where))
            state, cell = self.core(glimpse, (state, cell))
            centers.append(centre)
            scales.append(scale)
            features.append(glimpse)
            glimpse_logits.append(self.glimpse_classifier(state))
        pooled = torch.stack(features[1:] if self.exclude_first_glimpse else features, 1).amax(1)
        return GlimpseOutput(
            logits=self.classifier(pooled),
            glimpse_logits=torch.stack(glimpse_logits, 1),
            centers=torch.stack(centers, 1),
            scales=torch.stack(scales, 1),
            glimpse_size=self.glimpse_size,
            sigma_ratio=self.sigma_ratio,
        )


class GlimpseLogitsNetwork(RecurrentGlimpseNetwork):
    """:class:`RecurrentGlimpseNetwork` whose forward returns the aggregate ``logits`` (B, C) only.

    The form MONAI's bundle tools expect of a classifier (``verify_net_in_out`` reads ``output.shape``,
    ``ckpt_export`` scripts the forward) and the TorchScript export a partner runs; same arguments, modules and
    state dict as :class:`RecurrentGlimpseNetwork`, so a model file of one loads into the other.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Logits (B, num_classes) of (B, C, H, W) images."""
        return self.run_glimpses(images).logits


def _build_glimpse(spec: Any, pretrained_path: str | os.PathLike | None, logits_only: bool) -> nn.Module:
    """The registry's builder (:data:`medgain.networks.architectures.Builder`)."""
    glimpse_class = GlimpseLogitsNetwork if logits_only else RecurrentGlimpseNetwork
    return glimpse_class(spec.network, spec.num_classes, spec.in_channels, pretrained_path=pretrained_path,
                         **spec.glimpse)


register_architecture("glimpse", Architecture(
    "encoder.", _build_glimpse,
    lambda spec: None if isinstance(spec.glimpse, Mapping) else "glimpse (the RecurrentGlimpseNetwork options)",
))
