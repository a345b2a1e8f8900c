"""One CSV row per frame: file, frame, probability of being ill and the decision at the operating point."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medgain.handlers.best_checkpoint import load_operating_point
from medgain.handlers.metrics_json import log_artifact
from medgain.metrics.scores import positive_probability, stack_output

if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

__all__ = ["PredictionCSVWriter", "batch_has", "batch_strings", "require_keys", "sample_ids"]


def batch_has(batch: Any, key: str) -> bool:
    """Whether ``engine.state.batch`` / ``output`` (a collated dict or a decollated list of dicts) holds ``key``."""
    if isinstance(batch, Mapping):
        return batch.get(key) is not None
    return bool(batch) and all(isinstance(item, Mapping) and item.get(key) is not None for item in batch)


def require_keys(data: Any, keys: Sequence[str], owner: str) -> None:
    """Check that an engine batch or output holds ``keys``.

    Raises:
        KeyError: naming ``owner``, the missing keys and the available ones.
    """
    missing = [key for key in keys if not batch_has(data, key)]
    if missing:
        first = data if isinstance(data, Mapping) else data[0] if data else {}
        raise KeyError(f"{owner}: no {missing} in the engine data (available keys: {sorted(map(str, first))})")


def batch_strings(batch: Any, key: str, owner: str = "batch_strings") -> list[str]:
    """Per-sample strings (e.g. source paths) of ``key`` from a collated dict or a decollated list of dicts.

    Raises:
        KeyError: naming ``owner`` when the batch lacks ``key``.
    """
    require_keys(batch, (key,), owner)
    values = batch[key] if isinstance(batch, Mapping) else [item[key] for item in batch]
    return [values] if isinstance(values, str) else [str(v) for v in values]


def sample_ids(batch: Any, path_key: str, frame_key: str, owner: str = "sample_ids") -> list[tuple[str, int]]:
    """``(source file, frame index)`` of each sample of ``engine.state.batch``.

    Raises:
        KeyError: naming ``owner`` when the batch lacks ``path_key`` or ``frame_key`` (images not loaded by
            ``LoadFramed``).
        ValueError: when they hold different numbers of samples.
    """
    require_keys(batch, (path_key, frame_key), owner)
    files = batch_strings(batch, path_key, owner)
    frames = stack_output(batch, (frame_key,))[0].reshape(-1).tolist()
    if len(files) != len(frames):
        raise ValueError(
            f"{owner}: the batch has {len(files)} {path_key!r} entries but {len(frames)} {frame_key!r} entries"
        )
    return [(f, int(i)) for f, i in zip(files, frames)]


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

        if not engine.has_event_handler(self.start, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self.start)
        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        if not engine.has_event_handler(self.write, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self.write)

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
            raw = stack_output(batch, (self.label_key,))[0]
            raw = raw.reshape(raw.shape[0], -1)
            labels = (raw.argmax(1) if raw.shape[1] > 1 else raw[:, 0]).to(torch.int64).tolist()
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
