"""The unveiling loop and its mask smoothing; see :mod:`medgain.unveil`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from medgain.attention import erase
from medgain.saliency import SALIENCY_SOURCES, saliency_map, target_class

__all__ = [
    "STOP_REASONS",
    "UnveilResult",
    "Unveiler",
    "smooth_mask",
    "target_log_odds",
    "target_probability",
    "unveil",
]

#: why a sample's unveiling ended.
STOP_REASONS = ("below_threshold", "steps", "no_new_region", "initially_below", "probability_rose")


def smooth_mask(
    saliency: torch.Tensor, kernel_size: int = 11, iterations: int = 3, threshold: float = 0.5
) -> torch.Tensor:
    """Smooth saliency maps into coherent binary masks that follow the region's shape (the paper's rule).

    ``iterations`` times: mean over a ``kernel_size`` x ``kernel_size`` neighbourhood (a convolution with a
    ones kernel, zero padding; the 1 / k² scale cancels in the relative threshold), then threshold at
    ``threshold`` times the per-sample maximum of the averaged map. The first pass turns a sparse gradient map
    into a blob; the next ones (majority votes of the binary mask for ``threshold`` 0.5) fill holes and remove
    isolated pixels. A sample whose map is all zero gets an empty mask.

    Args:
        saliency: (B, 1, H, W) non-negative maps (any scale).
        kernel_size: odd side of the averaging window (paper: 11).
        iterations: number of average-and-threshold passes, >= 1 (paper: 3).
        threshold: level relative to the per-sample maximum, in (0, 1].

    Returns:
        (B, 1, H, W) bool masks.

    Raises:
        ValueError: for a map that is not (B, 1, H, W), an even or non-positive kernel, ``iterations`` < 1 or
            ``threshold`` outside (0, 1].
    """
    if saliency.ndim != 4 or saliency.shape[1] != 1:
        raise ValueError(f"smooth_mask: expected (B, 1, H, W) maps, got shape {tuple(saliency.shape)}")
    if kernel_size < 1 or kernel_size % 2 == 0 or iterations < 1 or not 0.0 < threshold <= 1.0:
        raise ValueError(
            "smooth_mask: needs an odd kernel_size >= 1, iterations >= 1 and threshold in (0, 1], got "
            f"kernel_size={kernel_size}, iterations={iterations}, threshold={threshold}"
        )
    # window sums in float64: exact on binary masks, so the threshold decides ties the same on every device
    kernel = torch.ones((1, 1, kernel_size, kernel_size), dtype=torch.float64, device=saliency.device)
    mask = saliency.detach().double()
    for _ in range(iterations):
        total = F.conv2d(mask, kernel, padding=kernel_size // 2)
        peak = total.flatten(1).amax(1).view(-1, 1, 1, 1)
        mask = ((total >= threshold * peak) & (peak > 0)).double()
    return mask.bool()


def target_log_odds(logits: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
    """Log-odds of each sample's target class, float64 (B,): ``z_t - logsumexp(z_others)`` for (B, C) logits
    (``z_1 - z_0`` for two classes, :func:`medgain.metrics.positive_score` for class 1), ``±l`` for a single
    logit ``l`` (class 1 / class 0). Unlike the probability it does not saturate."""
    logits = logits.detach().reshape(logits.shape[0], -1).double()
    if logits.shape[1] == 1:
        return torch.where(class_index == 0, -logits[:, 0], logits[:, 0])
    target = logits.gather(1, class_index.view(-1, 1))[:, 0]
    others = logits.scatter(1, class_index.view(-1, 1), float("-inf"))
    return target - torch.logsumexp(others, 1)


def target_probability(logits: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
    """Probability of each sample's target class (softmax, or sigmoid of a single logit), float64 (B,)."""
    return torch.sigmoid(target_log_odds(logits, class_index))


@dataclass
class UnveilResult:
    """The regions unveiled for one sample.

    Attributes:
        target: the explained class.
        initial_score: target log-odds (float64) of the untouched image.
        masks: one (H, W) bool mask per step (ROI 1, ROI 2, ...), disjoint, in the order found.
        scores: target log-odds after hiding ROI 1, ROIs 1-2, ... (one per mask); the stopping rule compares
            them with the log-odds of ``prob_threshold``.
        cumulative: (H, W) bool union of the masks.
        stop_reason: one of ``below_threshold`` (the probability fell below the threshold), ``steps`` (the step
            budget was used), ``no_new_region`` (the smoothed map found nothing outside the hidden area) or
            ``initially_below`` (the untouched image is already below the threshold: nothing to unveil) or
            ``probability_rose`` (hiding the next region raised the probability: that region is no evidence for
            the class, so it is not kept, and the unveiling ends there).
        rejected_score: for ``probability_rose``: the target log-odds with the rejected region hidden; else None.
    """

    target: int
    initial_score: float
    masks: list[torch.Tensor] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    cumulative: torch.Tensor | None = None
    stop_reason: str = "steps"
    rejected_score: float | None = None

    @property
    def steps(self) -> int:
        """Number of regions unveiled."""
        return len(self.masks)

    @property
    def initial_probability(self) -> float:
        """Target probability of the untouched image (for display)."""
        return _probability(self.initial_score)

    @property
    def probabilities(self) -> list[float]:
        """Target probability after each step (for display)."""
        return [_probability(s) for s in self.scores]

    @property
    def rejected_probability(self) -> float | None:
        """Target probability with the rejected region hidden (``probability_rose``), else None."""
        return None if self.rejected_score is None else _probability(self.rejected_score)

    @property
    def areas(self) -> list[float]:
        """Area of each region as a fraction of the image."""
        return [float(m.float().mean()) for m in self.masks]


def _probability(score: float) -> float:
    return 1.0 / (1.0 + math.exp(-score)) if score >= 0 else math.exp(score) / (1.0 + math.exp(score))


def _fill_values(images: torch.Tensor, fill: str | float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """(B, C, 1, 1) fill colour: each image's mean colour for ``"mean"``, else the constant / per-channel value."""
    if isinstance(fill, str):
        if fill != "mean":
            raise ValueError(f"unveil: fill must be 'mean', a number or one value per channel, got {fill!r}")
        return images.detach().mean(dim=(2, 3), keepdim=True)
    value = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(-1)
    if value.numel() not in (1, images.shape[1]):
        raise ValueError(f"unveil: fill has {value.numel()} values for {images.shape[1]} channels")
    return value.view(1, -1, 1, 1).expand(images.shape[0], images.shape[1], 1, 1)


def unveil(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    *,
    source: str = "guided_backprop",
    steps: int = 5,
    prob_threshold: float = 0.5,
    fill: str | float | Sequence[float] | torch.Tensor = "mean",
    kernel_size: int = 11,
    iterations: int = 3,
    threshold: float = 0.5,
    target_layer: str | None = None,
    n_samples: int = 16,
    noise: float = 0.15,
    chunk_size: int = 64,
    seed: int = 0,
    sample_keys: Sequence[int] | torch.Tensor | None = None,
) -> list[UnveilResult]:
    """Unveil, one after the other, the regions behind each sample's target class.

    At each step the still-active samples get a saliency map of their current (partly hidden) image; the map is
    restricted to the pixels not hidden yet and smoothed by :func:`smooth_mask` into the next region, which is
    hidden (``erase`` with a hard mask: filled with the fill colour) before the image is classified again. A
    sample stops on its own when its target probability drops below ``prob_threshold`` (compared as log-odds),
    when ``steps`` regions were unveiled, when no new region is found, or when hiding the region raised the
    probability (that region is not evidence: it is left out of the result); the batch goes on for the others. The
    model's mode and parameter gradients are left untouched (as for :func:`medgain.saliency.saliency_map`).

    A sample's regions depend on the sample alone, not on its batch: step ``k`` draws SmoothGrad noise with seed
    ``seed + k`` from the sample's own generator, keyed by its ``sample_keys`` entry or, by default, by the
    content of its current (partly hidden) image (:func:`medgain.saliency.sample_noise_seeds`). An image unveiled
    alone and inside any batch gets the same noise, hence the same regions (up to floating-point differences of
    batched convolutions, which the smoothing's threshold does not see in practice).

    Args:
        model: classifier returning (B, num_classes) or (B,) logits; eval mode for per-sample results.
        images: (B, C, H, W) batch, in the space the model takes (after its normalisation).
        target: the class to explain per sample (tensor / list), one int for all, or None for the arg-max of
            the untouched image.
        source: saliency source, one of :data:`medgain.saliency.SALIENCY_SOURCES` (paper: guided backprop).
        steps: maximum number of regions per sample, >= 1.
        prob_threshold: the unveiling of a sample ends once its target probability is below this.
        fill: colour of the hidden regions, in the model's input space: ``"mean"`` (each image's mean colour,
            which normalisation maps to itself), a number, or one value per channel.
        kernel_size: smoothing window (paper: 11).
        iterations: smoothing passes (paper: 3).
        threshold: smoothing threshold relative to the per-sample maximum.
        target_layer: Grad-CAM layer, for ``source="grad_cam"``.
        n_samples: SmoothGrad copies per image.
        noise: SmoothGrad noise level.
        chunk_size: SmoothGrad copies per pass.
        seed: SmoothGrad noise seed (step ``k`` uses ``seed + k``).
        sample_keys: one integer per sample identifying its SmoothGrad noise (e.g. its index in the data set), or
            None to key it by the current image's content.

    Returns:
        one :class:`UnveilResult` per sample, masks on the CPU.

    Raises:
        ValueError: for an invalid argument.
    """
    if images.ndim != 4:
        raise ValueError(f"unveil: expected a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    if steps < 1 or not 0.0 < prob_threshold < 1.0 or source not in SALIENCY_SOURCES:
        raise ValueError(
            f"unveil: needs steps >= 1, prob_threshold in (0, 1) and a source in {SALIENCY_SOURCES}, got "
            f"steps={steps}, prob_threshold={prob_threshold}, source={source!r}"
        )
    batch, _, height, width = images.shape
    fill_values = _fill_values(images, fill)
    current = images.detach().clone()
    hidden = torch.zeros(batch, 1, height, width, dtype=torch.bool, device=images.device)
    options = {"target_layer": target_layer, "n_samples": n_samples, "noise": noise, "chunk_size": chunk_size}

    with torch.no_grad():
        logits = model(current)
    if target is None:
        classes = target_class(logits)
    else:
        classes = torch.as_tensor(target, device=images.device).long().reshape(-1)
        classes = classes.expand(batch) if classes.numel() == 1 else classes
        if classes.numel() != batch:
            raise ValueError(f"unveil: target has {classes.numel()} entries for a batch of {batch}")
    keys = None if sample_keys is None else torch.as_tensor(sample_keys).reshape(-1).cpu()
    if keys is not None and keys.numel() != batch:
        raise ValueError(f"unveil: sample_keys has {keys.numel()} entries for a batch of {batch}")
    stop_below = math.log(prob_threshold) - math.log1p(-prob_threshold)
    score = target_log_odds(logits, classes).cpu()
    results = [UnveilResult(int(c), float(s)) for c, s in zip(classes.tolist(), score.tolist())]
    active = [i for i in range(batch) if score[i] >= stop_below]
    for i in set(range(batch)) - set(active):
        results[i].stop_reason = "initially_below"

    for step in range(steps):
        if not active:
            break
        rows = torch.tensor(active, device=images.device)
        step_keys = None if keys is None else keys[active]
        _, sal = saliency_map(
            model, current[rows], classes[rows], source, seed=seed + step, sample_keys=step_keys, **options
        )
        region = smooth_mask(sal * ~hidden[rows], kernel_size, iterations, threshold) & ~hidden[rows]
        found = region.flatten(1).any(1).tolist()
        for i, ok in zip(active, found):
            if not ok:
                results[i].stop_reason = "no_new_region"
        keep = [k for k, ok in enumerate(found) if ok]
        if not keep:
            break
        rows, region = rows[keep], region[keep]
        hidden[rows] |= region
        current[rows] = erase(current[rows], hidden[rows].to(images.dtype), fill_values[rows])
        with torch.no_grad():
            score = target_log_odds(model(current[rows]), classes[rows]).cpu()
        active = []
        for k, i in enumerate(rows.tolist()):
            result = results[i]
            if float(score[k]) > (result.scores[-1] if result.scores else result.initial_score):
                hidden[i] &= ~region[k]  # not evidence: the region is not kept
                result.stop_reason, result.rejected_score = "probability_rose", float(score[k])
                continue
            result.masks.append(region[k, 0].cpu())
            result.scores.append(float(score[k]))
            if score[k] < stop_below:
                results[i].stop_reason = "below_threshold"
            elif step + 1 < steps:
                active.append(i)
    for i, result in enumerate(results):
        result.cumulative = hidden[i, 0].cpu()
    return results


class Unveiler:
    """:func:`unveil` with its options fixed, constructible from a bundle config.

    Args:
        source: saliency source (see :func:`unveil`).
        steps: maximum regions per sample.
        prob_threshold: stop once the target probability is below this.
        fill: ``"mean"``, a number or a per-channel colour in the model's input space.
        kernel_size: smoothing window.
        iterations: smoothing passes.
        threshold: smoothing threshold relative to the per-sample maximum.
        target_layer: Grad-CAM layer for ``source="grad_cam"``.
        n_samples: SmoothGrad copies per image.
        noise: SmoothGrad noise level.
        chunk_size: SmoothGrad copies per pass.
        seed: SmoothGrad noise seed.
    """

    def __init__(
        self,
        source: str = "guided_backprop",
        steps: int = 5,
        prob_threshold: float = 0.5,
        fill: str | float | Sequence[float] = "mean",
        kernel_size: int = 11,
        iterations: int = 3,
        threshold: float = 0.5,
        target_layer: str | None = None,
        n_samples: int = 16,
        noise: float = 0.15,
        chunk_size: int = 64,
        seed: int = 0,
    ) -> None:
        self.options = {
            "source": source,
            "steps": steps,
            "prob_threshold": prob_threshold,
            "fill": fill,
            "kernel_size": kernel_size,
            "iterations": iterations,
            "threshold": threshold,
            "target_layer": target_layer,
            "n_samples": n_samples,
            "noise": noise,
            "chunk_size": chunk_size,
            "seed": seed,
        }
        smooth_mask(torch.zeros(1, 1, 1, 1), kernel_size, iterations, threshold)  # validates the smoothing options
        if steps < 1 or not 0.0 < prob_threshold < 1.0 or source not in SALIENCY_SOURCES:
            raise ValueError(
                f"Unveiler: needs steps >= 1, prob_threshold in (0, 1) and a source in {SALIENCY_SOURCES}, got "
                f"steps={steps}, prob_threshold={prob_threshold}, source={source!r}"
            )
        if source == "grad_cam" and target_layer is None:
            raise ValueError("Unveiler: source 'grad_cam' needs a target_layer")

    def __call__(
        self, model: nn.Module, images: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None
    ) -> list[UnveilResult]:
        """Unveil the regions of ``images`` (see :func:`unveil`)."""
        return unveil(model, images, target, **self.options)
