"""The ROC curve of every evaluation round as a plot and a table, with the very-low-FPR region visible."""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from medgain.handlers.utils import attach_per_round, log_artifact
from medgain.metrics.roc import operating_point, roc_curve
from medgain.metrics.scores import binary_labels, positive_score, score_to_probability, stack_output
from medgain.outputs import write_atomic

if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

__all__ = ["ROCCurveSaver"]


class ROCCurveSaver:
    """Plots and tabulates the ROC curve of each evaluation round (ill vs healthy).

    Each iteration the log-odds of being ill (:func:`~medgain.metrics.scores.positive_score` of ``pred``) and
    the ill/healthy label are accumulated; at ``Events.EPOCH_COMPLETED`` it writes ``<stem>.png`` and
    ``<stem>.csv`` with ``<stem> = output_dir/roc_<split>_epoch_<epoch:03d>`` (``per_round``) or
    ``output_dir/roc_<split>``:

    - the plot: the curve on a linear axis and on a symmetric-log FPR axis (linear below one negative's share, so
      FPR = 0 is drawn at 0, honestly), titled with the split, with the operating point of each ``max_fprs``
      marked with its own hollow marker, colour and size (points that coincide, e.g. at FPR = 0, stay visible as
      nested rings, drawn over the axis edge); the legend sits under the plots, never over the curve. With
      ``checkpoint`` the stored operating point is starred, or the title says the model has none;
    - the table: the exact curve, columns ``fpr, tpr, threshold`` (log-odds) and ``probability`` (its sigmoid).

    A round with a single class has no ROC curve: a warning is issued and ``<stem>.txt`` explains why. Files are
    logged to MLflow under ``artifact_path`` when a handler is given.

    Args:
        output_dir: folder of the files; created when missing.
        mlflow_handler: the MONAI ``MLFlowHandler`` owning the run, or None to only write files.
        max_fprs: false-alarm budgets whose operating points are marked.
        artifact_path: MLflow artifact folder.
        split: name of the evaluated split, in titles and file names ("validation", "test").
        per_round: one file per round (validation during training) or a single file (a test evaluation).
        checkpoint: model file whose stored operating point is marked on the curve (a star), as shipped.
    """

    def __init__(
        self,
        output_dir: str,
        mlflow_handler: MLFlowHandler | None = None,
        max_fprs: Sequence[float] = (0.0005, 0.001),
        artifact_path: str = "roc",
        split: str = "validation",
        per_round: bool = True,
        checkpoint: str | None = None,
    ) -> None:
        bad = [f for f in max_fprs if not 0.0 <= float(f) <= 1.0]
        if bad:
            raise ValueError(f"ROCCurveSaver: max_fprs must be in [0, 1], got {bad}")
        self.output_dir = Path(output_dir)
        self.mlflow_handler = mlflow_handler
        self.max_fprs = tuple(float(f) for f in max_fprs)
        self.artifact_path = artifact_path
        self.split = split
        self.per_round = per_round
        self.checkpoint = checkpoint
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def attach(self, engine: Engine) -> None:
        """Accumulate every iteration of ``engine`` and write the curve at the end of each round."""
        attach_per_round(engine, self)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the accumulated scores."""
        self._scores, self._labels = [], []

    def __call__(self, engine: Engine) -> None:
        """Accumulate the scores and labels of one batch."""
        logits, labels = stack_output(engine.state.output, ("pred", "label"))
        self._scores.append(positive_score(logits).cpu().numpy())
        self._labels.append(binary_labels(labels).cpu().numpy())

    def write(self, engine: Engine) -> None:
        """Write (and log) the curve of the round."""
        epoch = int(engine.state.epoch)
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, dtype=np.int64)
        n_pos = int(labels.sum())
        n_neg = labels.size - n_pos
        self.output_dir.mkdir(parents=True, exist_ok=True)
        stem = self.output_dir / (f"roc_{self.split}_epoch_{epoch:03d}" if self.per_round else f"roc_{self.split}")
        if n_pos == 0 or n_neg == 0:
            note = (
                f"No ROC curve for the {self.split} split{self._when(epoch)}: it has {n_pos} ill and {n_neg} "
                "healthy samples; a ROC curve needs both."
            )
            warnings.warn(f"ROCCurveSaver: {note}", stacklevel=2)
            path = stem.with_suffix(".txt")
            path.write_text(note + "\n")
            log_artifact(self.mlflow_handler, path, self.artifact_path)
            return
        fpr, tpr, thresholds = roc_curve(scores, labels)
        with open(stem.with_suffix(".csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["fpr", "tpr", "threshold", "probability"])
            probabilities = score_to_probability(thresholds.copy()).numpy()
            writer.writerows(zip(fpr.tolist(), tpr.tolist(), thresholds.tolist(), probabilities.tolist()))
        fig = self._plot(fpr, tpr, thresholds, epoch, n_pos, n_neg)
        write_atomic(stem.with_suffix(".png"), lambda f: fig.savefig(f, format="png", dpi=100))
        log_artifact(self.mlflow_handler, stem.with_suffix(".png"), self.artifact_path)
        log_artifact(self.mlflow_handler, stem.with_suffix(".csv"), self.artifact_path)

    def _mark_shipped(self, fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray, axes: tuple) -> bool:
        """Mark where the model's stored threshold lands on this curve (the figures that ship); False when the
        model has no stored operating point."""
        from medgain.model_file import load_operating_point

        threshold = load_operating_point(self.checkpoint).get("threshold")
        if threshold is None or not np.isfinite(float(threshold)):
            return False
        k = int(np.count_nonzero(thresholds >= threshold)) - 1  # thresholds decrease along the curve
        label = (
            f"stored operating point (p >= {float(score_to_probability(threshold)):.4g}): "
            f"TPR {tpr[k]:.3f}, FPR {fpr[k]:.4f}"
        )
        for ax in axes:
            ax.plot([fpr[k]], [tpr[k]], "*", color="crimson", markersize=14, label=label, linestyle="none",
                    clip_on=False, zorder=5)
        return True

    def _when(self, epoch: int) -> str:
        return f", epoch {epoch}" if self.per_round else ""

    def _plot(
        self, fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray, epoch: int, n_pos: int, n_neg: int
    ) -> Figure:
        auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
        step = 1.0 / n_neg  # the FPR of one false alarm: linear below it, logarithmic above
        fig = Figure(figsize=(10, 5.6), layout="constrained")
        title = f"ROC, {self.split} split{self._when(epoch)}: AUC {auc:.4f} ({n_pos} ill, {n_neg} healthy)"
        linear, log = fig.subplots(1, 2)
        linear.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
        linear.plot(fpr, tpr, color="C0", linewidth=1.5, drawstyle="steps-post")
        log.plot(fpr, tpr, color="C0", linewidth=1.5, drawstyle="steps-post")
        for i, (max_fpr, marker, size) in enumerate(zip(self.max_fprs, "osD^v", (13, 8, 6, 5, 4))):
            p_fpr, p_tpr, p_thr = operating_point(fpr, tpr, thresholds, max_fpr)
            shown = f"p >= {float(score_to_probability(p_thr)):.6g}" if np.isfinite(p_thr) else "no finite threshold"
            label = f"FPR <= {max_fpr:g}: TPR {p_tpr:.3f} ({shown})"
            if max_fpr < step:
                label += f"; < 1 false alarm in {n_neg}"
            for ax in (linear, log):
                ax.axvline(max_fpr, color=f"C{i + 1}", linestyle="--", linewidth=1)
                ax.plot([p_fpr], [p_tpr], marker, color=f"C{i + 1}", markersize=size, label=label, linestyle="none",
                        markerfacecolor="none", markeredgewidth=2, clip_on=False, zorder=4)
        if self.checkpoint is not None and not self._mark_shipped(fpr, tpr, thresholds, (linear, log)):
            title += "\nthe model has no stored operating point: it takes no decisions (no point is starred)"
        fig.suptitle(title)
        linear.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate", ylabel="true-positive rate")
        log.set_xscale("symlog", linthresh=step, linscale=0.5)
        log.set(
            xlim=(0, 1),
            ylim=(0, 1.01),
            xlabel=f"false-positive rate (symmetric log: linear below 1/{n_neg}, 0 at 0)",
            ylabel="true-positive rate",
        )
        for ax in (linear, log):
            ax.grid(True, which="both", alpha=0.3)
        fig.legend(*log.get_legend_handles_labels(), loc="outside lower center", fontsize="small", ncols=1)
        return fig
