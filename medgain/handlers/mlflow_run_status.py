"""Mark the MLflow run FAILED (with the error) when training raises, instead of leaving it RUNNING."""

from __future__ import annotations

from typing import TYPE_CHECKING

from monai.handlers import MLFlowHandler

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["MLflowRunStatus"]


class MLflowRunStatus:
    """On ``EXCEPTION_RAISED``: tag the run with the error, set its status to FAILED, then re-raise.

    List it before MONAI's ``StatsHandler`` (whose exception handler re-raises first) so that a crashed run is
    visible as such in the MLflow UI, with everything logged up to the failure kept.

    Args:
        mlflow_handler: MONAI ``MLFlowHandler`` that owns the run.
    """

    def __init__(self, mlflow_handler: MLFlowHandler) -> None:
        self.mlflow_handler = mlflow_handler

    def attach(self, engine: Engine) -> None:
        """Register the exception handler."""
        from ignite.engine import Events

        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine: Engine, error: Exception) -> None:
        """Record the failure and re-raise ``error``."""
        run = self.mlflow_handler.cur_run
        if run is not None:
            client = self.mlflow_handler.client
            client.set_tag(run.info.run_id, "error", f"{type(error).__name__}: {error}"[:5000])
            client.set_terminated(run.info.run_id, "FAILED")
            self.mlflow_handler.cur_run = None
        raise error
