"""One CSV row per frame: file, frame, probability of being ill and the decision at the operating point."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from medgain.handlers.best_checkpoint import load_operating_point
from medgain.handlers.utils import attach_once, batch_has, class_indices, log_artifact, require_keys, sample_ids
from medgain.metrics.scores import positive_probability, stack_output

if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

__all__ = ["PredictionCSVWriter"]


class PredictionCSVWriter:
    """Writes ``output_dir/filename`` with one row per frame: ``file, frame, probability, decision[, label]``.

    ``probability`` is the probability of being ill (:func:`~medgain.metrics.scores.positive_probability` of
    ``pred``), ``decision`` is 1 ("ill") when ``probability >= threshold`` and 0 otherwise, ``label`` the
    ground-truth class index when the batches hold ``label_key`` (left empty for rows whose batch has none).
    The threshold is ``threshold``, or the operating point of ``checkpoint`` (read when the engine starts).
    Rows are buffered and written at ``Events.COMPLETED``, then logged to MLflow when a handler is given.

    Args:
        output_dir: folder of the CSV file; created when missing.
        filename: CSV file name.
        threshold: decision threshold on the probability; exclusive with ``checkpoint``.
        checkpoint: a :class:`~medgain.handlers.best_checkpoint.BestModelSaver` checkpoint whose operating
            point gives the threshold; exclusive with ``threshold``.
        path_key: batch key of the source file paths.
        frame_key: batch key of the frame indices.
        label_key: batch key of the class indices (0 = healthy).
        mlflow_handler: the MONAI ``MLFlowHandler`` owning the run, or None to only write the file.
    """

    def __init__(
        self,
        output_dir: str,
        filename: str = "predictions.csv",
        threshold: float | None = None,
        checkpoint: str | None = None,
        path_key: str = "image_path",
        frame_key: str = "frame",
        label_key: str = "label",
        mlflow_handler: MLFlowHandler | None = None,
    ) -> None:
        if (threshold is None) == (checkpoint is None):
            raise ValueError(
                f"PredictionCSVWriter: give exactly one of threshold and checkpoint, got threshold={threshold}, "
                f"checkpoint={checkpoint}"
            )
        if threshold is not None and math.isnan(threshold):
            raise ValueError("PredictionCSVWriter: threshold is NaN")
        self.output_path = Path(output_dir) / filename
        self.threshold = None if threshold is None else float(threshold)
        self.checkpoint = checkpoint
        self.path_key = path_key
        self.frame_key = frame_key
        self.label_key = label_key
        self.mlflow_handler = mlflow_handler
        self.rows: list[tuple[str, int, float, int, int | None]] = []

    def attach(self, engine: Engine) -> None:
        """Collect rows every iteration of ``engine`` and write them when it completes."""
        from ignite.engine import Events

        attach_once(
            engine,
            [(Events.STARTED, self.start), (Events.ITERATION_COMPLETED, self), (Events.COMPLETED, self.write)],
        )

    def start(self, engine: Engine | None = None) -> None:
        """Empty the rows and read the checkpoint's threshold.

        Raises:
            ValueError: when the checkpoint's threshold is NaN (its validation round had a single class).
        """
        self.rows = []
        if self.checkpoint is not None:
            self.threshold = float(load_operating_point(self.checkpoint)["threshold"])
            if math.isnan(self.threshold):
                raise ValueError(
                    f"{self.checkpoint}: the operating point's threshold is NaN (chosen on a validation round "
                    "with a single class); give a threshold instead"
                )

    def __call__(self, engine: Engine) -> None:
        """Buffer the rows of one batch."""
        batch = engine.state.batch
        ids = sample_ids(batch, self.path_key, self.frame_key, "PredictionCSVWriter")
        require_keys(engine.state.output, ("pred",), "PredictionCSVWriter")
        probabilities = positive_probability(stack_output(engine.state.output, ("pred",))[0]).tolist()
        if len(probabilities) != len(ids):
            raise ValueError(f"PredictionCSVWriter: {len(probabilities)} predictions for {len(ids)} batch entries")
        labels: list[int | None] = [None] * len(ids)
        if batch_has(batch, self.label_key):
            labels = class_indices(stack_output(batch, (self.label_key,))[0]).to(torch.int64).tolist()
        for (path, frame), p, label in zip(ids, probabilities, labels):
            self.rows.append((path, frame, p, int(p >= self.threshold), label))  # type: ignore[operator]

    def write(self, engine: Engine | None = None) -> None:
        """Write (and log) the CSV file."""
        with_labels = any(row[4] is not None for row in self.rows)
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.output_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "frame", "probability", "decision"] + (["label"] if with_labels else []))
            for path, frame, p, decision, label in self.rows:
                writer.writerow([path, frame, p, decision] + (["" if label is None else label] if with_labels else []))
        log_artifact(self.mlflow_handler, self.output_path, None)
