"""Binary focal loss on the log-odds of a two-logit (softmax) classifier."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import sigmoid_focal_loss

__all__ = ["LogOddsFocalLoss"]


class LogOddsFocalLoss(nn.Module):
    """Focal loss (Lin et al., ICCV 2017) of a binary classifier with two softmax logits (or one logit).

    The positive class's probability of a two-logit softmax is ``sigmoid(logit_1 - logit_0)``, so the sigmoid
    focal loss is taken on that log-odds: the loss of the binary task, while the network keeps the two outputs
    that Grad-CAM, GAIN and the metrics expect.

    Args:
        alpha: weight of the positive class in [0, 1] (negatives get ``1 - alpha``), or a negative value for none.
        gamma: focusing exponent (0: weighted cross-entropy).
        reduction: "mean", "sum" or "none".
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean") -> None:
        super().__init__()
        if alpha > 1:
            raise ValueError(f"LogOddsFocalLoss: alpha must be <= 1 (negative: no weighting), got {alpha}")
        if gamma < 0:
            raise ValueError(f"LogOddsFocalLoss: gamma must be >= 0, got {gamma}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"LogOddsFocalLoss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.alpha, self.gamma, self.reduction = float(alpha), float(gamma), reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args: logits (B, 2) or (B, 1) / (B,); target (B,) or (B, 1) class indices (non-zero: positive)."""
        logits = logits.reshape(logits.shape[0], -1)
        if logits.shape[1] == 2:
            log_odds = logits[:, 1] - logits[:, 0]
        elif logits.shape[1] == 1:
            log_odds = logits[:, 0]
        else:
            raise ValueError(f"LogOddsFocalLoss: expects 1 or 2 logits per sample, got {logits.shape[1]}")
        target = target.reshape(-1)
        if target.numel() != log_odds.numel():
            raise ValueError(f"LogOddsFocalLoss: {target.numel()} targets for {log_odds.numel()} samples")
        positive = (target != 0).to(log_odds.dtype)
        return sigmoid_focal_loss(log_odds, positive, alpha=self.alpha, gamma=self.gamma, reduction=self.reduction)
