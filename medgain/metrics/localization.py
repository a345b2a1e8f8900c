"""Is the attention on the lesion? Per-sample localisation scores of Grad-CAM maps against lesion masks."""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod
from typing import Any

import torch
from monai.metrics import CumulativeIterationMetric, compute_iou

from medgain.attention import normalize_cam
from medgain.metrics.scores import binary_labels, output_items, stack_output

__all__ = [
    "AttentionIoUMetric",
    "AttentionInMaskMetric",
    "attention_in_mask",
    "attention_inputs",
    "attention_iou",
]


def _check_shapes(name: str, cam: torch.Tensor, mask: torch.Tensor) -> None:
    if cam.ndim < 3 or cam.shape[1] != 1 or tuple(cam.shape) != tuple(mask.shape):
        raise ValueError(
            f"{name}: cam and mask must both be (B, 1, H, W) of the same size, got cam {tuple(cam.shape)} and "
            f"mask {tuple(mask.shape)}"
        )


def attention_iou(cam: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-sample IoU of the attended region ``normalize_cam(cam) >= threshold`` with the lesion ``mask > 0.5``.

    Args:
        cam: (B, 1, H, W) attention maps (raw Grad-CAM; normalised per sample here).
        mask: (B, 1, H, W) lesion masks.
        threshold: level of the normalised cam above which a pixel counts as attended.

    Returns:
        (B,) float IoU; 1 where both regions are empty (MONAI's ``compute_iou`` convention).

    Raises:
        ValueError: when the shapes of ``cam`` and ``mask`` differ.
    """
    _check_shapes("attention_iou", cam, mask)
    attended = (normalize_cam(cam.detach().float()) >= threshold).float()
    lesion = (mask.detach() > 0.5).float()
    return compute_iou(attended, lesion, ignore_empty=False)[:, 0]


def attention_in_mask(cam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample fraction of the attention energy inside the lesion: ``sum(cam * mask) / sum(cam)``.

    Args:
        cam: (B, 1, H, W) raw, non-negative attention maps.
        mask: (B, 1, H, W) lesion masks, binarised at 0.5.

    Returns:
        (B,) float in [0, 1]; 0 where the cam is all zero.

    Raises:
        ValueError: when the shapes differ or the cam has negative values.
    """
    _check_shapes("attention_in_mask", cam, mask)
    cam = cam.detach().float().flatten(1)
    if (cam < 0).any():
        raise ValueError(f"attention_in_mask: the cam must be non-negative (raw Grad-CAM), min is {cam.min().item()}")
    inside = (cam * (mask.detach().flatten(1) > 0.5)).sum(1)
    total = cam.sum(1)
    return inside / torch.where(total > 0, total, torch.ones_like(total))


def attention_inputs(
    output: Any,
    cam_key: str = "cam",
    mask_key: str = "mask",
    has_mask_key: str = "has_mask",
    label_key: str = "label",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output transform: ``(cam, mask, include)`` from an evaluator output (see ``GradCamInferer``).

    ``include`` (B,) marks the samples the localisation is scored on: ill samples (label != 0) that have a real
    mask, i.e. ``has_mask`` when the output holds it, otherwise a mask with a foreground pixel. A batch
    without masks gives all-zero masks and no included sample.

    Args:
        output: ``engine.state.output``, a dict of batched tensors or a decollated list of per-sample dicts.
        cam_key: key of the (B, 1, H, W) attention maps.
        mask_key: key of the (B, 1, H, W) lesion masks.
        has_mask_key: key of the (B,) flags telling which masks are real.
        label_key: key of the class indices (0 = healthy).

    Raises:
        KeyError: when the output lacks ``cam_key`` or ``label_key``.
    """
    hint = "; use medgain.handlers.cam_inferer.GradCamInferer as the evaluator's inferer and attach it"
    items = output_items(output, (cam_key, label_key), "attention_inputs", hint)
    cam, labels = stack_output(output, (cam_key, label_key))
    include = binary_labels(labels).bool()
    if all(mask_key in item for item in items):
        (mask,) = stack_output(output, (mask_key,))
        mask = mask.to(cam.device)
        if all(has_mask_key in item for item in items):
            (has_mask,) = stack_output(output, (has_mask_key,))
            real = has_mask.reshape(-1).bool()
        else:
            real = (mask.flatten(1) > 0.5).any(1)
    else:
        mask = torch.zeros_like(cam)
        real = torch.zeros_like(include)
    return cam, mask, include & real.to(include.device)


class _LocalizationMetric(CumulativeIterationMetric):
    """Accumulates a per-sample localisation score and an inclusion flag; ``aggregate()`` is the mean score over
    the included samples."""

    @abstractmethod
    def _score(self, cam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-sample (B,) score of a batch."""

    def __call__(  # type: ignore[override]
        self,
        y_pred: torch.Tensor | list[torch.Tensor],
        y: torch.Tensor | list[torch.Tensor],
        include: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Score a batch and add it to the buffers.

        Args:
            y_pred: (B, 1, H, W) attention maps, or a list of (1, H, W) ones.
            y: (B, 1, H, W) lesion masks, or a list of (1, H, W) ones.
            include: (B,) samples to average over; None includes the masks with a foreground pixel.
        """
        if isinstance(y_pred, (list, tuple)):
            y_pred = torch.stack(list(y_pred))
        if isinstance(y, (list, tuple)):
            y = torch.stack(list(y))
        return super().__call__(y_pred=y_pred, y=y, include=include)

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor, include: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        scores = self._score(y_pred, y)
        if include is None:
            include = (y.flatten(1) > 0.5).any(1)
        include = torch.as_tensor(include, device=scores.device).reshape(-1)
        if include.numel() != scores.numel():
            raise ValueError(
                f"{type(self).__name__}: include has {include.numel()} entries for {scores.numel()} samples"
            )
        return [scores, include.float()]

    def aggregate(self) -> float:  # type: ignore[override]
        """Mean score over the included samples; NaN with a warning when no sample was included."""
        buffers = self.get_buffer()
        if buffers is not None and bool((buffers[1] > 0).any()):
            scores, include = buffers
            return float(scores[include > 0].mean())
        warnings.warn(
            f"{type(self).__name__}: no ill sample with a lesion mask was seen, returning NaN.", stacklevel=2
        )
        return math.nan


class AttentionIoUMetric(_LocalizationMetric):
    """Mean :func:`attention_iou` over the included samples (ill samples with a real lesion mask).

    Args:
        threshold: level of the normalised cam above which a pixel counts as attended.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = float(threshold)

    def _score(self, cam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return attention_iou(cam, mask, self.threshold)


class AttentionInMaskMetric(_LocalizationMetric):
    """Mean :func:`attention_in_mask` over the included samples (ill samples with a real lesion mask)."""

    def _score(self, cam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return attention_in_mask(cam, mask)
