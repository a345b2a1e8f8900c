"""Training checkpoints that a kill or a full disk cannot spoil: atomic saves, old ones removed only afterwards."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from medgain.handlers.checkpoint_pruner import CheckpointPruner
from medgain.handlers.utils import attach_once
from medgain.model_file import save_checkpoint, unwrap

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["TrainingCheckpointSaver", "training_state"]

logger = logging.getLogger(__name__)


def training_state(save_dict: Mapping[str, Any], engine: Engine) -> dict[str, Any]:
    """``{name: obj.state_dict()}`` of ``save_dict`` plus the trainer's (``trainer``), as MONAI's
    ``CheckpointLoader`` reads it; a ``DistributedDataParallel`` / ``DataParallel`` model is saved unwrapped (as
    ignite does), so single- and multi-GPU runs resume from each other's checkpoints."""
    objects = {**save_dict, "trainer": engine}
    return {name: (unwrap(obj) if isinstance(obj, nn.Module) else obj).state_dict() for name, obj in objects.items()}


class TrainingCheckpointSaver:
    """Every ``save_interval`` epochs writes ``<prefix>_epoch=<N>.pt`` and at the end ``final_filename``.

    Each file is written to a temporary file in ``save_dir``, flushed to disk and renamed over the target, so a
    kill during a save never leaves a truncated checkpoint, and an error (a full disk, a read-only folder) is
    raised naming the file while the previous checkpoint stays intact. Older epoch checkpoints (beyond
    ``keep``, including a previous process's) are removed only after the new one is in place. The files are
    in MONAI's ``CheckpointSaver`` format (``--resume_from`` / :class:`~medgain.handlers.ResumeFromCheckpoint`).

    Args:
        save_dir: folder of the checkpoints; created when missing.
        save_dict: objects with ``state_dict()``, e.g. ``{"model": net, "optimizer": opt, "tracking":
            mlflow_handler}``; the trainer's state is added as ``trainer``.
        prefix: file name prefix.
        save_interval: epochs between saves.
        keep: how many epoch checkpoints to keep.
        final_filename: file written when training completes, or None for none.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        prefix: str = "checkpoint",
        save_interval: int = 1,
        keep: int = 1,
        final_filename: str | None = "checkpoint_last.pt",
    ) -> None:
        if save_interval < 1:
            raise ValueError(f"TrainingCheckpointSaver: save_interval must be at least 1, got {save_interval}")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.prefix = prefix
        self.save_interval = int(save_interval)
        self.final_filename = final_filename
        self.pruner = CheckpointPruner(str(save_dir), prefix, keep)

    def attach(self, engine: Engine) -> None:
        """Save after epochs and at completion of ``engine`` (the trainer)."""
        from ignite.engine import Events

        attach_once(engine, [(Events.EPOCH_COMPLETED, self), (Events.COMPLETED, self.save_final)])

    def __call__(self, engine: Engine) -> None:
        """Save the epoch checkpoint (every ``save_interval`` epochs) and prune the older ones."""
        epoch = int(engine.state.epoch)
        if epoch % self.save_interval:
            return
        self.save(engine, f"{self.prefix}_epoch={epoch}.pt")
        self.pruner()

    def save_final(self, engine: Engine) -> None:
        """Write ``final_filename``."""
        if self.final_filename:
            self.save(engine, self.final_filename)

    def save(self, engine: Engine, filename: str) -> Path:
        """Write one checkpoint atomically; its path."""
        self.save_dir.mkdir(parents=True, exist_ok=True)
        path = self.save_dir / filename
        try:
            save_checkpoint(path, training_state(self.save_dict, engine))
        except OSError as err:
            kept = sorted(p.name for p in self.save_dir.glob(f"{self.prefix}*.pt") if p != path)
            raise OSError(err.errno, f"{err.strerror}; the checkpoints already in {self.save_dir} are kept: "
                          f"{', '.join(kept) or 'none'}") from err
        logger.info("saved checkpoint %s", path)
        return path
