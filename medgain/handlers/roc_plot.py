"""The validation ROC curve of every round as a plot and a table, with the very-low-FPR region visible."""

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
from medgain.metrics.scores import binary_labels, positive_probability, stack_output

if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

__all__ = ["ROCCurveSaver"]


class ROCCurveSaver:
    """Plots and tabulates the ROC curve of each evaluation round (ill vs healthy).

    Each iteration the probability of being ill (:func:`~medgain.metrics.scores.positive_probability` of
    ``pred``) and the ill/healthy label are accumulated; at ``Events.EPOCH_COMPLETED`` it writes, with
    ``epoch = engine.state.epoch``:

    - ``output_dir/roc_epoch_{epoch:03d}.png``: the curve on a linear and on a log-FPR axis (an FPR of 0 is
      drawn at half the smallest non-zero FPR), with the operating point of each ``max_fprs`` marked;
    - ``output_dir/roc_epoch_{epoch:03d}.csv``: the exact curve, columns ``fpr, tpr, threshold``.

    A round with a single class has no ROC curve: a warning is issued and ``roc_epoch_{epoch:03d}.txt``
    explains why. Files are logged to MLflow under ``artifact_path`` when a handler is given.

    Args:
        output_dir: folder of the files; created when missing.
        mlflow_handler: the MONAI ``MLFlowHandler`` owning the run, or None to only write files.
        max_fprs: false-alarm budgets whose operating points are marked.
        artifact_path: MLflow artifact folder.
    """

    def __init__(
        self,
        output_dir: str,
        mlflow_handler: MLFlowHandler | None = None,
        max_fprs: Sequence[float] = (0.0005, 0.001),
        artifact_path: str = "roc",
    ) -> None:
        bad = [f for f in max_fprs if not 0.0 <= float(f) <= 1.0]
        if bad:
            raise ValueError(f"ROCCurveSaver: max_fprs must be in [0, 1], got {bad}")
        self.output_dir = Path(output_dir)
        self.mlflow_handler = mlflow_handler
        self.max_fprs = tuple(float(f) for f in max_fprs)
        self.artifact_path = artifact_path
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def attach(self, engine: Engine) -> None:
        """Accumulate every iteration of ``engine`` and write the curve at the end of each round."""
        attach_per_round(engine, self)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the accumulated scores."""
        self._scores, self._labels = [], []

    def __call__(self, engine: Engine) -> None:
        """Accumulate the probabilities and labels of one batch."""
        logits, labels = stack_output(engine.state.output, ("pred", "label"))
        self._scores.append(positive_probability(logits).cpu().numpy())
        self._labels.append(binary_labels(labels).cpu().numpy())

    def write(self, engine: Engine) -> None:
        """Write (and log) the curve of the round."""
        epoch = int(engine.state.epoch)
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, dtype=np.int64)
        n_pos = int(labels.sum())
        n_neg = labels.size - n_pos
        self.output_dir.mkdir(parents=True, exist_ok=True)
        stem = self.output_dir / f"roc_epoch_{epoch:03d}"
        if n_pos == 0 or n_neg == 0:
            note = (
                f"No ROC curve at epoch {epoch}: the validation set has {n_pos} ill and {n_neg} healthy samples; "
                "a ROC curve needs both."
            )
            warnings.warn(f"ROCCurveSaver: {note}", stacklevel=2)
            path = stem.with_suffix(".txt")
            path.write_text(note + "\n")
            log_artifact(self.mlflow_handler, path, self.artifact_path)
            return
        fpr, tpr, thresholds = roc_curve(scores, labels)
        with open(stem.with_suffix(".csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["fpr", "tpr", "threshold"])
            writer.writerows(zip(fpr.tolist(), tpr.tolist(), thresholds.tolist()))
        self._plot(fpr, tpr, thresholds, epoch, n_pos, n_neg).savefig(stem.with_suffix(".png"), dpi=100)
        log_artifact(self.mlflow_handler, stem.with_suffix(".png"), self.artifact_path)
        log_artifact(self.mlflow_handler, stem.with_suffix(".csv"), self.artifact_path)

    def _plot(
        self, fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray, epoch: int, n_pos: int, n_neg: int
    ) -> Figure:
        auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
        floor = 0.5 / n_neg
        fig = Figure(figsize=(10, 4.5), layout="constrained")
        fig.suptitle(f"ROC, epoch {epoch}: AUC {auc:.4f} ({n_pos} ill, {n_neg} healthy)")
        linear, log = fig.subplots(1, 2)
        linear.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
        linear.plot(fpr, tpr, color="C0", linewidth=1.5)
        log.plot(np.maximum(fpr, floor), tpr, color="C0", linewidth=1.5)
        for i, max_fpr in enumerate(self.max_fprs):
            p_fpr, p_tpr, p_thr = operating_point(fpr, tpr, thresholds, max_fpr)
            label = f"FPR <= {max_fpr:g}: TPR {p_tpr:.3f} at p >= {p_thr:.6g}"
            for ax, budget, x in ((linear, max_fpr, p_fpr), (log, max(max_fpr, floor), max(p_fpr, floor))):
                ax.axvline(budget, color=f"C{i + 1}", linestyle="--", linewidth=1)
                ax.plot([x], [p_tpr], "o", color=f"C{i + 1}", label=label)
        linear.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate", ylabel="true-positive rate")
        log.set_xscale("log")
        log.set(
            xlim=(floor / 1.5, 1),
            ylim=(0, 1.01),
            xlabel=f"false-positive rate (log; 0 drawn at {floor:.2g})",
            ylabel="true-positive rate",
        )
        for ax in (linear, log):
            ax.grid(True, which="both", alpha=0.3)
        log.legend(loc="lower right", fontsize="small")
        return fig
