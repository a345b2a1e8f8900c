"""Losses of the recurrent glimpse model: classification (aggregate and per glimpse), rank, and location.

The location loss follows the mask seen through each glimpse: ``alpha * L_area + (1 - alpha) * L_distance``
with ``L_area = -ln(tumour mass inside the glimpse / glimpse area)`` (it rewards glimpses filled with tumour,
hence zooming in) and ``L_distance`` the distance of the glimpse centre to the nearest tumour pixel over the
image size (a gradient that reaches glimpses lying far from any tumour, where the area term is flat).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medgain.losses.gain import target_probability
from medgain.networks.glimpse import GlimpseOutput, gaussian_glimpses, glimpse_geometry

__all__ = [
    "GlimpseLoss",
    "area_location_loss",
    "distance_location_loss",
    "glimpse_classification_loss",
    "glimpse_mask_fraction",
    "glimpse_rank_loss",
    "glimpse_step_loss",
    "location_loss",
]


def _as_mask(mask: torch.Tensor, batch: int) -> torch.Tensor:
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.ndim != 4 or mask.shape[0] != batch or mask.shape[1] != 1:
        raise ValueError(f"tumour masks must be (B={batch}, 1, H, W) or (B, H, W), got shape {tuple(mask.shape)}")
    return mask.float()


def glimpse_mask_fraction(mask: torch.Tensor, output: GlimpseOutput) -> torch.Tensor:
    """Fraction of each glimpse covered by tumour, (B, G) in [0, 1]: the mask read through the same Gaussian
    filter banks as the image (parts of a glimpse outside the image count as tumour-free).

    Args:
        mask: (B, 1, H, W) or (B, H, W) binary tumour masks at the network input size.
        output: the network output holding the glimpse locations.
    """
    mask = _as_mask(mask, output.centers.shape[0])
    pixels, strides, sigmas = glimpse_geometry(
        output.centers, output.scales, mask.shape[2], mask.shape[3], output.glimpse_size, output.sigma_ratio
    )
    glimpses = gaussian_glimpses(mask, pixels, strides, sigmas, output.glimpse_size)
    return glimpses.flatten(2).mean(2).clamp(0.0, 1.0)


def area_location_loss(fraction: torch.Tensor, tumour: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Mean over tumour images and glimpses of ``-ln(fraction + eps)``; 0 without tumour images.

    Args:
        fraction: (B, G) tumour fraction of each glimpse (:func:`glimpse_mask_fraction`).
        tumour: (B,) bool, the images that count (tumour images with a mask).
        eps: keeps the loss finite (at most ``-ln(eps)``) on glimpses without tumour.
    """
    keep = tumour.reshape(-1).bool()
    if not keep.any():
        return fraction.new_zeros(())
    return -torch.log(fraction[keep] + eps).mean()


def distance_location_loss(centers: torch.Tensor, mask: torch.Tensor, tumour: torch.Tensor) -> torch.Tensor:
    """Mean over tumour images and glimpses of the distance from the glimpse centre to the nearest tumour pixel,
    divided by the longer image side (0 for a centre on the tumour); 0 without tumour images.

    Args:
        centers: (B, G, 2) glimpse centres (x, y) in [-1, 1].
        mask: (B, 1, H, W) or (B, H, W) binary tumour masks.
        tumour: (B,) bool, the images that count; each must have a non-empty mask.

    Raises:
        ValueError: when a counted image has an empty mask.
    """
    mask = _as_mask(mask, centers.shape[0])[:, 0] > 0.5
    keep = torch.nonzero(tumour.reshape(-1).bool()).reshape(-1).tolist()
    if not keep:
        return centers.new_zeros(())
    h, w = mask.shape[1:]
    # boundary pixels (tumour pixels with a non-tumour 4-neighbour, or on the image edge) hold every nearest point
    padded = F.pad(mask[:, None].float(), (1, 1, 1, 1), value=0.0)
    eroded = -F.max_pool2d(-padded, 3, stride=1)[:, 0] > 0.5
    boundary = mask & ~eroded
    extent = centers.new_tensor([w - 1, h - 1])
    distances = []
    for b in keep:
        points = torch.nonzero(boundary[b]).flip(1).to(centers.dtype)  # (P, 2) as (x, y)
        if points.shape[0] == 0:
            raise ValueError(f"distance_location_loss: image {b} of the batch counts as tumour but its mask is empty")
        pixels = (centers[b] + 1.0) * 0.5 * extent  # (G, 2)
        nearest = ((pixels[:, None, :] - points[None]) ** 2).sum(-1).amin(1)
        cols, rows = pixels.detach().round().long().unbind(1)
        inside = mask[b, rows.clamp(0, h - 1), cols.clamp(0, w - 1)]
        distances.append(torch.where(inside, torch.zeros_like(nearest), torch.sqrt(nearest + 1e-12)))
    return torch.stack(distances).mean() / max(h, w)


def location_loss(
    output: GlimpseOutput, mask: torch.Tensor, tumour: torch.Tensor, alpha: float = 0.5, eps: float = 1e-4
) -> dict[str, torch.Tensor]:
    """``alpha * L_area + (1 - alpha) * L_distance`` over the tumour images; normal images add nothing.

    Returns:
        ``{"location", "area", "distance"}`` scalar tensors.

    Raises:
        ValueError: when ``alpha`` is outside [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"location loss alpha must be in [0, 1], got {alpha}")
    area = area_location_loss(glimpse_mask_fraction(mask, output), tumour, eps)
    distance = distance_location_loss(output.centers, mask, tumour)
    return {"location": alpha * area + (1.0 - alpha) * distance, "area": area, "distance": distance}


def glimpse_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy of (B, C) or per-glimpse (B, G, C) logits against (B,) class indices (mean over all)."""
    labels = labels.reshape(-1).long()
    if logits.ndim == 3:
        return F.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(logits.shape[1]))
    return F.cross_entropy(logits, labels)


def glimpse_rank_loss(glimpse_logits: torch.Tensor, labels: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Penalty on a true-class probability that decreases from one glimpse to the next:
    mean of ``relu(p_t - p_{t+1} + margin)`` over samples and steps.

    Args:
        glimpse_logits: (B, G) single-logit or (B, G, C) per-glimpse logits, G >= 2.
        labels: (B,) class indices.
        margin: required increase per step.
    """
    b, g = glimpse_logits.shape[:2]
    if g < 2:
        return glimpse_logits.new_zeros(())
    labels = labels.reshape(-1).long().repeat_interleave(g)
    p = target_probability(glimpse_logits.reshape(b * g, -1), labels).reshape(b, g)
    return F.relu(p[:, :-1] - p[:, 1:] + margin).mean()


def glimpse_step_loss(centers: torch.Tensor, min_step: float) -> torch.Tensor:
    """Inhibition of return: mean over samples and steps of ``relu(min_step - d_t)``, ``d_t`` the distance
    between the centres of glimpses ``t - 1`` and ``t`` as a fraction of the image side.

    The location loss alone lets every glimpse after the first settle on the same tumour spot; this term makes each
    glimpse look somewhere new (on the tumour, when combined with the location loss).

    Args:
        centers: (B, G, 2) glimpse centres (x, y) in [-1, 1] (a side spans 2).
        min_step: smallest step, as a fraction of the side, that costs nothing.
    """
    if centers.shape[1] < 2:
        return centers.new_zeros(())
    steps = (centers[:, 1:] - centers[:, :-1]).pow(2).sum(-1).add(1e-12).sqrt() / 2.0
    return F.relu(min_step - steps).mean()


class GlimpseLoss(nn.Module):
    """Total loss of :class:`~medgain.networks.RecurrentGlimpseNetwork`.

    ``loss = CE(aggregate) + per_glimpse_weight * CE(per glimpse) + rank_weight * rank
    + location_weight * location_decay ** epoch * location + step_weight * step``, the location term counting only
    tumour images (label != 0) that carry a non-empty mask, the step term (:func:`glimpse_step_loss`) every image.

    Args:
        per_glimpse_weight: weight of the per-glimpse cross entropy.
        rank_weight: weight of :func:`glimpse_rank_loss` (0 = off).
        location_weight: weight of the location loss (0 = no location supervision).
        alpha: share of the area term in the location loss (1 = area only, 0 = distance only).
        location_decay: per-epoch factor of the location weight (1 = constant, the default).
        rank_margin: margin of the rank loss.
        eps: floor of the area term's logarithm.
        step_weight: weight of :func:`glimpse_step_loss` (0 = off).
        min_step: smallest free step between successive glimpse centres, as a fraction of the image side.

    Raises:
        ValueError: on negative weights, ``alpha`` outside [0, 1], ``location_decay`` outside (0, 1] or
            ``min_step`` outside [0, 1].
    """

    def __init__(
        self,
        per_glimpse_weight: float = 1.0,
        rank_weight: float = 0.0,
        location_weight: float = 1.0,
        alpha: float = 0.5,
        location_decay: float = 1.0,
        rank_margin: float = 0.0,
        eps: float = 1e-4,
        step_weight: float = 0.0,
        min_step: float = 0.15,
    ) -> None:
        super().__init__()
        if min(per_glimpse_weight, rank_weight, location_weight, step_weight) < 0:
            raise ValueError(
                f"loss weights must be >= 0, got per_glimpse_weight={per_glimpse_weight}, "
                f"rank_weight={rank_weight}, location_weight={location_weight}, step_weight={step_weight}"
            )
        if not 0.0 <= min_step <= 1.0:
            raise ValueError(f"min_step must be in [0, 1] (a fraction of the image side), got {min_step}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not 0.0 < location_decay <= 1.0:
            raise ValueError(f"location_decay must be in (0, 1], got {location_decay}")
        self.per_glimpse_weight = float(per_glimpse_weight)
        self.rank_weight = float(rank_weight)
        self.location_weight = float(location_weight)
        self.alpha = float(alpha)
        self.location_decay = float(location_decay)
        self.rank_margin = float(rank_margin)
        self.eps = float(eps)
        self.step_weight = float(step_weight)
        self.min_step = float(min_step)

    def location_scale(self, epoch: int) -> float:
        """Weight of the location term at ``epoch`` (0-based)."""
        return self.location_weight * self.location_decay**epoch

    def forward(
        self,
        output: GlimpseOutput,
        labels: torch.Tensor,
        mask: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
        epoch: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Loss terms ``{"loss", "classification", "per_glimpse", "rank", "step", "location", "area", "distance"}``.

        Args:
            output: the network output.
            labels: (B,) or (B, 1) class indices (0 = normal).
            mask: (B, 1, H, W) tumour masks at the input size; None for no location term.
            has_mask: (B,) bool, which masks are real; None means all.
            epoch: 0-based epoch, for ``location_decay``.
        """
        labels = labels.reshape(-1).long().to(output.logits.device)
        terms = {
            "classification": glimpse_classification_loss(output.logits, labels),
            "per_glimpse": glimpse_classification_loss(output.glimpse_logits, labels),
            "rank": glimpse_rank_loss(output.glimpse_logits, labels, self.rank_margin),
            "step": glimpse_step_loss(output.centers, self.min_step),
        }
        zero = output.logits.new_zeros(())
        weight = self.location_scale(epoch)
        if mask is not None and weight > 0:
            mask = _as_mask(mask, labels.shape[0]).to(output.centers.device)
            tumour = (labels != 0) & (mask.flatten(1).amax(1) > 0.5)
            if has_mask is not None:
                tumour &= has_mask.reshape(-1).bool().to(tumour.device)
            terms |= location_loss(output, mask, tumour, self.alpha, self.eps)
        else:
            terms |= {"location": zero, "area": zero, "distance": zero}
        terms["loss"] = (
            terms["classification"]
            + self.per_glimpse_weight * terms["per_glimpse"]
            + self.rank_weight * terms["rank"]
            + self.step_weight * terms["step"]
            + weight * terms["location"]
        )
        return terms
