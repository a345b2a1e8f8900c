"""Keep a failed training run recoverable: save a last checkpoint and mark the MLflow run FAILED with the cause."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai.handlers import MLFlowHandler

from medgain.data.phi import pseudonymise_text
from medgain.handlers.checkpoint_saver import training_state
from medgain.model_file import save_checkpoint

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["TrainingFailureHandler", "root_cause"]

logger = logging.getLogger(__name__)


def root_cause(error: BaseException) -> BaseException:
    """The error under MONAI's transform wrappers (``RuntimeError("applying transform ...") from err``): for a bad
    input file, medgain's own message that names the file, not the library error it was raised from."""
    while (
        error.__cause__ is not None
        and isinstance(error, RuntimeError)
        and str(error).startswith("applying transform")
    ):
        error = error.__cause__
    return error


class TrainingFailureHandler:
    """On ``EXCEPTION_RAISED``: save a resumable checkpoint, mark the MLflow run FAILED, then re-raise.

    List it FIRST among the engine's handlers: MONAI handlers such as ``StatsHandler`` re-raise from their own
    exception handler, after which no later handler runs. The checkpoint holds ``save_dict``'s state dicts plus
    the trainer's (the engine itself), in the format of MONAI's ``CheckpointSaver`` / ``CheckpointLoader``, written
    atomically, so a run resumes from it with ``--resume_from`` (list the tracking handler in ``save_dict`` to
    resume into the same MLflow run). The MLflow run keeps everything logged so far and gets an
    ``error`` tag with the root cause, its paths and file names as salted pseudonyms
    (:func:`medgain.data.phi.pseudonymise_text`, e.g. "f-3b5e910360275bb4: cannot decode image ..."); the local
    log keeps the real names, with the pseudonyms beside them.

    Args:
        mlflow_handler: MONAI ``MLFlowHandler`` that owns the run, or None.
        save_dir: folder of the checkpoint, or None not to save one.
        save_dict: objects with ``state_dict()`` to save, e.g. ``{"model": net, "optimizer": opt}``.
        filename: checkpoint file name in ``save_dir``.
    """

    def __init__(
        self,
        mlflow_handler: MLFlowHandler | None = None,
        save_dir: str | os.PathLike | None = None,
        save_dict: Mapping[str, Any] | None = None,
        filename: str = "checkpoint_last.pt",
    ) -> None:
        self.mlflow_handler = mlflow_handler
        self.save_path = Path(save_dir) / filename if save_dir is not None else None
        self.save_dict = dict(save_dict or {})

    def attach(self, engine: Engine) -> None:
        """Register the exception handler."""
        from ignite.engine import Events

        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine: Engine, error: Exception) -> None:
        """Save, record the failure and re-raise ``error`` (a failed save is logged, never hides ``error``)."""
        if self.save_path is not None:
            try:
                self.save_path.parent.mkdir(parents=True, exist_ok=True)
                save_checkpoint(self.save_path, training_state(self.save_dict, engine))
                logger.error("training failed; its last state is saved to %s (resume with --resume_from)",
                             self.save_path)
            except OSError as save_error:
                logger.error("training failed and its last state could not be saved: %s", save_error)
        run = self.mlflow_handler.cur_run if self.mlflow_handler is not None else None
        if run is not None:
            cause = root_cause(error)
            message = f"{type(cause).__name__}: {cause}"
            tagged = pseudonymise_text(message)
            if tagged != message:
                logger.error("training failed: %s (in MLflow, as the tag error: %s)", message, tagged)
            client = self.mlflow_handler.client
            client.set_tag(run.info.run_id, "error", tagged[:5000])
            client.set_terminated(run.info.run_id, "FAILED")
            self.mlflow_handler.cur_run = None
        raise error
