"""A fixed gallery of samples with their Grad-CAM on one common scale, rendered every round (or once for a test
split) to follow where the model looks."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from medgain.attention_fov import attention_outside_fov, attention_peak_outside_fov, fov_display_scale
from medgain.data.phi import frame_ref
from medgain.handlers.utils import (
    attach_per_round,
    batch_has,
    class_indices,
    log_artifact,
    require_keys,
    sample_ids,
)
from medgain.metrics.scores import binary_labels, positive_score, score_to_probability, stack_output
from medgain.model_file import load_operating_point
from medgain.outputs import write_atomic
from medgain.visualize import cam_overlay, decision_words, to_display_rgb

if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

    from medgain.attention_fov import FieldOfView

__all__ = ["AttentionOverlaySaver"]


class AttentionOverlaySaver:
    """Renders the Grad-CAM of a fixed set of samples as one gallery PNG per evaluation round.

    The set is the first ``num_positives`` ill and ``num_negatives`` healthy samples in loader order (the
    evaluation loader is not shuffled, so the same samples are shown every round); only those samples are
    copied to CPU memory. The gallery is a grid of at most four samples a row, legible in the MLflow artifact
    viewer; each sample shows the image and, below it, its raw Grad-CAM on ONE colour scale shared by the whole
    gallery (with a colour bar), so a healthy frame the model does not attend to stays dark instead of showing a
    bright "finding" of its own maximum. The scale runs from 0 to the gallery's largest value inside the field of
    view (``fov``; the whole frame without one): attention on the dark border never sets it, and is shown at the
    top colour where it exceeds it, never erased; the title says how the scale was set. With ``fov`` its boundary
    is drawn (dashed white) and each sample says which fraction of its attention lies outside, and whether its
    peak does. The lesion-mask contour is drawn (solid white) when the sample has a real mask. Under each sample:
    the frame (its salted pseudonym, :func:`medgain.data.phi.frame_ref`: no file name is burned into the image),
    its label, p(ill) against the threshold and the decision (e.g. "p 0.97 < 0.9987 → healthy"). After each
    gallery, ``display`` holds its scale (``{"scale", "how", "epoch"}``), which
    :class:`~medgain.handlers.BestModelSaver` stores in the model file for inference heatmaps.

    The threshold (log-odds, shown as a probability) is the validation round's ``threshold_metric`` or the
    operating point of ``checkpoint``; "no operating point" is printed when there is none. The gallery is written
    to ``output_dir/attention/<split>_epoch_<epoch:03d>.png`` (``per_round``) or
    ``output_dir/attention/<split>.png``, titled with the split, and logged to MLflow under ``artifact_path``.

    The evaluator must produce ``cam_key`` (see :class:`~medgain.handlers.cam_inferer.GradCamInferer`) and,
    for the contours, ``mask`` and ``has_mask``; the batches carry ``image_path`` and ``frame``.

    Args:
        output_dir: folder under which ``attention/`` is created.
        num_positives: number of ill samples shown.
        num_negatives: number of healthy samples shown.
        mlflow_handler: the MONAI ``MLFlowHandler`` owning the run, or None to only write files.
        artifact_path: MLflow artifact folder.
        cam_key: output key of the raw Grad-CAM maps (B, 1, H, W).
        alpha: weight of the coloured cam in the overlay.
        split: name of the evaluated split, in titles and file names ("validation", "test").
        per_round: one file per round (validation during training) or a single file (a test evaluation).
        threshold_metric: ``engine.state.metrics`` key of the round's log-odds threshold.
        checkpoint: model file whose operating point gives the threshold (instead of ``threshold_metric``).
        fov: finds the frames' field of view; None treats the whole frame as the field of view.
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
        split: str = "validation",
        per_round: bool = True,
        threshold_metric: str | None = "val_tpr_at_fpr_0.001_threshold",
        checkpoint: str | None = None,
        fov: FieldOfView | None = None,
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
        self.split = split
        self.per_round = per_round
        self.threshold_metric = threshold_metric
        self.checkpoint = checkpoint
        self.fov = fov
        self.samples: list[dict[str, Any]] = []
        self.display: dict[str, Any] | None = None  # the last gallery's scale: {"scale", "how", "epoch"}

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
        scores = positive_score(pred).tolist()
        ids = sample_ids(engine.state.batch, "image_path", "frame", "AttentionOverlaySaver")
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
                    "cam": cam[i, 0].detach().float().cpu().clone(),
                    "mask": mask[i].reshape(mask.shape[-2:]).detach().float().cpu().clone() if real_mask else None,
                    "ill": bool(is_ill),
                    "class": int(classes[i]),
                    "score": float(scores[i]),
                    "id": frame_ref(*ids[i]),
                    "fov": None if self.fov is None else self.fov(image[i : i + 1].detach().cpu())[0, 0],
                }
            )
            need_pos, need_neg = self._missing()

    def _threshold(self, engine: Engine) -> float | None:
        if self.checkpoint is not None:
            value = load_operating_point(self.checkpoint).get("threshold")
        else:
            value = engine.state.metrics.get(self.threshold_metric) if self.threshold_metric else None
        return None if value is None or not math.isfinite(float(value)) else float(value)

    def write(self, engine: Engine) -> None:
        """Render (and log) the gallery of the round."""
        if not self.samples:
            warnings.warn("AttentionOverlaySaver: no sample seen, no attention gallery written", stacklevel=2)
            return
        ordered = [s for s in self.samples if s["ill"]] + [s for s in self.samples if not s["ill"]]
        threshold = self._threshold(engine)
        fovs = None if self.fov is None else [s["fov"] for s in ordered]
        scale = fov_display_scale([s["cam"] for s in ordered], fovs)
        epoch = int(engine.state.epoch)
        n_cols = min(4, len(ordered))
        n_rows = math.ceil(len(ordered) / n_cols)
        fig = Figure(figsize=(2.9 * n_cols + 1.2, 6.1 * n_rows + 0.9), layout="constrained")
        title = f"Grad-CAM, {self.split} split" + (f", epoch {epoch}" if self.per_round else "")
        shown = f"p(ill) ≥ {float(score_to_probability(threshold)):.4g}" if threshold is not None else "none"
        where = "inside the field of view (dashed line)" if self.fov is not None else "anywhere in the frames"
        fig.suptitle(
            f"{title}; operating point: {shown}\nOne colour scale for all {len(ordered)} frames: 0 to {scale:.3g}, "
            f"the largest attention {where};\nlarger values show at the top colour. Solid white: lesion mask.",
            fontsize=10,
        )
        axes = fig.subplots(2 * n_rows, n_cols, squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for index, sample in enumerate(ordered):
            row, column = divmod(index, n_cols)
            top, bottom = axes[2 * row, column], axes[2 * row + 1, column]
            top.imshow(to_display_rgb(sample["image"]))
            status = "ill" if sample["ill"] else "healthy"
            top.set_title(f"{sample['id']}\nlabel {sample['class']} ({status})", fontsize=8)
            bottom.imshow(cam_overlay(sample["image"], (sample["cam"] / scale).clamp(0, 1), alpha=self.alpha))
            if sample["mask"] is not None:
                bottom.contour(sample["mask"].numpy(), levels=[0.5], colors="white", linewidths=1.0)
            lines = [decision_words(sample["score"], threshold)]
            if sample["fov"] is not None:
                cam, fov = sample["cam"][None, None], sample["fov"][None, None]
                if not bool(fov.all()):
                    bottom.contour(fov[0, 0].numpy().astype(float), levels=[0.5], colors="white", linewidths=0.8,
                                   linestyles="--")
                outside = float(attention_outside_fov(cam, fov)[0])
                peak = ", PEAK outside" if bool(attention_peak_outside_fov(cam, fov)[0]) else ""
                lines.append(f"{100.0 * outside:.0f} % outside the FOV{peak}")
            colour = "#b00000" if lines[-1].endswith("PEAK outside") else "black"
            bottom.set_axis_on()  # an x label (the layout makes room for it), no ticks or frame
            bottom.set(xticks=[], yticks=[])
            bottom.spines[:].set_visible(False)
            bottom.set_xlabel("\n".join(lines), fontsize=8, color=colour)
        colours = ScalarMappable(norm=Normalize(0.0, scale), cmap=matplotlib.colormaps["jet"])
        fig.colorbar(colours, ax=axes[1::2, :].ravel().tolist(), shrink=0.8, label="Grad-CAM (one scale for all)")
        folder = self.output_dir / "attention"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{self.split}_epoch_{epoch:03d}.png" if self.per_round else f"{self.split}.png"
        path = folder / name
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
        log_artifact(self.mlflow_handler, path, self.artifact_path)
        how = f"the largest Grad-CAM {where} of the {self.split} gallery's {len(ordered)} frames, epoch {epoch}"
        self.display = {"scale": scale, "how": how, "epoch": epoch}
