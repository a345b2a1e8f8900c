"""Tags that make an MLflow run findable: bundle, network, options, seed, data hash, medgain commit, links."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException

from medgain.handlers.utils import active_run_id, attach_once
from medgain.model_file import load_checkpoint
from medgain.tracking import medgain_commit

if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

__all__ = ["RunTags"]

logger = logging.getLogger(__name__)


class RunTags:
    """At ``Events.STARTED`` tags the MLflow run of ``mlflow_handler`` (list it after that handler).

    Every run gets ``medgain_commit``. With ``checkpoint`` (an evaluation of a trained model) the run is linked
    to where the model comes from: tags ``training_run_id``, ``model_name`` and ``model_version`` from the
    checkpoint's provenance, and the registered model version gets the tag ``evaluation_run_id`` (latest
    evaluation) back when that version is in the run's tracking store.

    Args:
        mlflow_handler: the MONAI ``MLFlowHandler`` owning the run.
        tags: name → value (None values are skipped); ``description`` becomes the run description.
        checkpoint: model file whose provenance links the run, or None.
    """

    def __init__(
        self, mlflow_handler: MLFlowHandler, tags: Mapping[str, Any] | None = None, checkpoint: str | None = None
    ) -> None:
        self.mlflow_handler = mlflow_handler
        self.tags = dict(tags or {})
        self.checkpoint = checkpoint

    def attach(self, engine: Engine) -> None:
        """Tag the run when ``engine`` starts."""
        from ignite.engine import Events

        attach_once(engine, [(Events.STARTED, self)])

    def __call__(self, engine: Engine) -> None:
        """Set the tags."""
        from medgain.tracking import run_tags

        client = self.mlflow_handler.client
        run_id = active_run_id(self.mlflow_handler)
        tags = run_tags(**self.tags, medgain_commit=medgain_commit())
        provenance: Mapping[str, Any] = {}
        if self.checkpoint is not None:
            saved = load_checkpoint(self.checkpoint)
            provenance = saved.get("provenance", {}) if isinstance(saved, Mapping) else {}
            tags |= {
                "training_run_id": str(provenance.get("run_id", "unknown")),
                "model_name": str(provenance.get("model_name", "unregistered")),
                "model_version": str(provenance.get("model_version", "unregistered")),
            }
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if provenance.get("model_name") and provenance.get("model_version"):
            try:
                client.set_model_version_tag(
                    provenance["model_name"], provenance["model_version"], "evaluation_run_id", run_id
                )
            except MlflowException as err:  # a model file registered in another tracking store
                logger.warning(
                    "%s v%s is not in this tracking store (%s); the evaluation run keeps its provenance tags only",
                    provenance["model_name"],
                    provenance["model_version"],
                    err.message,
                )
