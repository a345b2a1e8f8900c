"""One CSV row per frame: file, frame, log-odds and probability of being ill, and the decision at the operating
point that ships with the model."""

from __future__ import annotations

import csv
import logging
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from medgain.data.phi import frame_ref
from medgain.handlers.utils import (
    attach_once,
    batch_has,
    batch_refusals,
    class_indices,
    log_artifact,
    require_keys,
    sample_ids,
)
from medgain.metrics.scores import positive_score, score_to_probability, stack_output
from medgain.model_file import decision_threshold, load_operating_point
from medgain.outputs import write_csv_atomic

if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

__all__ = ["PredictionCSVWriter"]

logger = logging.getLogger(__name__)


class PredictionCSVWriter:
    """Writes ``output_dir/filename`` with one row per frame: ``file, frame, score, probability, decision[, label]``.

    ``score`` is the log-odds of being ill (:func:`~medgain.metrics.scores.positive_score` of ``pred``, float64,
    the value thresholded), ``probability`` its sigmoid (for reading), ``decision`` 1 ("ill") when
    ``score >= threshold`` and 0 otherwise, ``label`` the ground-truth class index when the batches hold
    ``label_key`` (left empty for rows whose batch has none). The threshold is ``threshold``, or the operating
    point of ``checkpoint`` (read when the engine starts). A checkpoint without an operating point gets no
    decisions: the column is left empty and the refusal is logged as an error (scores and probabilities are
    still written). A frame the loader refused (``refused_key`` of the batch holds its reason:
    :class:`~medgain.transforms.LoadFramed` could not read it) and a frame whose score is not finite (NaN / inf:
    an input that cannot be read as an image, or a model that diverged) get no row, no score and no decision:
    they are added to ``output_dir/errors_filename`` (``file, reason``, after the rows already there, e.g. those
    of the folder scan) and counted in a logged error. Rows are buffered and
    written at ``Events.COMPLETED`` through a temporary file and a rename (a failed write names the file and
    leaves an earlier file intact), then logged to MLflow when a handler is given. What reaches MLflow names no
    file: the logged copy has a ``ref`` column (the salted pseudonym of the frame,
    :func:`medgain.data.phi.frame_ref`) instead of ``file``; the local files keep the paths, and the errors
    file is not logged.

    Args:
        output_dir: folder of the CSV file; created when missing.
        filename: CSV file name.
        threshold: decision threshold on the log-odds; exclusive with ``checkpoint``.
        checkpoint: a :class:`~medgain.handlers.best_checkpoint.BestModelSaver` checkpoint whose operating
            point gives the threshold; exclusive with ``threshold``.
        path_key: batch key of the source file paths.
        frame_key: batch key of the frame indices.
        label_key: batch key of the class indices (0 = healthy).
        mlflow_handler: the MONAI ``MLFlowHandler`` owning the run, or None to only write the file.
        errors_filename: CSV file (in ``output_dir``) that receives the refused frames.
        refused_key: batch key of the loader's reasons for refusing a frame (``""``: read); a batch without it
            has no refused frame.
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
        errors_filename: str = "errors.csv",
        refused_key: str = "refused",
    ) -> None:
        if (threshold is None) == (checkpoint is None):
            raise ValueError(
                f"PredictionCSVWriter: give exactly one of threshold and checkpoint, got threshold={threshold}, "
                f"checkpoint={checkpoint}"
            )
        if threshold is not None and not math.isfinite(threshold):
            raise ValueError(f"PredictionCSVWriter: threshold must be finite, got {threshold}")
        self.output_path = Path(output_dir) / filename
        self.errors_path = Path(output_dir) / errors_filename
        self.threshold = None if threshold is None else float(threshold)
        self.checkpoint = checkpoint
        self.path_key = path_key
        self.frame_key = frame_key
        self.label_key = label_key
        self.mlflow_handler = mlflow_handler
        self.refused_key = refused_key
        self.rows: list[tuple[str, int, float, int | None, int | None]] = []
        self.refused: list[tuple[str, str]] = []  # (file, reason) of the frames the loader refused

    def attach(self, engine: Engine) -> None:
        """Collect rows every iteration of ``engine`` and write them when it completes."""
        from ignite.engine import Events

        attach_once(
            engine,
            [(Events.STARTED, self.start), (Events.ITERATION_COMPLETED, self), (Events.COMPLETED, self.write)],
        )

    def start(self, engine: Engine | None = None) -> None:
        """Empty the rows and read the checkpoint's threshold (None when the model has no operating point)."""
        self.rows, self.refused = [], []
        if self.checkpoint is None:
            return
        try:
            self.threshold = decision_threshold(load_operating_point(self.checkpoint), self.checkpoint)
        except ValueError as err:
            self.threshold = None
            logger.error("%s No decisions are written; the scores and probabilities are.", err)

    def __call__(self, engine: Engine) -> None:
        """Buffer the rows of one batch; set aside the frames the loader refused."""
        batch = engine.state.batch
        ids = sample_ids(batch, self.path_key, self.frame_key, "PredictionCSVWriter")
        require_keys(engine.state.output, ("pred",), "PredictionCSVWriter")
        scores = positive_score(stack_output(engine.state.output, ("pred",))[0]).cpu().tolist()
        if len(scores) != len(ids):
            raise ValueError(f"PredictionCSVWriter: {len(scores)} predictions for {len(ids)} batch entries")
        labels: list[int | None] = [None] * len(ids)
        if batch_has(batch, self.label_key):
            labels = class_indices(stack_output(batch, (self.label_key,))[0]).to(torch.int64).tolist()
        reasons = batch_refusals(batch, self.refused_key, len(ids))
        for (path, frame), score, label, reason in zip(ids, scores, labels, reasons):
            if reason:
                self.refused.append((path, f"frame {frame}: {reason}; no score and no decision"))
                continue
            decision = None if self.threshold is None else int(score >= self.threshold)
            self.rows.append((path, frame, score, decision, label))

    def write(self, engine: Engine | None = None) -> None:
        """Write the CSV file (and the refused frames into the errors file), then log the pseudonymised copy.

        Raises:
            OSError: naming the file that cannot be written; an earlier file under that name is intact.
        """
        refused = self.refused + [self._non_finite(row[0], row[1], row[2]) for row in self.rows
                                  if not math.isfinite(row[2])]
        self.rows = [row for row in self.rows if math.isfinite(row[2])]
        if refused:
            self._add_errors(refused)
        self._write_csv(self.output_path, pseudonymise=False)
        if self.mlflow_handler is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            logged = Path(tmp) / self.output_path.name
            self._write_csv(logged, pseudonymise=True)
            log_artifact(self.mlflow_handler, logged, None)

    @staticmethod
    def _non_finite(path: str, frame: int, score: float) -> tuple[str, str]:
        """The errors-file row of a frame whose score is not finite."""
        return (path, f"frame {frame}: the model's score is not finite ({score}); the input cannot be read as an "
                "image (or the model diverged): no score and no decision")

    def _add_errors(self, refused: list[tuple[str, str]]) -> None:
        """Append the refused frames' ``(file, reason)`` rows to the errors file (keeping the rows already there)."""
        earlier: list[list[str]] = []
        if self.errors_path.is_file():
            with self.errors_path.open(newline="") as f:
                earlier = [[row.get("file", ""), row.get("reason", "")] for row in csv.DictReader(f)]
        write_csv_atomic(self.errors_path, ["file", "reason"], earlier + [list(row) for row in refused])
        logger.error(
            "%d frame(s) could not be read or got a non-finite score: no score and no decision; they are listed "
            "in %s", len(refused), self.errors_path,
        )

    def _write_csv(self, path: Path, pseudonymise: bool) -> None:
        with_labels = any(row[4] is not None for row in self.rows)
        header = ["ref" if pseudonymise else "file", "frame", "score", "probability", "decision"]
        rows = []
        for path_, frame, score, decision, label in self.rows:
            name = frame_ref(path_, frame) if pseudonymise else path_
            row = [name, frame, repr(score), f"{float(score_to_probability(score)):.6g}"]
            row.append("" if decision is None else decision)
            rows.append(row + (["" if label is None else label] if with_labels else []))
        write_csv_atomic(path, header + (["label"] if with_labels else []), rows)
