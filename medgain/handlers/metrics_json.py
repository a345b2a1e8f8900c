"""Evaluation metrics as a JSON file and MLflow metrics."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.entities import Metric, RunTag

from medgain.data.phi import pseudonymise_text
from medgain.handlers.utils import active_run_id, attach_once, finite_or_none, log_artifact, metrics_as_floats

if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

__all__ = ["MetricsJSONWriter"]

logger = logging.getLogger(__name__)


class MetricsJSONWriter:
    """At ``Events.COMPLETED`` writes ``engine.state.metrics`` to a JSON file and optionally to MLflow.

    The JSON holds one number per metric, keys sorted, NaN / infinite values as ``null``. What a figure cannot
    mean (``engine.state.metric_notes``, e.g. a false-alarm budget finer than one negative of the split) goes
    beside it into ``<stem>_notes.json`` and, in MLflow, into run tags ``note.<metric>``. With an MLflow handler
    the finite metrics are logged as MLflow metrics (step ``engine.state.epoch``, names prefixed with ``prefix``)
    and the JSON files as artifacts at the run's root.

    Args:
        output_path: path of the JSON file; missing folders are created.
        mlflow_handler: the MONAI ``MLFlowHandler`` owning the run, or None to only write the file.
        prefix: prepended to the MLflow metric names (e.g. ``"test_"``).
    """

    def __init__(self, output_path: str, mlflow_handler: MLFlowHandler | None = None, prefix: str = "") -> None:
        self.output_path = Path(output_path)
        self.mlflow_handler = mlflow_handler
        self.prefix = prefix

    def attach(self, engine: Engine) -> None:
        """Write the metrics when ``engine`` completes."""
        from ignite.engine import Events

        attach_once(engine, [(Events.COMPLETED, self)])

    def __call__(self, engine: Engine) -> None:
        """Write the JSON file and log to MLflow."""
        metrics = metrics_as_floats(engine.state.metrics)
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {name: finite_or_none(value) for name, value in metrics.items()}
        self.output_path.write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")
        notes = dict(getattr(engine.state, "metric_notes", None) or {})
        notes_path = self.output_path.with_name(f"{self.output_path.stem}_notes.json")
        notes_path.unlink(missing_ok=True)
        if notes:  # the file is logged to MLflow: its paths and names as pseudonyms; the local log keeps them
            shared = {name: pseudonymise_text(str(note)) for name, note in notes.items()}
            notes_path.write_text(json.dumps(shared, indent=2, sort_keys=True) + "\n")
            for name, note in sorted(notes.items()):
                logger.warning("%s: %s", name, note)
        if self.mlflow_handler is None:
            return
        timestamp = int(time.time() * 1000)
        step = int(engine.state.epoch)
        logged = [
            Metric(f"{self.prefix}{name}", value, timestamp, step)
            for name, value in metrics.items()
            if math.isfinite(value)
        ]
        tags = [RunTag(f"note.{self.prefix}{name}", note) for name, note in sorted(notes.items())]
        self.mlflow_handler.client.log_batch(active_run_id(self.mlflow_handler), metrics=logged, tags=tags)
        log_artifact(self.mlflow_handler, self.output_path, None)
        if notes:
            log_artifact(self.mlflow_handler, notes_path, None)
