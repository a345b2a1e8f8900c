"""MONAI's MLFlowHandler with buffered tracking: an outage of the tracking server never blocks or ends a run."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai.handlers import MLFlowHandler

from medgain.tracking.buffered import BufferedClient, open_run

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["BufferedMLFlowHandler"]


class BufferedMLFlowHandler(MLFlowHandler):
    """``MLFlowHandler`` whose ``client`` writes to an on-disk journal in ``buffer_dir`` and returns at once; a
    background thread sends the journal to the tracking server in order, exactly once (see
    :mod:`medgain.tracking`). While the server is unreachable training goes on at full speed, with one
    warning; what is not delivered when the run closes (after ``offline_timeout`` seconds of trying) stays in
    the journal and is sent by the next run in ``buffer_dir`` or by ``medgain sync BUFFER_DIR``. Handlers that
    log through ``mlflow_handler.client`` (artifacts, tags, model registration) are buffered the same way.

    Handlers of one process with the same ``buffer_dir`` share one run (the trainer's and the evaluator's).
    Listed in a checkpoint's ``save_dict`` (e.g. as ``tracking``), the checkpoint carries the run's journal id
    and MLflow run id; :class:`~medgain.handlers.resume.ResumeFromCheckpoint` then continues that run (back to
    RUNNING, history continuous). A run whose process was killed and never resumed is marked KILLED at the next
    start in ``buffer_dir`` or by ``medgain runs doctor``.

    Args:
        buffer_dir: folder of the run journals, beside the checkpoints (e.g. ``<ckpt_dir>/tracking``).
        offline_timeout: seconds to keep trying an unreachable server when the run closes.
        engine_params: log the engine's ``max_epochs`` and ``epoch_length`` as params (as MONAI does); False for
            evaluation runs, where these training-only numbers mean nothing.
        kwargs: ``MLFlowHandler`` arguments (``tracking_uri``, ``experiment_name``, ``run_name``,
            ``experiment_param``, ``output_transform``, ``iteration_log``, ``epoch_log``, ``close_on_complete``,
            ``artifacts``…); ``dataset_dict`` is not supported (MLflow dataset inputs need the server).

    Raises:
        ValueError: when ``dataset_dict`` is given.
    """

    def __init__(
        self, buffer_dir: str | os.PathLike, offline_timeout: float = 10.0, engine_params: bool = True, **kwargs: Any
    ) -> None:
        if kwargs.get("dataset_dict") is not None:
            raise ValueError("BufferedMLFlowHandler: dataset_dict is not supported (it needs the tracking server)")
        super().__init__(**kwargs)
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or self.client.tracking_uri
        self.buffer_dir = Path(buffer_dir)
        self.offline_timeout = float(offline_timeout)
        self.client = BufferedClient(tracking_uri)  # type: ignore[assignment]
        self._resume: dict[str, Any] | None = None
        self.engine_params = engine_params

    def state_dict(self) -> dict[str, str]:
        """The run this handler tracks (journal id and, once the server has it, MLflow run id), for checkpoints."""
        run = self.client.run
        if run is None:
            return {"journal_id": "", "run_id": ""}
        return {"journal_id": run.journal.journal_id, "run_id": str(run.journal.state.get("run_id") or "")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the run a checkpoint names when this handler starts."""
        if self.cur_run is not None:
            raise RuntimeError("BufferedMLFlowHandler: the run has started; load the checkpoint before it starts")
        self._resume = {k: str(v) for k, v in state.items()}

    def start(self, engine: Engine) -> None:
        """Open (or continue, or join) the run, then log the params."""
        if self.cur_run is None:
            run = open_run(
                self.buffer_dir,
                self.client.tracking_uri,
                self.experiment_name,
                self.run_name or "run",
                self.artifact_location,
                resume=self._resume,
                offline_timeout=self.offline_timeout,
            )
            self.client.run = run
            self.cur_run = run
        logged = self.client.run.params if self.client.run is not None else {}
        # as MONAI: the engine's max_epochs / epoch_length are logged by the first engine of the run only
        engine_params = self.default_tracking_params if self.engine_params else []
        params = {a: getattr(engine.state, a, None) for a in engine_params if a not in logged}
        self._log_params({**(self.experiment_param or {}), **params})

    def close(self) -> None:
        """End the run as FINISHED and deliver what is left (see ``offline_timeout``)."""
        if self.cur_run is not None:
            self.client.set_terminated(self.cur_run.info.run_id, self.run_finish_status)
            self.cur_run = None
