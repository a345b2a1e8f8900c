"""Run a MONAI transform without MetaTensor bookkeeping, for that call only (no process-wide switch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from monai.data import get_track_meta, set_track_meta
from monai.transforms import Randomizable, Transform

__all__ = ["WithoutMetad"]


class WithoutMetad(Randomizable, Transform):
    """Apply ``transform`` (e.g. a random flip) with MONAI's metadata tracking off, so that plain tensors stay plain
    tensors, and restore the caller's setting afterwards. MONAI's spatial transforms otherwise wrap each image in a
    ``MetaTensor`` and record every operation on it: on small images that bookkeeping costs several times the
    operation, and a ``MetaTensor`` slows every later operation of the model it reaches.

    The random state passes straight to ``transform``, so a ``Compose`` seeds it as it would seed ``transform``
    itself: the same draws as without the wrapper.

    Args:
        transform: the transform to apply.
    """

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform

    def set_random_state(self, seed: int | None = None, state: Any = None) -> WithoutMetad:
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed=seed, state=state)
        return self

    def randomize(self, data: Any) -> None:
        """The wrapped transform draws its own parameters when called."""

    def __call__(self, data: Any) -> Any:
        previous = get_track_meta()
        set_track_meta(False)
        try:
            return self.transform(data)
        finally:
            set_track_meta(previous)
