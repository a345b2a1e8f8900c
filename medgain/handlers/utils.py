"""Helpers shared by the handlers: engine batches and outputs, metric values, MLflow artifacts, event wiring."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.utils import convert_to_numpy

from medgain.metrics.scores import stack_output

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
    from monai.handlers import MLFlowHandler

__all__ = [
    "active_run_id",
    "attach_once",
    "attach_per_round",
    "batch_has",
    "batch_refusals",
    "batch_strings",
    "class_indices",
    "finite_or_none",
    "log_artifact",
    "metrics_as_floats",
    "require_keys",
    "sample_ids",
]


def attach_once(engine: Engine, handlers: Sequence[tuple[Events, Callable]]) -> None:
    """Add each ``(event, handler)`` pair to ``engine`` unless that handler is already attached to that event.

    Args:
        engine: the Ignite engine.
        handlers: the events and the handlers to run on them.
    """
    for event, handler in handlers:
        if not engine.has_event_handler(handler, event):
            engine.add_event_handler(event, handler)


def attach_per_round(engine: Engine, handler: Any) -> None:
    """Wire a per-round collector: ``handler.reset`` at each epoch start, ``handler(engine)`` every iteration and
    ``handler.write`` at each epoch end (one validation round of an evaluator)."""
    from ignite.engine import Events

    attach_once(
        engine,
        [
            (Events.EPOCH_STARTED, handler.reset),
            (Events.ITERATION_COMPLETED, handler),
            (Events.EPOCH_COMPLETED, handler.write),
        ],
    )


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


def batch_refusals(batch: Any, key: str, size: int) -> list[str]:
    """Per sample of a batch, why its input could not be read (``""`` when it was read), as
    :class:`~medgain.transforms.LoadFramed` with ``refused_key`` puts it; all ``""`` when the batch has no ``key``.

    Raises:
        ValueError: when the batch holds a number of reasons other than ``size``.
    """
    if not batch_has(batch, key):
        return [""] * size
    reasons = batch_strings(batch, key)
    if len(reasons) != size:
        raise ValueError(f"the batch has {len(reasons)} {key!r} entries for {size} samples")
    return reasons


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


def class_indices(labels: torch.Tensor) -> torch.Tensor:
    """(B,) class indices from (B,), (B, 1) or one-hot (B, C) labels."""
    labels = labels.reshape(labels.shape[0], -1)
    return labels.argmax(1) if labels.shape[1] > 1 else labels[:, 0]
