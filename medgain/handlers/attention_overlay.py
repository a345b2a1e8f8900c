"""A fixed panel of validation samples with their Grad-CAM, rendered every round to follow the attention."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from medgain.attention import normalize_cam
from medgain.handlers.utils import attach_per_round, batch_has, class_indices, log_artifact, require_keys
from medgain.metrics.scores import binary_labels, positive_probability, stack_output
from medgain.visualize import cam_overlay, to_display_rgb

if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

__all__ = ["AttentionOverlaySaver"]


class AttentionOverlaySaver:
    """Renders the Grad-CAM of a fixed set of validation samples as one grid PNG per evaluation round.

    The set is the first ``num_positives`` ill and ``num_negatives`` healthy samples in validation order (the
    validation loader is not shuffled, so the same samples are shown every round); only those samples are
    copied to CPU memory. Each column shows a sample: on top the image titled with its label and predicted
    probability of being ill, below it the normalised cam (jet colour map, alpha blended) with the lesion-mask
    contour when the sample has a real mask. With ``epoch = engine.state.epoch`` the grid is written to
    ``output_dir/attention/epoch_{epoch:03d}.png`` at ``Events.EPOCH_COMPLETED`` and logged to MLflow under
    ``artifact_path``. Fewer samples are shown when the validation set has fewer of a class.

    The evaluator must produce ``cam_key`` (see :class:`~medgain.handlers.cam_inferer.GradCamInferer`) and,
    for the contours, ``mask`` and ``has_mask``.

    Args:
        output_dir: folder under which ``attention/`` is created.
        num_positives: number of ill samples shown.
        num_negatives: number of healthy samples shown.
        mlflow_handler: the MONAI ``MLFlowHandler`` owning the run, or None to only write files.
        artifact_path: MLflow artifact folder.
        cam_key: output key of the raw Grad-CAM maps (B, 1, H, W).
        alpha: weight of the coloured cam in the overlay.
    """

    def __init__(
        self,
        output_dir: str,
        num_positives: int = 4,
        num_negatives: int = 4,
        mlflow_handler: MLFlowHandler | None = None,
        artifact_path: str = "attention",
        cam_key: str = "cam",
        alpha: float = 0.5,
    ) -> None:
        if num_positives < 0 or num_negatives < 0 or num_positives + num_negatives == 0:
            raise ValueError(
                f"AttentionOverlaySaver: needs a non-negative number of samples per class and at least one, got "
                f"num_positives={num_positives}, num_negatives={num_negatives}"
            )
        self.output_dir = Path(output_dir)
        self.num_positives = num_positives
        self.num_negatives = num_negatives
        self.mlflow_handler = mlflow_handler
        self.artifact_path = artifact_path
        self.cam_key = cam_key
        self.alpha = alpha
        self.samples: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        """Select samples every iteration of ``engine`` and render them at the end of each round."""
        attach_per_round(engine, self)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the samples of the previous round."""
        self.samples = []

    def _missing(self) -> tuple[int, int]:
        n_pos = sum(s["ill"] for s in self.samples)
        return self.num_positives - n_pos, self.num_negatives - (len(self.samples) - n_pos)

    def __call__(self, engine: Engine) -> None:
        """Keep (CPU copies of) the batch's samples that are still needed."""
        need_pos, need_neg = self._missing()
        if need_pos <= 0 and need_neg <= 0:
            return
        output = engine.state.output
        require_keys(output, ("image", "label", "pred", self.cam_key), "AttentionOverlaySaver (needs GradCamInferer)")
        image, label, pred, cam = stack_output(output, ("image", "label", "pred", self.cam_key))
        ill = binary_labels(label).tolist()
        classes = class_indices(label).tolist()
        probability = positive_probability(pred).tolist()
        mask = stack_output(output, ("mask",))[0] if batch_has(output, "mask") else None
        has_mask = None
        if batch_has(output, "has_mask"):
            has_mask = stack_output(output, ("has_mask",))[0].reshape(-1).bool().tolist()
        for i, is_ill in enumerate(ill):
            if (need_pos if is_ill else need_neg) <= 0:
                continue
            real_mask = mask is not None and (has_mask is None or has_mask[i]) and bool(mask[i].any())
            self.samples.append(
                {
                    "image": image[i].detach().cpu().clone(),
                    "cam": normalize_cam(cam[i : i + 1].detach().float())[0, 0].cpu(),
                    "mask": mask[i].reshape(mask.shape[-2:]).detach().float().cpu().clone() if real_mask else None,
                    "ill": bool(is_ill),
                    "class": int(classes[i]),
                    "probability": float(probability[i]),
                }
            )
            need_pos, need_neg = self._missing()

    def write(self, engine: Engine) -> None:
        """Render (and log) the grid of the round."""
        if not self.samples:
            warnings.warn("AttentionOverlaySaver: no validation sample seen, no attention grid written", stacklevel=2)
            return
        ordered = [s for s in self.samples if s["ill"]] + [s for s in self.samples if not s["ill"]]
        fig = Figure(figsize=(2.2 * len(ordered), 4.8), layout="constrained")
        fig.suptitle(f"Grad-CAM, epoch {engine.state.epoch}")
        axes = fig.subplots(2, len(ordered), squeeze=False)
        for column, sample in enumerate(ordered):
            top, bottom = axes[0, column], axes[1, column]
            top.imshow(to_display_rgb(sample["image"]))
            status = "ill" if sample["ill"] else "healthy"
            top.set_title(f"label {sample['class']} ({status})\np(ill) = {sample['probability']:.3f}", fontsize=9)
            bottom.imshow(cam_overlay(sample["image"], sample["cam"], alpha=self.alpha))
            if sample["mask"] is not None:
                bottom.contour(sample["mask"].numpy(), levels=[0.5], colors="white", linewidths=1.0)
            for ax in (top, bottom):
                ax.set_axis_off()
        folder = self.output_dir / "attention"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"epoch_{int(engine.state.epoch):03d}.png"
        fig.savefig(path, dpi=100)
        log_artifact(self.mlflow_handler, path, self.artifact_path)
