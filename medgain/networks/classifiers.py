"""Classifier registry: torchvision backbones with their default Grad-CAM layers, offline weights only."""

from __future__ import annotations

import os
from typing import Any
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn
from medgain.networks.architectures import Architecture, register_architecture

__all__ = ["IMAGENET_NORMALIZATION", "TARGET_LAYERS", "build_classifier", "default_normalization"]

logger = logging.getLogger(__name__)

#: default Grad-CAM layer (``named_modules()`` name) of each registered network: its last convolutional block.
TARGET_LAYERS: dict[str, str] = {
    "mobilenet_v2": "features.18",
    "resnet18": "layer4",
    "resnet50": "layer4",
    "densenet121": "features",
    "efficientnet-b0": "features.8",
    "small_cnn": "features.3",
}


#: mean / std of the ImageNet training images (RGB, inputs in [0, 1]): the normalisation of pretrained weights.
IMAGENET_NORMALIZATION: dict[str, list[float]] = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def default_normalization(pretrained_path: str | Path | None) -> dict[str, list[float]] | None:
    """ImageNet normalisation when pretrained weights are used, else None (inputs stay in [0, 1])."""
    return {k: list(v) for k, v in IMAGENET_NORMALIZATION.items()} if pretrained_path else None


def _normalize_input(module: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
    """Forward pre-hook: ``(x - mean) / std`` of the network input (typed so that TorchScript can export it)."""
    return ((args[0] - module.input_mean) / module.input_std,)


def _add_input_normalization(net: nn.Module, normalization: dict[str, list[float]], in_channels: int) -> None:
    """Make ``net`` normalise its input itself (non-persistent buffers + a forward pre-hook), so that images,
    erase fill colours and overlays stay in [0, 1] everywhere outside the network."""
    mean = torch.as_tensor(normalization["mean"], dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.as_tensor(normalization["std"], dtype=torch.float32).reshape(1, -1, 1, 1)
    if mean.shape[1] != in_channels or std.shape[1] != in_channels:
        raise ValueError(
            f"normalization has {mean.shape[1]} mean / {std.shape[1]} std values for {in_channels} input channels"
        )
    if not bool((std > 0).all()):
        raise ValueError(f"normalization std must be positive, got {normalization['std']}")
    net.register_buffer("input_mean", mean, persistent=False)
    net.register_buffer("input_std", std, persistent=False)
    net.register_forward_pre_hook(_normalize_input)


def _replace_conv(parent: nn.Module, name: str, in_channels: int) -> None:
    old: nn.Conv2d = getattr(parent, name)
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    setattr(parent, name, new)


def _mobilenet_v2(num_classes: int, in_channels: int) -> nn.Module:
    net = tvm.mobilenet_v2(weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_conv(net.features[0], "0", in_channels)
    return net


def _resnet(factory: Callable[..., nn.Module]) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, in_channels: int) -> nn.Module:
        net = factory(weights=None, num_classes=num_classes)
        if in_channels != 3:
            _replace_conv(net, "conv1", in_channels)
        return net

    return build


def _densenet121(num_classes: int, in_channels: int) -> nn.Module:
    net = tvm.densenet121(weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_conv(net.features, "conv0", in_channels)
    return net


def _efficientnet_b0(num_classes: int, in_channels: int) -> nn.Module:
    net = tvm.efficientnet_b0(weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_conv(net.features[0], "0", in_channels)
    return net


def _small_cnn(num_classes: int, in_channels: int) -> nn.Module:
    """Four conv-BN-ReLU blocks (32-64-128-128 channels, three halvings) and a linear head: a CPU-sized model
    for demos, tests and small data sets."""

    def block(cin: int, cout: int, pool: bool) -> nn.Sequential:
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))

    net = nn.Sequential()
    net.add_module(
        "features",
        nn.Sequential(block(in_channels, 32, True), block(32, 64, True), block(64, 128, True), block(128, 128, False)),
    )
    net.add_module("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes)))
    return net


_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "mobilenet_v2": _mobilenet_v2,
    "resnet18": _resnet(tvm.resnet18),
    "resnet50": _resnet(tvm.resnet50),
    "densenet121": _densenet121,
    "efficientnet-b0": _efficientnet_b0,
    "small_cnn": _small_cnn,
}


def _load_pretrained(net: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights not found: {path} (medgain never downloads weights; save a state dict there, "
            "e.g. torch.save(torchvision.models.mobilenet_v2(weights='DEFAULT').state_dict(), path) on a "
            "machine with network access)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable PyTorch state dict ({err})") from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    own = net.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if unexpected or missing:
        raise ValueError(
            f"{path}: weights do not fit {type(net).__name__}; missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    # the classifier head (and a first conv with other input channels) may differ in shape: keep those fresh
    skipped = [k for k, v in state.items() if v.shape != own[k].shape]
    if skipped:
        logger.info("%s: kept freshly initialised (shape differs): %s", path, skipped)
    net.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)


def build_classifier(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    pretrained_path: str | Path | None = None,
    normalization: dict[str, list[float]] | None = None,
) -> nn.Module:
    """Build a registered classifier; its Grad-CAM layer is ``TARGET_LAYERS[name]``.

    Args:
        name: one of ``TARGET_LAYERS`` (mobilenet_v2, resnet18, resnet50, densenet121, efficientnet-b0,
            small_cnn).
        num_classes: number of output logits (1 for a single-logit binary model).
        in_channels: input channels.
        pretrained_path: local state dict (e.g. ImageNet weights) loaded with ``weights_only=True``; tensors whose
            shape differs (the classifier head for another number of classes) keep their fresh initialisation.
        normalization: ``{"mean": [...], "std": [...]}`` (one value per input channel) that the network applies to
            its [0, 1] input itself, e.g. :data:`IMAGENET_NORMALIZATION` for pretrained weights
            (:func:`default_normalization`); None for none.

    Raises:
        ValueError: unknown name, or weights that do not belong to this architecture.
        FileNotFoundError: ``pretrained_path`` does not exist.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown network {name!r}; registered: {sorted(_BUILDERS)}")
    net = _BUILDERS[name](num_classes, in_channels)
    if pretrained_path is not None:
        _load_pretrained(net, pretrained_path)
    if normalization is not None:
        _add_input_normalization(net, normalization, in_channels)
    return net


def _build_plain(spec: Any, pretrained_path: str | os.PathLike | None, logits_only: bool) -> nn.Module:
    """The registry's builder (:data:`medgain.networks.architectures.Builder`)."""
    return build_classifier(spec.network, spec.num_classes, in_channels=spec.in_channels,
                            pretrained_path=pretrained_path, normalization=spec.normalization)


register_architecture("classifier", Architecture("", _build_plain))
