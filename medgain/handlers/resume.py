"""Optional resume of a training run from a checked checkpoint, or from the newest valid one (``auto``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai.handlers import CheckpointLoader
from torch import nn

from medgain.model_file import find_training_checkpoint, load_training_checkpoint, unwrap

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["ResumeFromCheckpoint"]

logger = logging.getLogger(__name__)


class ResumeFromCheckpoint:
    """Restore network, optimizer, tracking run and trainer state before training starts; no-op without a
    checkpoint.

    A bundle can always list this handler and let the user pass ``--resume_from PATH`` (a training checkpoint,
    e.g. ``models/checkpoint_last.pt``) or ``--resume_from auto``: the newest valid checkpoint in ``save_dir``
    (most trainer iterations; truncated or foreign files are passed over with a warning; a fresh start when the
    folder holds none). The checkpoint is checked first: a truncated, corrupt or foreign file, or one without a
    state for each object of ``load_dict``, is an error naming the file. Objects other than the trainer are
    restored at once (a :class:`~medgain.handlers.BufferedMLFlowHandler` under ``tracking`` then continues the
    checkpoint's MLflow run when it starts); the trainer at ``Events.STARTED`` through MONAI's
    ``CheckpointLoader``. A checkpoint written before tracking was saved in it resumes into a new run.

    Args:
        load_path: checkpoint to resume from, ``"auto"``, or None / "" to start fresh.
        load_dict: objects to restore, e.g. ``{"model": net, "optimizer": opt, "trainer": trainer,
            "tracking": mlflow_handler}``.
        save_dir: folder searched by ``auto`` (the checkpoint saver's).
        prefix: file name prefix searched by ``auto``.

    Raises:
        FileNotFoundError: when ``load_path`` is given but does not exist.
        ValueError: when ``auto`` is given without ``save_dir``.
    """

    def __init__(
        self,
        load_path: str | os.PathLike | None,
        load_dict: Mapping[str, Any],
        save_dir: str | os.PathLike | None = None,
        prefix: str = "checkpoint",
    ) -> None:
        self.auto = str(load_path) == "auto"
        if self.auto and save_dir is None:
            raise ValueError("ResumeFromCheckpoint: resume_from='auto' needs save_dir (the checkpoint folder)")
        self.load_path = None if self.auto or not load_path else Path(load_path)
        if self.load_path is not None and not self.load_path.is_file():
            raise FileNotFoundError(f"resume checkpoint not found: {self.load_path}")
        self.load_dict = dict(load_dict)
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.prefix = prefix

    def _required(self) -> list[str]:
        return [key for key in self.load_dict if key != "tracking"]

    def resolve(self) -> Path | None:
        """The checkpoint to resume from (``auto``: the newest valid one in ``save_dir``, or None)."""
        if not self.auto or self.save_dir is None:
            return self.load_path
        path, skipped = find_training_checkpoint(self.save_dir, self._required(), f"{self.prefix}*.pt")
        for reason in skipped:
            logger.warning("resume_from auto: passed over %s", reason)
        if path is None:
            logger.info("resume_from auto: no valid checkpoint in %s; training starts afresh", self.save_dir)
        else:
            logger.info("resume_from auto: resuming from %s", path)
        return path

    def attach(self, engine: Engine) -> None:
        """Check the checkpoint, restore the objects, and register the trainer's restore."""
        from ignite.engine import Engine as IgniteEngine

        path = self.resolve()
        if path is None:
            return
        checkpoint = load_training_checkpoint(path, self._required())
        engines = {}
        for key, obj in self.load_dict.items():
            if isinstance(obj, IgniteEngine):
                engines[key] = obj
                continue
            if key not in checkpoint:
                logger.warning("%s holds no %r state (an older checkpoint); it resumes into a new run", path, key)
                continue
            try:
                (unwrap(obj) if isinstance(obj, nn.Module) else obj).load_state_dict(checkpoint[key])
            except (RuntimeError, ValueError, KeyError) as err:
                raise ValueError(f"{path}: the {key!r} state does not fit this run ({err})") from err
        if engines:
            CheckpointLoader(load_path=str(path), load_dict=engines, map_location="cpu").attach(engine)
