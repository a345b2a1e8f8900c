"""Keep a failed training run recoverable: save a last checkpoint and mark the MLflow run FAILED with the cause."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.handlers import MLFlowHandler

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["TrainingFailureHandler", "root_cause"]


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
    the trainer's (the engine itself), in the format of MONAI's ``CheckpointSaver`` / ``CheckpointLoader``, so a
    run resumes from it with ``--resume_from``. The MLflow run keeps everything logged so far and gets an
    ``error`` tag with the root cause (e.g. "path/to/frame.png: cannot decode image ...").

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
        """Save, record the failure and re-raise ``error``."""
        if self.save_path is not None:
            state = {name: obj.state_dict() for name, obj in {**self.save_dict, "trainer": engine}.items()}
            self.save_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.save_path.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, self.save_path)
        run = self.mlflow_handler.cur_run if self.mlflow_handler is not None else None
        if run is not None:
            cause = root_cause(error)
            client = self.mlflow_handler.client
            client.set_tag(run.info.run_id, "error", f"{type(cause).__name__}: {cause}"[:5000])
            client.set_terminated(run.info.run_id, "FAILED")
            self.mlflow_handler.cur_run = None
        raise error
