"""Where a glimpse model looks: location statistics and per-glimpse accuracy, as functions and ignite metrics."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from ignite.metrics import Accuracy, Fbeta, Metric
from ignite.metrics.metric import reinit__is_reduced

from medgain.handlers.auc import AUC
from medgain.handlers.operating_point import OperatingPointMetrics
from medgain.handlers.tpr_at_fpr import TPRAtFPR
from medgain.metrics import decisions_and_labels, stack_output

__all__ = ["GlimpseStatistic", "glimpse_metrics", "glimpse_records", "glimpse_statistics"]

#: statistics of :func:`glimpse_statistics` besides the per-glimpse accuracies ``glimpse_<t>_accuracy``
GLIMPSE_STATISTICS = ("step_distance", "center_spread", "on_tumour", "tumour_area", "mean_scale")


def glimpse_records(
    centers: torch.Tensor,
    scales: torch.Tensor,
    glimpse_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample facts the statistics are computed from (small, on CPU), so that masks need not be kept.

    Args:
        centers: (B, G, 2) glimpse centres (x, y) in [-1, 1].
        scales: (B, G) glimpse sides as fractions of the shorter image side.
        glimpse_logits: (B, G, C) per-glimpse logits.
        labels: (B,) class indices (0 = normal) or one-hot (B, C).
        mask: (B, 1, H, W) tumour masks, or None.

    Returns:
        ``{"centers", "scales", "correct" (B, G) bool, "tumour" (B,) bool, "on_mask" (B, G) bool,
        "area" (B,)}``; without masks no image counts as tumour.
    """
    centers, scales = centers.detach().float().cpu(), scales.detach().float().cpu()
    labels = labels.detach().cpu()
    labels = labels.reshape(labels.shape[0], -1)
    labels = labels.argmax(1) if labels.shape[1] > 1 else labels[:, 0].long()
    logits = glimpse_logits.detach().float().cpu()
    predicted = logits.argmax(-1) if logits.shape[-1] > 1 else (logits[..., 0] >= 0).long()
    b, g = centers.shape[:2]
    tumour = torch.zeros(b, dtype=torch.bool)
    on_mask = torch.zeros(b, g, dtype=torch.bool)
    area = torch.zeros(b)
    if mask is not None:
        binary = mask.detach().cpu().reshape(b, *mask.shape[-2:]) > 0.5
        h, w = binary.shape[1:]
        tumour = (labels != 0) & binary.flatten(1).any(1)
        cols = ((centers[..., 0] + 1.0) * 0.5 * (w - 1)).round().long().clamp(0, w - 1)
        rows = ((centers[..., 1] + 1.0) * 0.5 * (h - 1)).round().long().clamp(0, h - 1)
        on_mask = binary[torch.arange(b)[:, None], rows, cols]
        area = binary.flatten(1).float().mean(1)
    return {
        "centers": centers,
        "scales": scales,
        "correct": predicted == labels[:, None],
        "tumour": tumour,
        "on_mask": on_mask,
        "area": area,
    }


def glimpse_statistics(records: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Location statistics of a set of :func:`glimpse_records` (concatenated over batches).

    - ``step_distance``: mean distance between successive glimpse centres, as a fraction of the image side;
    - ``center_spread``: standard deviation across images of the centre of each glimpse (x and y, fraction of
      the side), averaged over glimpses — 0 when every image is looked at in the same places;
    - ``on_tumour``: fraction of the glimpses after the first whose centre lies on the tumour mask, over tumour
      images (NaN without any);
    - ``tumour_area``: mean tumour area fraction of those images, the ``on_tumour`` of random glimpses;
    - ``mean_scale``: mean glimpse side as a fraction of the shorter image side;
    - ``glimpse_<t>_accuracy``: accuracy of the per-glimpse classifier after glimpse ``t``.
    """
    centers = records["centers"] * 0.5  # [-1, 1] -> fraction of the image side
    g = centers.shape[1]
    nan = float("nan")
    steps = (centers[:, 1:] - centers[:, :-1]).norm(dim=-1)
    spread = centers.std(0, unbiased=False).mean() if centers.shape[0] > 1 else torch.tensor(nan)
    tumour = records["tumour"]
    stats = {
        "step_distance": float(steps.mean()) if g > 1 and steps.numel() else nan,
        "center_spread": float(spread),
        "on_tumour": float(records["on_mask"][tumour][:, 1:].float().mean()) if tumour.any() and g > 1 else nan,
        "tumour_area": float(records["area"][tumour].mean()) if tumour.any() else nan,
        "mean_scale": float(records["scales"].mean()) if records["scales"].numel() else nan,
    }
    correct = records["correct"].float()
    for t in range(g):
        stats[f"glimpse_{t}_accuracy"] = float(correct[:, t].mean()) if correct.shape[0] else nan
    return stats


def _glimpse_output(output: Any) -> tuple[torch.Tensor, ...]:
    keys = ("glimpse_centers", "glimpse_scales", "glimpse_logits", "label")
    values = stack_output(output, keys)
    items = output if isinstance(output, list) else [output]
    mask = stack_output(output, ("mask",))[0] if items and "mask" in items[0] else None
    return (*values, mask)


class GlimpseStatistic(Metric):
    """One statistic of :func:`glimpse_statistics` over an evaluation round, as an ignite metric.

    The evaluator output must hold ``glimpse_centers``, ``glimpse_scales``, ``glimpse_logits`` and ``label``
    (as published by :class:`~medgain.handlers.GlimpseInferer`), and ``mask`` for the tumour statistics.

    Args:
        statistic: ``step_distance``, ``center_spread``, ``on_tumour``, ``tumour_area``, ``mean_scale`` or
            ``glimpse_<t>_accuracy``.
        output_transform: maps the engine output to ``(centers, scales, glimpse_logits, labels, mask or None)``.

    Raises:
        ValueError: for an unknown statistic name.
    """

    def __init__(self, statistic: str, output_transform: Callable = _glimpse_output) -> None:
        per_glimpse = statistic.startswith("glimpse_") and statistic.endswith("_accuracy")
        if statistic not in GLIMPSE_STATISTICS and not (per_glimpse and statistic[8:-9].isdigit()):
            raise ValueError(
                f"unknown glimpse statistic {statistic!r}; choose one of {list(GLIMPSE_STATISTICS)} or glimpse_<t>_accuracy"
            )
        self.statistic = statistic
        super().__init__(output_transform=output_transform)

    @reinit__is_reduced
    def reset(self) -> None:
        """Start a new round."""
        self._records: list[dict[str, torch.Tensor]] = []

    @reinit__is_reduced
    def update(self, output: tuple[torch.Tensor, ...]) -> None:
        """Add one batch."""
        self._records.append(glimpse_records(*output))

    def compute(self) -> float:
        """The statistic over the round (NaN when undefined, e.g. no tumour image)."""
        if not self._records:
            return float("nan")
        merged = {key: torch.cat([r[key] for r in self._records]) for key in self._records[0]}
        stats = glimpse_statistics(merged)
        if self.statistic not in stats:
            raise ValueError(f"GlimpseStatistic: {self.statistic!r} not available, the model has fewer glimpses")
        return stats[self.statistic]


def glimpse_metrics(
    prefix: str = "val", num_glimpses: int = 4, key_metric: str | None = None, checkpoint: str | None = None
) -> tuple[dict[str, Metric], dict[str, Metric]]:
    """Classification and location metrics of a glimpse model for a MONAI ``SupervisedEvaluator``.

    Names: ``<prefix>_tpr_at_fpr_0.001`` (and ``_threshold``), ``<prefix>_tpr_at_fpr_0.0005``, ``<prefix>_auc``,
    ``<prefix>_accuracy`` and ``<prefix>_f1`` (decision at probability 0.5), ``<prefix>_glimpse_<statistic>``
    for each of :func:`glimpse_statistics` and ``<prefix>_glimpse_<t>_accuracy`` for every glimpse.

    With ``checkpoint`` (evaluating a trained model) the decisions are also taken at the model's stored operating
    point (:class:`~medgain.handlers.operating_point.OperatingPointMetrics`): ``<prefix>_sensitivity``,
    ``<prefix>_specificity``, ``<prefix>_false_alarms``, ``<prefix>_false_alarms_per_1000``, ``<prefix>_accuracy``
    (replacing the accuracy at 0.5), ``<prefix>_fpr_upper`` and ``<prefix>_fpr_above_bound`` (the false-alarm rate
    measured above the bound the point was stored with).

    Args:
        prefix: name prefix, e.g. "val" or "test".
        num_glimpses: glimpses per image.
        key_metric: the evaluator's key metric; default ``<prefix>_auc``.
        checkpoint: model file whose operating point the decisions use; None on validation rounds.

    Returns:
        ``(key_val_metric, additional_metrics)``.

    Raises:
        ValueError: when ``key_metric`` is not one of the names.
    """
    metrics: dict[str, Metric] = {
        f"{prefix}_tpr_at_fpr_0.001": TPRAtFPR(max_fpr=0.001),
        f"{prefix}_tpr_at_fpr_0.0005": TPRAtFPR(max_fpr=0.0005),
        f"{prefix}_auc": AUC(),
        f"{prefix}_accuracy": Accuracy(output_transform=decisions_and_labels),
        f"{prefix}_f1": Fbeta(beta=1.0, output_transform=decisions_and_labels),
    }
    for statistic in GLIMPSE_STATISTICS:
        metrics[f"{prefix}_glimpse_{statistic}"] = GlimpseStatistic(statistic)
    for t in range(num_glimpses):
        metrics[f"{prefix}_glimpse_{t}_accuracy"] = GlimpseStatistic(f"glimpse_{t}_accuracy")
    if checkpoint is not None:
        del metrics[f"{prefix}_accuracy"]
        at_point = OperatingPointMetrics(prefix, checkpoint=checkpoint)
        metrics[at_point.names[0]] = at_point
    key = key_metric or f"{prefix}_auc"
    if key not in metrics:
        raise ValueError(f"key_metric {key!r} is not one of {sorted(metrics)}")
    return {key: metrics.pop(key)}, metrics
