"""Shared benchmark plumbing: argument parsing, device choice and side-by-side timing."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch


def parser(description: str, batch_size: int) -> argparse.ArgumentParser:
    """Common options: sizes, repetitions, device and AMP."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    return p


def machine(device: str) -> str:
    """One line naming the machine the figures come from."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def alternate(
    candidates: dict[str, Callable[[], None]], rounds: int, device: str, warm_up: bool = True
) -> dict[str, float]:
    """Median seconds per call of each candidate, measured in alternation after one warm-up call each (skipped
    with ``warm_up=False``, for callers that warm up on a smaller input)."""
    def timed(fn: Callable[[], None]) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in candidates.values() if warm_up else ():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in samples.items()}
