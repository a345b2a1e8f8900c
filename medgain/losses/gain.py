"""GAIN loss terms: attention mining, extra supervision, attention-area bound, and a binary focal loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

__all__ = [
    "BinaryFocalLoss",
    "attention_area_loss",
    "attention_mining_loss",
    "extra_supervision_loss",
    "target_probability",
]


def target_probability(logits: torch.Tensor, class_index: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """Probability of each sample's target class, shape (N,).

    Softmax for multi-class logits; sigmoid for a single logit (class 1 → p, class 0 → 1 - p) and for
    multi-label logits (independent labels).

    Args:
        logits: (N, C) logits.
        class_index: (N,) target class per row.
        multilabel: treat the C logits as independent labels.
    """
    logits = logits.reshape(logits.shape[0], -1).float()
    idx = class_index.long().reshape(-1)
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0])
        return torch.where(idx == 0, 1.0 - p, p)
    probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
    return probs.gather(1, idx[:, None])[:, 0]


def attention_mining_loss(
    erased_logits: torch.Tensor, class_index: torch.Tensor, multilabel: bool = False
) -> torch.Tensor:
    """GAIN attention-mining loss: mean target-class probability on the erased images.

    The caller passes only the included rows (positives, or every sample); with no row the loss is 0, so a
    batch with exactly one positive is counted like any other.

    Args:
        erased_logits: (N, C) logits of the erased images.
        class_index: (N,) class whose evidence was erased.
        multilabel: sigmoid per label instead of softmax.
    """
    if erased_logits.shape[0] == 0:
        return erased_logits.new_zeros((), dtype=torch.float32)
    return target_probability(erased_logits, class_index, multilabel).mean()


def _check_mask(cam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.ndim == cam.ndim - 1:
        mask = mask.unsqueeze(1)
    if mask.shape != cam.shape:
        raise ValueError(
            f"lesion mask of shape {tuple(mask.shape)} does not match the attention map {tuple(cam.shape)}: "
            "masks must be (B, 1, H, W) at the network input size (resize them with the image, mode 'nearest')"
        )
    return mask.to(cam.dtype)


def extra_supervision_loss(cam: torch.Tensor, mask: torch.Tensor, has_mask: torch.Tensor | None = None) -> torch.Tensor:
    """GAIN extra supervision: pixel-wise mean squared error between the normalised cam and the lesion mask.

    Args:
        cam: (B, 1, H, W) normalised attention in [0, 1].
        mask: (B, 1, H, W) or (B, H, W) binary lesion mask.
        has_mask: (B,) bool, which samples carry a real mask; None means all. Samples without one do not
            count; with none the loss is 0.

    Raises:
        ValueError: when the mask size differs from the attention map's.
    """
    mask = _check_mask(cam, mask)
    if has_mask is not None:
        keep = has_mask.reshape(-1).bool()
        cam, mask = cam[keep], mask[keep]
    if cam.shape[0] == 0:
        return cam.new_zeros(())
    return F.mse_loss(cam, mask)


def attention_area_loss(mask: torch.Tensor, bounds: Sequence[float]) -> torch.Tensor:
    """Penalty on the soft-mask area outside a prior interval ``[lo, hi]``.

    The area of a sample is the mean of its soft mask; the loss is the mean over samples of the distance of
    that area to the interval (0 inside it).

    Args:
        mask: (B, 1, H, W) soft mask in [0, 1].
        bounds: (lo, hi) fractions of the image, e.g. around the mean lesion area of the training masks.
    """
    lo, hi = float(bounds[0]), float(bounds[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"area bounds must satisfy 0 <= lo <= hi <= 1, got {bounds}")
    if mask.shape[0] == 0:
        return mask.new_zeros(())
    area = mask.flatten(1).mean(1)
    return (F.relu(lo - area) + F.relu(area - hi)).mean()


class BinaryFocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al.) for a single logit or independent labels, usable as the classifier loss.

    Args:
        alpha: weight of the positive class in [0, 1], or a negative value for none.
        gamma: focusing exponent.
        reduction: "mean", "sum" or "none".
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean") -> None:
        super().__init__()
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args: logits (B, K) or (B,); target with the same number of elements (0/1 labels)."""
        target = target.reshape(logits.shape).to(logits.dtype)
        return sigmoid_focal_loss(logits, target, alpha=self.alpha, gamma=self.gamma, reduction=self.reduction)
