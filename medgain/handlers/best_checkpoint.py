"""The best model of a training run, saved with its decision threshold, and the functions that read it back."""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from torch import nn

from medgain.handlers.utils import active_run_id, attach_once, finite_or_none, log_artifact, metrics_as_floats

if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

__all__ = ["BestModelSaver", "load_model_weights", "load_operating_point"]

_DDP_PREFIX = "module."


def _unwrap(network: nn.Module) -> nn.Module:
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return network.module if isinstance(network, wrappers) else network


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temporary file in the same folder and ``os.replace``: readers never see a half file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _rank(value: float) -> tuple[int, float]:
    """Sort key under which NaN is below every number."""
    return (0, 0.0) if math.isnan(value) else (1, value)


def _is_state_dict(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _load(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises KeyError, RuntimeError, UnpicklingError... for foreign files
        raise ValueError(f"{path}: not a PyTorch checkpoint readable with weights_only=True ({err!r})") from err


def load_operating_point(path: str | os.PathLike) -> dict[str, Any]:
    """The operating point stored by :class:`BestModelSaver`: ``{"threshold", "max_fpr", "metric", "value"}``.

    Args:
        path: checkpoint file written by :class:`BestModelSaver`.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when it is not a checkpoint or holds no operating point (e.g. a plain state dict).
    """
    checkpoint = _load(path)
    point = checkpoint.get("operating_point") if isinstance(checkpoint, Mapping) else None
    if not isinstance(point, Mapping) or "threshold" not in point:
        raise ValueError(f"{path}: holds no operating point (not written by BestModelSaver, e.g. a plain state dict)")
    return dict(point)


def load_model_weights(network: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load the weights of a :class:`BestModelSaver` checkpoint or of a plain state dict into ``network``.

    A state dict saved from a ``DistributedDataParallel`` model (every key prefixed ``module.``) is accepted;
    a wrapped ``network`` is loaded through its ``.module``.

    Args:
        network: the model to fill; its keys and shapes must match the stored ones exactly.
        path: checkpoint file.

    Returns:
        The checkpoint dict (``model``, and for a BestModelSaver file ``operating_point``, ``epoch``, ``metrics``).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when it is not a checkpoint, or its weights do not match ``network``.
    """
    checkpoint = _load(path)
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        checkpoint = dict(checkpoint)
    elif isinstance(checkpoint, Mapping) and _is_state_dict(checkpoint):
        checkpoint = {"model": checkpoint}
    else:
        raise ValueError(f"{path}: neither a BestModelSaver checkpoint (a dict with 'model') nor a state dict")
    state = OrderedDict(checkpoint["model"])
    if all(key.startswith(_DDP_PREFIX) for key in state):
        state = OrderedDict((key[len(_DDP_PREFIX) :], value) for key, value in state.items())
    target = _unwrap(network)
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match {type(target).__name__}: {err}") from err
    return checkpoint


class BestModelSaver:
    """Keeps the best model of a run, judged on a validation metric, with the decision threshold to deploy.

    Attached to the validation evaluator, at each ``Events.EPOCH_COMPLETED`` it compares ``metric`` (greater is
    better; ``tie_breaker`` decides equal values; NaN is never better than a number) with the best so far and,
    when better or in the first round, atomically replaces ``save_dir/filename`` with::

        {"model": state dict (unwrapped from DistributedDataParallel, on CPU),
         "operating_point": {"threshold": metrics[threshold_metric], "max_fpr": max_fpr,
                             "metric": metric, "value": metrics[metric]},
         "epoch": engine.state.epoch, "metrics": {every metric as float}}

    plus ``<filename stem>_metrics.json`` (epoch, operating point and metrics; NaN as null). With an MLflow
    handler both files are logged under ``checkpoint/epoch_<epoch>/`` and, when ``registered_model_name`` is given, each new
    best checkpoint becomes a new version of that registered model.

    Args:
        save_dir: folder of the checkpoint; created when missing.
        network: the trained model.
        metric: name in ``engine.state.metrics`` that selects the best model.
        tie_breaker: metric deciding between equal ``metric`` values; None for none.
        threshold_metric: metric holding the decision threshold (probability >= threshold means "ill").
        max_fpr: the false-alarm budget the threshold was chosen for, stored with it.
        filename: checkpoint file name.
        mlflow_handler: the MONAI ``MLFlowHandler`` owning the run, or None to only write files.
        registered_model_name: name in the MLflow model registry, or None not to register.
        resume: start from the metrics of an existing checkpoint at ``save_dir/filename`` (a resumed run then
            only replaces it with a better model).
    """

    def __init__(
        self,
        save_dir: str,
        network: nn.Module,
        metric: str = "val_tpr_at_fpr_0.001",
        tie_breaker: str | None = "val_auc",
        threshold_metric: str = "val_tpr_at_fpr_0.001_threshold",
        max_fpr: float = 0.001,
        filename: str = "model.pt",
        mlflow_handler: MLFlowHandler | None = None,
        registered_model_name: str | None = None,
        resume: bool = False,
    ) -> None:
        if registered_model_name is not None and mlflow_handler is None:
            raise ValueError("BestModelSaver: registered_model_name needs an mlflow_handler")
        self.save_dir = Path(save_dir)
        self.network = network
        self.metric = metric
        self.tie_breaker = tie_breaker
        self.threshold_metric = threshold_metric
        self.max_fpr = float(max_fpr)
        self.filename = filename
        self.mlflow_handler = mlflow_handler
        self.registered_model_name = registered_model_name
        self.best_key: tuple[tuple[int, float], ...] | None = None
        self.best_epoch: int | None = None
        if resume and self.checkpoint_path.is_file():  # a resumed run must beat the best it already saved
            saved = _load(self.checkpoint_path)
            if isinstance(saved, Mapping) and isinstance(saved.get("metrics"), Mapping):
                ranked = [self.metric] + ([self.tie_breaker] if self.tie_breaker else [])
                self.best_key = tuple(_rank(float(saved["metrics"].get(n, math.nan))) for n in ranked)
                self.best_epoch = int(saved.get("epoch", 0))

    @property
    def checkpoint_path(self) -> Path:
        """Path of the best checkpoint."""
        return self.save_dir / self.filename

    def attach(self, engine: Engine) -> None:
        """Judge the model at the end of every evaluation round of ``engine``."""
        from ignite.engine import Events

        attach_once(engine, [(Events.EPOCH_COMPLETED, self)])

    def __call__(self, engine: Engine) -> None:
        """Save the model when this round is the best so far."""
        metrics = metrics_as_floats(engine.state.metrics)
        ranked = [self.metric] + ([self.tie_breaker] if self.tie_breaker else [])
        missing = [name for name in (*ranked, self.threshold_metric) if name not in metrics]
        if missing:
            raise KeyError(f"BestModelSaver: engine.state.metrics has no {missing}; available: {sorted(metrics)}")
        key = tuple(_rank(metrics[name]) for name in ranked)
        if self.best_key is not None and key <= self.best_key:
            return
        self.best_key, self.best_epoch = key, int(engine.state.epoch)
        self._save(metrics, self.best_epoch)

    def _save(self, metrics: dict[str, float], epoch: int) -> None:
        point = {
            "threshold": metrics[self.threshold_metric],
            "max_fpr": self.max_fpr,
            "metric": self.metric,
            "value": metrics[self.metric],
        }
        weights = {name: tensor.detach().cpu() for name, tensor in _unwrap(self.network).state_dict().items()}
        checkpoint = {"model": weights, "operating_point": point, "epoch": epoch, "metrics": metrics}
        summary = {
            "epoch": epoch,
            "operating_point": {k: finite_or_none(v) if isinstance(v, float) else v for k, v in point.items()},
            "metrics": {k: finite_or_none(v) for k, v in metrics.items()},
        }
        self.save_dir.mkdir(parents=True, exist_ok=True)
        summary_path = self.save_dir / f"{Path(self.filename).stem}_metrics.json"
        _atomic_write(self.checkpoint_path, lambda f: torch.save(checkpoint, f))
        _atomic_write(summary_path, lambda f: f.write(json.dumps(summary, indent=2, allow_nan=False).encode()))
        # one artifact folder per saved epoch, so that every registered version keeps its own weights
        log_artifact(self.mlflow_handler, self.checkpoint_path, f"checkpoint/epoch_{epoch:03d}")
        log_artifact(self.mlflow_handler, summary_path, f"checkpoint/epoch_{epoch:03d}")
        if self.registered_model_name is not None:
            self._register(point, epoch)

    def _register(self, point: dict[str, Any], epoch: int) -> None:
        client = self.mlflow_handler.client  # type: ignore[union-attr]
        run_id = active_run_id(self.mlflow_handler)  # type: ignore[arg-type]
        try:
            client.create_registered_model(self.registered_model_name)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        source = f"{client.get_run(run_id).info.artifact_uri}/checkpoint/epoch_{epoch:03d}/{self.filename}"
        tags = {"epoch": str(epoch), **{f"operating_point.{k}": str(v) for k, v in point.items()}}
        client.create_model_version(self.registered_model_name, source, run_id=run_id, tags=tags)
