"""Keep only the newest periodic training checkpoints, including those a previous (resumed) process left."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from medgain.handlers.utils import attach_once

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["CheckpointPruner"]

logger = logging.getLogger(__name__)


class CheckpointPruner:
    """After each epoch, deletes the ``<prefix>_checkpoint_epoch=N.pt`` files in ``save_dir`` beyond the ``keep`` newest.

    MONAI's ``CheckpointSaver`` only forgets the files its own process wrote, so a resumed run otherwise leaves
    the killed run's ``checkpoint_epoch=2.pt`` beside its new ``checkpoint_epoch=3.pt``. Attach it after the
    saver (files are removed only once the newer one exists).

    Args:
        save_dir: the saver's folder.
        prefix: the saver's ``file_prefix``.
        keep: how many of the newest epoch checkpoints to keep.
    """

    def __init__(self, save_dir: str, prefix: str = "checkpoint", keep: int = 1) -> None:
        if keep < 1:
            raise ValueError(f"CheckpointPruner: keep must be at least 1, got {keep}")
        self.save_dir = Path(save_dir)
        self.pattern = re.compile(rf"^{re.escape(prefix)}_(?:checkpoint_)?epoch=(\d+)\.pt$")
        self.keep = keep

    def attach(self, engine: Engine) -> None:
        """Prune after every epoch of ``engine`` (the trainer)."""
        from ignite.engine import Events

        attach_once(engine, [(Events.EPOCH_COMPLETED, self)])

    def __call__(self, engine: Engine | None = None) -> None:
        """Delete the older epoch checkpoints."""
        found = []
        for path in self.save_dir.glob("*.pt"):
            match = self.pattern.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        for _, path in sorted(found)[: -self.keep]:
            path.unlink(missing_ok=True)
            logger.info("removed the older checkpoint %s", path)
