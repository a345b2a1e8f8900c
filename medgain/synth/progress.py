"""Progress lines for the synthetic-data generators (one line per tenth of the work, on stderr)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["ProgressCallback", "print_progress"]

#: called by a generator after each item as ``progress(done, total)``
ProgressCallback = Callable[[int, int], None]


def print_progress(label: str, steps: int = 10, stream: TextIO | None = None) -> ProgressCallback:
    """A progress callback that prints ``<label>: <done> / <total> (<percent> %), <seconds> s`` at every
    ``1 / steps`` of the work and at its end.

    Args:
        label: what is being made, e.g. "synthetic capsule frames".
        steps: lines per run (at least 1).
        stream: where the lines go (default: ``sys.stderr``, so that a command's standard output stays parseable).

    Returns:
        a callable ``(done, total) -> None`` for a generator's ``progress`` argument.

    Raises:
        ValueError: when ``steps`` is below 1.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    start = time.perf_counter()
    printed = [0]  # the last step printed

    def progress(done: int, total: int) -> None:
        step = steps if done >= total else done * steps // max(total, 1)
        if step > printed[0]:
            printed[0] = step
            elapsed = time.perf_counter() - start
            out = stream if stream is not None else sys.stderr
            print(f"{label}: {done} / {total} ({100 * done // max(total, 1)} %), {elapsed:.0f} s", file=out, flush=True)

    return progress
