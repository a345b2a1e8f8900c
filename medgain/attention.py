"""Batched, differentiable Grad-CAM and the GAIN erasing primitives.

Unlike visualisation libraries, everything here stays on the autograd graph, works on a whole batch with a
different target class per sample, and leaves the model untouched (no train/eval switch, no ``.grad``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ActivationCapture",
    "cam_from_activations",
    "erase",
    "grad_cam",
    "mean_roi_color",
    "normalize_cam",
    "resolve_layer",
    "soft_mask",
    "target_scores",
]


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the sub-module called ``name`` (a ``named_modules()`` name).

    A model wrapped in ``DistributedDataParallel`` / ``DataParallel`` is searched under ``module.`` too.

    Raises:
        ValueError: when no such layer exists; the message lists the closest layer names.
    """
    modules = dict(model.named_modules())
    for candidate in (name, f"module.{name}"):
        if candidate in modules:
            return modules[candidate]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.3)
    raise ValueError(
        f"target layer {name!r} not found in {type(model).__name__}; closest layer names: {close or 'none'}"
    )


class ActivationCapture:
    """Forward hook that records a layer's output so that Grad-CAM can be taken from it.

    The rest of the network consumes a copy of the recorded tensor (identity gradient), so gradients taken w.r.t.
    it are exact even when a later op works in place.
    When nothing upstream requires gradients (frozen backbone, plain input) the output is made a leaf that
    does, so a cam can still be computed. Capturing can be switched off with ``enabled``.

    Args:
        layer: the module whose output is recorded.
        grad_from_layer: when the forward runs with gradients disabled, record the graph from this layer on
            only (the hook switches gradients on; the caller restores the mode afterwards). Grad-CAM then costs
            about one inference forward: nothing upstream of the layer is recorded.
    """

    def __init__(self, layer: nn.Module, grad_from_layer: bool = False) -> None:
        self.enabled = True
        self.grad_from_layer = grad_from_layer
        self.activations: torch.Tensor | None = None
        self._handle = layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> torch.Tensor | None:
        if not self.enabled:
            return None
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise TypeError(
                f"Grad-CAM needs a layer with a (B, C, H, W) tensor output; {type(module).__name__} returned "
                f"{type(output).__name__} {tuple(getattr(output, 'shape', ()))}"
            )
        if self.grad_from_layer and not torch.is_grad_enabled():
            torch.set_grad_enabled(True)
            output = output.detach().requires_grad_(True)
        elif torch.is_grad_enabled() and not output.requires_grad:
            output = output.detach().requires_grad_(True)
        self.activations = output
        # the rest of the network consumes a copy, so that an in-place op after the layer (torchvision DenseNet's
        # ``F.relu(features, inplace=True)``) neither modifies the recorded activations nor hits a leaf tensor
        return output.clone() if output.requires_grad else output

    def pop(self) -> torch.Tensor | None:
        """Return the last recorded activations and forget them."""
        acts, self.activations = self.activations, None
        return acts

    def remove(self) -> None:
        """Detach the hook from the layer."""
        self._handle.remove()
        self.activations = None

    def __enter__(self) -> ActivationCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _as_index(class_index: int | Sequence[int] | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    idx = torch.as_tensor(class_index, device=device).long().reshape(-1)
    if idx.numel() == 1:
        idx = idx.expand(batch)
    if idx.numel() != batch:
        raise ValueError(f"class_index has {idx.numel()} entries for a batch of {batch}")
    return idx


def target_scores(
    logits: torch.Tensor, class_index: int | Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample score of the target class, shape (B,).

    Args:
        logits: (B, C) or (B,) network output.
        class_index: one class per sample (or one for all); None takes the arg-max per sample.
            With a single output logit (binary) the logit is the score of class 1 and its negation the score
            of class 0; None means class 1.
    """
    logits = logits.reshape(logits.shape[0], -1)
    if logits.shape[1] == 1:
        score = logits[:, 0]
        if class_index is None:
            return score
        idx = _as_index(class_index, logits.shape[0], logits.device)
        return torch.where(idx == 0, -score, score)
    idx = logits.argmax(1) if class_index is None else _as_index(class_index, logits.shape[0], logits.device)
    return logits.gather(1, idx[:, None])[:, 0]


def cam_from_activations(
    activations: torch.Tensor,
    scores: torch.Tensor,
    size: Sequence[int] | None = None,
    *,
    create_graph: bool = False,
    negative_slope: float = 0.0,
) -> torch.Tensor:
    """Grad-CAM of ``scores`` (B,) w.r.t. recorded ``activations`` (B, C, h, w).

    One ``torch.autograd.grad`` call serves the whole batch: the gradient of the summed scores w.r.t. sample
    i's activations is the gradient of score i alone, as long as samples do not interact after the layer (no
    batch statistics downstream of it, which holds for classifier heads). Parameter ``.grad`` is not touched.

    Args:
        activations: the captured layer output, part of the graph of ``scores``.
        scores: per-sample target scores.
        size: (H, W) to upsample the cam to (bilinear); None keeps the layer's resolution.
        create_graph: also differentiate through the channel weights (second-order graph).
        negative_slope: slope kept below zero (a leaky ReLU) for losses on the map: with Grad-CAM's ReLU (0) a
            location whose weighted evidence is negative gets no gradient, so a map positive at one location
            only, once min-max normalised, is a fixed point of any loss on it (its gradient is exactly zero).

    Returns:
        (B, 1, H, W) raw Grad-CAM (float32, or float64 for double inputs): ReLU (leaky with ``negative_slope``) of
        the gradient-weighted channel sum, not normalised.
    """
    (grads,) = torch.autograd.grad(scores.sum(), activations, create_graph=create_graph, retain_graph=True)
    dtype = torch.promote_types(activations.dtype, torch.float32)  # half precision (AMP) is computed in float32
    weights = grads.to(dtype).mean(dim=(2, 3), keepdim=True)
    cam = F.leaky_relu((weights * activations.to(dtype)).sum(dim=1, keepdim=True), negative_slope)
    if size is not None and tuple(cam.shape[-2:]) != tuple(size):
        cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)
    return cam


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    target_layer: str,
    class_index: int | Sequence[int] | torch.Tensor | None = None,
    *,
    create_graph: bool = False,
    forward_args: Sequence[Any] = (),
    forward_kwargs: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``images`` and return ``(logits, cam)`` with a per-sample target class.

    Under ``torch.no_grad`` (e.g. in an evaluator) only the part of the network after ``target_layer`` is
    recorded, so the maps cost about one inference forward and the returned cam is not connected to the
    parameters; with gradients enabled, logits and cam stay on the full graph. The model's mode and parameter
    gradients are left as they are.

    Args:
        model: any ``nn.Module``; ``target_layer`` names one of its sub-modules.
        images: (B, C, H, W) input batch.
        target_layer: ``named_modules()`` name of the layer whose output is explained.
        class_index: a tensor / list of B class indices, one int for all, or None for the arg-max per sample.
        create_graph: differentiate through the Grad-CAM channel weights too.
        forward_args: further positional inputs of the model after the images (e.g. encoded metadata of a
            fused image + metadata model); the cam explains the image branch.
        forward_kwargs: further keyword inputs of the model.

    Returns:
        logits (B, num_classes) and cam (B, 1, H, W), raw (see :func:`cam_from_activations`).
    """
    layer = resolve_layer(model, target_layer)
    grad_mode = torch.is_grad_enabled()
    with ActivationCapture(layer, grad_from_layer=not grad_mode) as capture:
        try:
            logits = model(images, *forward_args, **(forward_kwargs or {}))
        finally:
            torch.set_grad_enabled(grad_mode)
        acts = capture.pop()
    if acts is None:
        raise RuntimeError(f"layer {target_layer!r} was not called during the forward pass")
    with torch.enable_grad():
        cam = cam_from_activations(
            acts, target_scores(logits, class_index), images.shape[-2:], create_graph=create_graph
        )
    return logits, cam


def normalize_cam(cam: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample min-max normalisation of (B, 1, H, W) maps to [0, 1]."""
    flat = cam.flatten(1)
    lo = flat.amin(1).view(-1, *([1] * (cam.ndim - 1)))
    hi = flat.amax(1).view(-1, *([1] * (cam.ndim - 1)))
    return (cam - lo) / (hi - lo + eps)


def soft_mask(cam: torch.Tensor, sigma: float = 0.5, omega: float = 10.0) -> torch.Tensor:
    """GAIN's soft threshold ``T(A) = sigmoid(omega * (A - sigma))`` of a normalised cam."""
    return torch.sigmoid(omega * (cam - sigma))


def erase(images: torch.Tensor, mask: torch.Tensor, fill: float | Sequence[float] | torch.Tensor = 0.0) -> torch.Tensor:
    """Erase the attended region: ``I - T*I + T*fill``.

    Args:
        images: (B, C, H, W).
        mask: (B, 1, H, W) soft mask in [0, 1].
        fill: a scalar or a per-channel colour (C,), e.g. the mean lesion colour.
    """
    fill_t = torch.as_tensor(fill, dtype=images.dtype, device=images.device)
    if fill_t.ndim == 1:
        fill_t = fill_t.view(1, -1, 1, 1)
    mask = mask.to(images.dtype)
    return images - mask * images + mask * fill_t


def mean_roi_color(
    loader_or_dataset: Iterable[dict[str, Any]], image_key: str = "image", mask_key: str = "mask"
) -> torch.Tensor:
    """Mean colour inside the lesion masks of a data set (GAIN's erase fill colour).

    Args:
        loader_or_dataset: a dataset of dict samples ((C, H, W) image, (1, H, W) mask) or a DataLoader of
            batched dicts ((B, C, H, W), (B, 1, H, W)).
        image_key: key of the image.
        mask_key: key of the binary mask.

    Returns:
        (C,) float32 tensor: sum(image * mask) / sum(mask) per channel.

    Raises:
        ValueError: when no mask has any lesion pixel.
    """
    total: torch.Tensor | None = None
    count = 0.0
    for item in loader_or_dataset:
        image = torch.as_tensor(item[image_key]).float()
        mask = torch.as_tensor(item[mask_key]).float()
        if image.ndim == 3:
            image, mask = image[None], mask[None]
        sums = (image * mask).sum(dim=(0, 2, 3))
        total = sums if total is None else total + sums
        count += float(mask.sum())
    if total is None or count == 0:
        raise ValueError("mean_roi_color: no lesion pixel in any mask of the data set")
    return total / count
