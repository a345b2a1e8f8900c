"""Optional resume of a training run from a full checkpoint."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai.handlers import CheckpointLoader

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["ResumeFromCheckpoint"]


class ResumeFromCheckpoint:
    """Restore network, optimizer and trainer state from ``load_path`` before training starts; no-op without one.

    A bundle can always list this handler and let the user pass ``--resume_from PATH`` (a checkpoint written by
    MONAI's ``CheckpointSaver``, e.g. ``models/checkpoint_last.pt``).

    Args:
        load_path: checkpoint to resume from, or None / "" to start fresh.
        load_dict: objects to restore, e.g. ``{"model": net, "optimizer": opt, "trainer": trainer}``.

    Raises:
        FileNotFoundError: when ``load_path`` is given but does not exist.
    """

    def __init__(self, load_path: str | os.PathLike | None, load_dict: Mapping[str, Any]) -> None:
        self.load_path = Path(load_path) if load_path else None
        if self.load_path is not None and not self.load_path.is_file():
            raise FileNotFoundError(f"resume checkpoint not found: {self.load_path}")
        self.load_dict = dict(load_dict)

    def attach(self, engine: Engine) -> None:
        """Register MONAI's CheckpointLoader on the trainer when a checkpoint was given."""
        if self.load_path is not None:
            CheckpointLoader(load_path=str(self.load_path), load_dict=self.load_dict, map_location="cpu").attach(engine)
