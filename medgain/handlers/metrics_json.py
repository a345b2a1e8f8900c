"""Evaluation metrics as a JSON file and MLflow metrics, plus the MLflow helpers of the artifact handlers."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.entities import Metric
from monai.utils import convert_to_numpy

if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

__all__ = ["MetricsJSONWriter", "active_run_id", "finite_or_none", "log_artifact", "metrics_as_floats"]


def metrics_as_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``engine.state.metrics`` as plain floats (NaN kept), keys sorted.

    Raises:
        TypeError: when a metric is not a scalar (e.g. a per-class tensor).
    """
    out = {}
    for name in sorted(metrics):
        value = np.asarray(convert_to_numpy(metrics[name]))
        if value.size != 1 or value.dtype.kind not in "biuf":
            raise TypeError(f"metric {name!r} is not a number: {type(metrics[name]).__name__} {value.shape}")
        out[name] = float(value.reshape(()))
    return out


def finite_or_none(value: float) -> float | None:
    """``value``, or None (JSON ``null``) when it is NaN or infinite."""
    return value if math.isfinite(value) else None


def active_run_id(mlflow_handler: MLFlowHandler) -> str:
    """Id of the run a MONAI ``MLFlowHandler`` has started.

    Raises:
        RuntimeError: when the handler has no active run (it starts one at its engine's ``Events.STARTED``).
    """
    if mlflow_handler.cur_run is None:
        raise RuntimeError(
            "the MLFlowHandler has no active run: attach it to the trainer or evaluator (its run starts at "
            "Events.STARTED) before artifacts are logged"
        )
    return mlflow_handler.cur_run.info.run_id


def log_artifact(
    mlflow_handler: MLFlowHandler | None, local_path: str | os.PathLike, artifact_path: str | None
) -> None:
    """Log a local file to the handler's MLflow run under ``artifact_path``; nothing when the handler is None."""
    if mlflow_handler is not None:
        mlflow_handler.client.log_artifact(active_run_id(mlflow_handler), os.fspath(local_path), artifact_path)


class MetricsJSONWriter:
    """At ``Events.COMPLETED`` writes ``engine.state.metrics`` to a JSON file and optionally to MLflow.

    The JSON holds one number per metric, keys sorted, NaN / infinite values as ``null``. With an MLflow
    handler the finite metrics are logged as MLflow metrics (step ``engine.state.epoch``, names prefixed with
    ``prefix``) and the JSON as an artifact at the run's root.

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

        if not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Write the JSON file and log to MLflow."""
        metrics = metrics_as_floats(engine.state.metrics)
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {name: finite_or_none(value) for name, value in metrics.items()}
        self.output_path.write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")
        if self.mlflow_handler is None:
            return
        timestamp = int(time.time() * 1000)
        step = int(engine.state.epoch)
        logged = [
            Metric(f"{self.prefix}{name}", value, timestamp, step)
            for name, value in metrics.items()
            if math.isfinite(value)
        ]
        self.mlflow_handler.client.log_batch(active_run_id(self.mlflow_handler), metrics=logged)
        log_artifact(self.mlflow_handler, self.output_path, None)
