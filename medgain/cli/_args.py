"""argparse helpers shared by the command groups."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Fractions", "bounded"]


def bounded(kind: Callable[[str], int | float], low: float, high: float | None = None) -> Callable[[str], int | float]:
    """An argparse ``type`` converting with ``kind`` and checking ``low <= value (<= high)``."""

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return convert


class Fractions(argparse.Action):
    """Store fractions (each already range-checked by ``type``) after checking that they sum to 1."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        values = list(values or [])
        if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
            parser.error(f"argument {option_string}: must sum to 1, got {' + '.join(map(str, values))}")
        setattr(namespace, self.dest, values)
