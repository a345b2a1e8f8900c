"""Batched input-space saliency: vanilla gradient, guided backpropagation, SmoothGrad and Grad-CAM.

Every source takes a whole batch with a target class per sample and follows the contract of
:func:`medgain.attention.grad_cam`: the model's mode is not switched, the hooks it needs are removed on return,
and no parameter ``.grad`` is touched (gradients are taken with ``torch.autograd.grad`` w.r.t. the input only).
Per-sample maps assume that samples do not interact inside the network (eval-mode BatchNorm), as for Grad-CAM;
SmoothGrad noise is drawn per sample (:func:`sample_noise_seeds`), so a sample gets the same map in any batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from medgain.attention import grad_cam, target_scores

__all__ = [
    "GUIDED_ACTIVATIONS",
    "SALIENCY_SOURCES",
    "guided_backprop",
    "input_gradient",
    "saliency_map",
    "sample_noise_seeds",
    "smooth_grad",
    "target_class",
]

#: activation modules that guided backpropagation handles: the backward pass lets only positive gradients
#: through them, gated by the activation's own derivative (1 on 0 < x for ReLU, on 0 < x < 6 for ReLU6).
GUIDED_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)

# ReLU replacements on which the guided rule is undefined (their derivative is not a 0/1 gate): refused.
_UNGUIDED_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Mish,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Softplus,
)

#: the ``source`` names accepted by :func:`saliency_map`.
SALIENCY_SOURCES: tuple[str, ...] = ("gradient", "guided_backprop", "smoothgrad", "smoothgrad_guided", "grad_cam")


def _clamp_negative_grad(grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp(min=0)


def _guide_hook(module: nn.Module, inputs: object, output: object) -> None:
    if isinstance(output, torch.Tensor) and output.requires_grad:
        output.register_hook(_clamp_negative_grad)


@contextmanager
def _guided(model: nn.Module) -> Iterator[None]:
    """Within the block, gradients flowing back into every ReLU / ReLU6 module output are clamped at zero."""
    refused = [(name, type(m).__name__) for name, m in model.named_modules() if isinstance(m, _UNGUIDED_ACTIVATIONS)]
    if refused:
        raise ValueError(
            f"guided backpropagation is defined for ReLU / ReLU6 activations only; {type(model).__name__} has "
            f"{refused[:5]}{' ...' if len(refused) > 5 else ''}: use source 'gradient', 'smoothgrad' or 'grad_cam'"
        )
    handles = [m.register_forward_hook(_guide_hook) for m in model.modules() if isinstance(m, GUIDED_ACTIVATIONS)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(f"saliency: expected a (B, C, H, W) batch, got shape {tuple(images.shape)}")


def _class_index(
    class_index: int | Sequence[int] | torch.Tensor | None, batch: int, device: torch.device
) -> torch.Tensor | None:
    if class_index is None:
        return None
    idx = torch.as_tensor(class_index, device=device).long().reshape(-1)
    if idx.numel() == 1:
        idx = idx.expand(batch)
    if idx.numel() != batch:
        raise ValueError(f"saliency: class_index has {idx.numel()} entries for a batch of {batch}")
    return idx


def target_class(logits: torch.Tensor) -> torch.Tensor:
    """Arg-max class per sample; class 1 for a single-logit binary model (as :func:`target_scores`)."""
    logits = logits.reshape(logits.shape[0], -1)
    if logits.shape[1] == 1:
        return torch.ones(logits.shape[0], dtype=torch.long, device=logits.device)
    return logits.argmax(1)


def input_gradient(
    model: nn.Module,
    images: torch.Tensor,
    class_index: int | Sequence[int] | torch.Tensor | None = None,
    *,
    guided: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of each sample's target score (logit) w.r.t. its input pixels.

    Args:
        model: any ``nn.Module`` returning (B, num_classes) or (B,) logits.
        images: (B, C, H, W) input batch; not modified, its ``.grad`` is not touched.
        class_index: one class per sample (tensor / list), one int for all, or None for the arg-max per sample
            (see :func:`medgain.attention.target_scores`).
        guided: guided backpropagation: the gradient flowing back into every ``nn.ReLU`` / ``nn.ReLU6`` module
            is clamped at zero (then gated by the activation's derivative), as Captum's ``GuidedBackprop`` does
            for ``nn.ReLU``. Activations called as functions (``F.relu``) are not seen and keep their ordinary
            gradient; sigmoid / tanh gates too.

    Returns:
        ``(logits, gradient)``: detached logits and the (B, C, H, W) signed gradient, in the input's dtype.

    Raises:
        ValueError: for a batch that is not 4-D, a wrong number of classes, or ``guided`` on a model with an
            activation on which the guided rule is undefined (SiLU, GELU, Hardswish, LeakyReLU, ...).
    """
    _check_images(images)
    idx = _class_index(class_index, images.shape[0], images.device)
    x = images.detach().requires_grad_(True)
    guard = _guided(model) if guided else nullcontext()
    with guard, torch.enable_grad():
        logits = model(x)
        (grad,) = torch.autograd.grad(target_scores(logits, idx).sum(), x)
    return logits.detach(), grad


def guided_backprop(
    model: nn.Module, images: torch.Tensor, class_index: int | Sequence[int] | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided backpropagation (Springenberg et al. 2015): :func:`input_gradient` with ``guided=True``."""
    return input_gradient(model, images, class_index, guided=True)


def _noise_key(image: torch.Tensor) -> bytes:
    """Content key of one (C, H, W) image: its shape, dtype and the bytes of its values."""
    values = image.detach().contiguous().cpu().flatten().view(torch.uint8).numpy().tobytes()
    return f"{tuple(image.shape)}/{image.dtype}/".encode() + values


def sample_noise_seeds(
    images: torch.Tensor, seed: int = 0, sample_keys: Sequence[int] | torch.Tensor | None = None
) -> list[int]:
    """The seed of each sample's SmoothGrad noise generator: a function of ``seed`` and of the sample alone.

    A sample is identified by its key: the caller's ``sample_keys`` entry (e.g. its index in the data set) or, by
    default, the exact content of the image (shape, dtype and value bytes), never its position in the batch. The
    same image with the same seed therefore gets the same noise alone, in any batch and at any position, and two
    different images get independent noise. The generator seed is the first 63 bits of the BLAKE2b hash of
    ``seed`` and the key.

    Args:
        images: (B, C, H, W) batch.
        seed: seed shared by the batch.
        sample_keys: one integer per sample, or None to key each sample by its content (this copies the batch to
            the host once).

    Returns:
        B non-negative seeds, in batch order.

    Raises:
        ValueError: for a batch that is not 4-D, or ``sample_keys`` that are not B integers.
    """
    _check_images(images)
    if sample_keys is None:
        keys = [_noise_key(image) for image in images]
    else:
        given = torch.as_tensor(sample_keys).reshape(-1)
        if given.is_floating_point() or given.is_complex() or given.dtype == torch.bool:
            raise ValueError(f"saliency: sample_keys must be integers, got dtype {given.dtype}")
        if given.numel() != images.shape[0]:
            raise ValueError(f"saliency: sample_keys has {given.numel()} entries for a batch of {images.shape[0]}")
        keys = [f"key/{int(k)}".encode() for k in given.tolist()]
    digests = (hashlib.blake2b(f"{int(seed)}/".encode() + key, digest_size=8).digest() for key in keys)
    return [int.from_bytes(d, "little") & (2**63 - 1) for d in digests]


def smooth_grad(
    model: nn.Module,
    images: torch.Tensor,
    class_index: int | Sequence[int] | torch.Tensor | None = None,
    *,
    n_samples: int = 16,
    noise: float = 0.15,
    guided: bool = False,
    chunk_size: int = 64,
    seed: int = 0,
    sample_keys: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017): the mean gradient over ``n_samples`` noisy copies of each image.

    The B x ``n_samples`` copies are evaluated in chunks of ``chunk_size`` taken across the whole batch, so a
    small batch with many copies fills each forward as well as a large one. The noise is Gaussian with standard
    deviation ``noise * (max - min)`` of each image. Each sample draws its copies, one ``randn(C, H, W)`` after
    the other, from its own generator on the images' device, seeded by :func:`sample_noise_seeds` from ``seed``
    and the sample's key (its content by default): a sample's map depends on the seed and on the sample alone,
    not on the rest of the batch, its position in it or the chunk size.

    Args:
        model: any ``nn.Module`` returning logits.
        images: (B, C, H, W) input batch.
        class_index: per-sample target classes (see :func:`input_gradient`); None takes the arg-max of the
            clean image, the same class for all its copies.
        n_samples: noisy copies per image, at least 1.
        noise: noise level as a fraction of each image's value range, >= 0.
        guided: average guided-backpropagation gradients instead of plain ones.
        chunk_size: copies per forward / backward pass.
        seed: seed of the noise.
        sample_keys: one integer per sample identifying it (e.g. its index in the data set), or None to key
            each sample by its content (see :func:`sample_noise_seeds`).

    Returns:
        (B, C, H, W) averaged signed gradient.

    Raises:
        ValueError: for invalid ``n_samples``, ``noise``, ``chunk_size`` or ``sample_keys``, or see
            :func:`input_gradient`.
    """
    _check_images(images)
    if n_samples < 1 or chunk_size < 1 or not noise >= 0.0:
        raise ValueError(
            f"smooth_grad: needs n_samples >= 1, chunk_size >= 1 and noise >= 0, got n_samples={n_samples}, "
            f"chunk_size={chunk_size}, noise={noise}"
        )
    batch = images.shape[0]
    idx = _class_index(class_index, batch, images.device)
    generators = [
        torch.Generator(device=images.device).manual_seed(s) for s in sample_noise_seeds(images, seed, sample_keys)
    ]
    if idx is None:
        with torch.no_grad():
            idx = target_class(model(images))
    flat = images.detach().flatten(1)
    sigma = (noise * (flat.amax(1) - flat.amin(1))).view(-1, 1, 1, 1)
    owner = torch.arange(batch, device=images.device).repeat_interleave(n_samples)
    owners = owner.tolist()
    total = torch.zeros_like(images, dtype=torch.promote_types(images.dtype, torch.float32))
    for start in range(0, owner.numel(), chunk_size):
        rows = owner[start : start + chunk_size]
        eps = torch.stack(
            [
                torch.randn(images.shape[1:], generator=generators[i], device=images.device, dtype=images.dtype)
                for i in owners[start : start + chunk_size]
            ]
        )
        _, grad = input_gradient(model, images.detach()[rows] + sigma[rows] * eps, idx[rows], guided=guided)
        total.index_add_(0, rows, grad.to(total.dtype))
    return (total / n_samples).to(images.dtype)


def saliency_map(
    model: nn.Module,
    images: torch.Tensor,
    class_index: int | Sequence[int] | torch.Tensor | None = None,
    source: str = "guided_backprop",
    *,
    target_layer: str | None = None,
    n_samples: int = 16,
    noise: float = 0.15,
    chunk_size: int = 64,
    seed: int = 0,
    sample_keys: Sequence[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One non-negative (B, 1, H, W) saliency map per sample from an interchangeable source.

    Gradient sources are reduced over channels as ``max_c |gradient|`` (Simonyan et al. 2014); Grad-CAM is
    :func:`medgain.attention.grad_cam` up-sampled to the input size. Maps are raw (not normalised).

    Args:
        model: any ``nn.Module`` returning logits.
        images: (B, C, H, W) input batch.
        class_index: per-sample target classes, one int for all, or None for the arg-max per sample.
        source: one of :data:`SALIENCY_SOURCES`: ``gradient``, ``guided_backprop``, ``smoothgrad`` (of the plain
            gradient), ``smoothgrad_guided`` (of guided backpropagation) or ``grad_cam``.
        target_layer: ``named_modules()`` name of the Grad-CAM layer (required for ``grad_cam``).
        n_samples: SmoothGrad copies per image.
        noise: SmoothGrad noise level (fraction of each image's value range).
        chunk_size: SmoothGrad copies per pass.
        seed: SmoothGrad noise seed.
        sample_keys: SmoothGrad: one integer per sample identifying it, or None to key each sample's noise by
            its content (see :func:`sample_noise_seeds`); ignored by the other sources.

    Returns:
        ``(logits, saliency)``: detached logits of the clean images (B, num_classes) and (B, 1, H, W) maps.

    Raises:
        ValueError: for an unknown source, ``grad_cam`` without a target layer, or see the sources.
    """
    if source not in SALIENCY_SOURCES:
        raise ValueError(f"saliency_map: unknown source {source!r}; expected one of {SALIENCY_SOURCES}")
    _check_images(images)
    if source == "grad_cam":
        if target_layer is None:
            raise ValueError("saliency_map: source 'grad_cam' needs a target_layer")
        with torch.no_grad():
            logits, cam = grad_cam(model, images, target_layer, class_index)
        return logits.detach(), cam.detach()
    if source in ("gradient", "guided_backprop"):
        logits, grad = input_gradient(model, images, class_index, guided=source == "guided_backprop")
    else:
        with torch.no_grad():
            logits = model(images)
        idx = target_class(logits) if class_index is None else class_index
        grad = smooth_grad(
            model,
            images,
            idx,
            n_samples=n_samples,
            noise=noise,
            guided=source == "smoothgrad_guided",
            chunk_size=chunk_size,
            seed=seed,
            sample_keys=sample_keys,
        )
    return logits.detach(), grad.abs().amax(1, keepdim=True)
