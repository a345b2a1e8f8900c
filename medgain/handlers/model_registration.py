"""At the end of training: the best model's figures on the run, and one registered model version per run."""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from mlflow.entities import Metric

from medgain.handlers.best_checkpoint import BestModelSaver
from medgain.metrics.confidence import operating_point_words
from medgain.handlers.utils import active_run_id, attach_once
from medgain.model_file import load_checkpoint, load_model_weights, unwrap
from medgain.tracking.buffered import BufferedClient
from medgain.tracking.delivery import register_model_version

if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

__all__ = ["ModelRegistration", "describe_model"]

logger = logging.getLogger(__name__)


def describe_model(checkpoint: dict[str, Any], run_name: str) -> str:
    """A model version's description: where it comes from, its validation figures and its operating point."""
    spec = checkpoint.get("model_spec", {})
    point = checkpoint["operating_point"]
    metrics = checkpoint.get("metrics", {})
    lines = [
        f"Best model of training run {run_name} (epoch {checkpoint.get('epoch')}): {spec.get('network')} at "
        f"{'x'.join(map(str, spec.get('image_size', [])))}, classes {spec.get('class_names')}.",
        "Validation: "
        + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if math.isfinite(v) and "threshold" not in k)
        + ".",
    ]
    if point.get("threshold") is None:
        lines.append(f"NO OPERATING POINT: {point.get('reason')}. This model takes no ill / healthy decisions.")
    else:
        lines.append(
            f"Operating point: ill when log-odds >= {point['threshold']:.6g} (p >= {point['probability']:.6g}), "
            f"chosen on validation for FPR <= {point['max_fpr']:g}: {operating_point_words(point)}."
        )
    return "\n".join(lines)


class ModelRegistration:
    """Attached to the trainer: at ``Events.COMPLETED`` reports the best model of the run and registers it once.

    On the training run it logs ``best_epoch`` and the best round's metrics as ``best_<name>`` (e.g.
    ``best_val_auc``). With ``registered_model_name`` it logs the best checkpoint's network with MLflow's PyTorch
    flavour in its pickle-free ``pt2`` format (``torch.export``; input / output signature from the model spec)
    under the run's ``model/`` artifacts, creates ONE new
    version of the registered model with a description (figures, operating point) and tags, points the alias
    ``alias`` at it, tags the run with the version, and writes the provenance (run id, model name and version)
    into the checkpoint so that evaluation runs can link back. A model without an operating point is registered
    with the tag ``operating_point = none: <reason>``. With a
    :class:`~medgain.handlers.buffered_mlflow.BufferedMLFlowHandler` the registration is queued in the run's
    journal and done (provenance included) when the journal reaches the server, also after an outage.

    List it before the trainer's ``MLFlowHandler`` so that it runs before the handler closes the run.

    Args:
        best_model: the validation evaluator's :class:`~medgain.handlers.best_checkpoint.BestModelSaver`.
        mlflow_handler: the MONAI ``MLFlowHandler`` owning the training run.
        registered_model_name: name in the MLflow model registry, or None to only log the best figures.
        alias: registry alias moved to each new version (the newest candidate for review).
        tags: extra model-version tags (e.g. bundle, data hash).
    """

    def __init__(
        self,
        best_model: BestModelSaver,
        mlflow_handler: MLFlowHandler,
        registered_model_name: str | None = None,
        alias: str = "candidate",
        tags: dict[str, Any] | None = None,
    ) -> None:
        self.best_model = best_model
        self.mlflow_handler = mlflow_handler
        self.registered_model_name = registered_model_name
        self.alias = alias
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self.version: str | None = None

    def attach(self, engine: Engine) -> None:
        """Report and register when ``engine`` (the trainer) completes."""
        from ignite.engine import Events

        attach_once(engine, [(Events.COMPLETED, self)])

    def __call__(self, engine: Engine) -> None:
        """Log the best figures and register the best model."""
        best = self.best_model
        if best.best_epoch is None or not best.checkpoint_path.is_file():
            logger.warning("ModelRegistration: no validation round saved a model; nothing to report or register")
            return
        client = self.mlflow_handler.client
        run_id = active_run_id(self.mlflow_handler)
        stamp = int(time.time() * 1000)
        figures = [Metric("best_epoch", float(best.best_epoch), stamp, 0)] + [
            Metric(f"best_{name}", value, stamp, 0) for name, value in best.best_metrics.items() if math.isfinite(value)
        ]
        client.log_batch(run_id, metrics=figures)
        if self.registered_model_name is None:
            return
        checkpoint = load_checkpoint(best.checkpoint_path)
        self._log_pytorch_model(run_id, best.checkpoint_path, checkpoint)
        point = checkpoint["operating_point"]
        tags = {
            **self.tags,
            "epoch": str(checkpoint["epoch"]),
            **{f"operating_point.{k}": str(v) for k, v in point.items() if k != "reason"},
        }
        if point.get("threshold") is None:
            tags["operating_point"] = f"none: {point.get('reason')}"
        else:
            tags["operating_point.statement"] = operating_point_words(point)  # also for files that predate it
        if isinstance(client, BufferedClient):  # registered when the journal reaches the server
            description = describe_model(checkpoint, self.mlflow_handler.cur_run.info.run_name)
            client.register_model(
                run_id, self.registered_model_name, self.alias, tags, description, best.checkpoint_path
            )
            logger.info(
                "registration of %s (epoch %s) queued with the run's tracking records",
                self.registered_model_name,
                checkpoint["epoch"],
            )
            return
        description = describe_model(checkpoint, client.get_run(run_id).info.run_name)
        self.version = register_model_version(
            client, run_id, self.registered_model_name, self.alias, tags, description, best.checkpoint_path
        )

    def _log_pytorch_model(self, run_id: str, path: Path, checkpoint: dict[str, Any]) -> None:
        import mlflow.pytorch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        spec = checkpoint.get("model_spec")
        if spec is None:
            raise ValueError(
                f"{path}: holds no model_spec; give BestModelSaver a model_spec so that the registered model carries "
                "its input size and classes"
            )
        network = copy.deepcopy(unwrap(self.best_model.network)).cpu().eval()
        load_model_weights(network, path)
        # a batch of 2 (not 1) keeps the exported batch dimension dynamic; zeros: only the shapes are traced
        example = [np.zeros((2, spec["in_channels"], *spec["image_size"]), np.float32)]
        inputs = [TensorSpec(np.dtype(np.float32), (-1, spec["in_channels"], *spec["image_size"]), "image")]
        if getattr(network, "num_metadata", 0):  # a fused model: forward(image, metadata)
            example.append(np.zeros((2, network.num_metadata), np.float32))
            inputs.append(TensorSpec(np.dtype(np.float32), (-1, network.num_metadata), "metadata"))
        signature = ModelSignature(
            inputs=Schema(inputs),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec["num_classes"]), "logits")]),
        )
        from medgain import __version__

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            mlflow.pytorch.save_model(  # pt2: torch.export's graph format, loaded without unpickling code
                network,
                local,
                signature=signature,
                input_example=tuple(example),
                pip_requirements=[f"medgain=={__version__}", f"torch=={torch.__version__.split('+')[0]}"],
                serialization_format="pt2",
                metadata={"model_spec": spec, "operating_point": checkpoint["operating_point"]},
            )
            self.mlflow_handler.client.log_artifacts(run_id, str(local), "model")
