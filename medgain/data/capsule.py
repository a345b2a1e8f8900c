"""Data-set assembly used by the bundles: datalist split → frame items with the mask budget applied."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from medgain.data.datalist import apply_mask_budget, expand_frames, load_datalist

__all__ = ["prepare_items", "write_errors_csv"]


def prepare_items(datalist: str | os.PathLike, split: str, masks_fraction: float = 1.0, seed: int = 0) -> list[dict]:
    """Items of one split, one per frame (multi-frame DICOM expanded), with ``has_mask`` from the mask budget.

    Args:
        datalist: MONAI datalist JSON; paths are relative to its folder.
        split: "training", "validation" or "test".
        masks_fraction: fraction of the positives with a label map that keep their mask (1.0, 0.1, 0.01 …).
        seed: seed of the mask-budget choice.
    """
    return apply_mask_budget(expand_frames(load_datalist(datalist, split)), masks_fraction, seed)


def write_errors_csv(errors: Sequence[dict], output_dir: str | os.PathLike, filename: str = "errors.csv") -> Path:
    """Write the unreadable inputs (``{"file", "reason"}`` rows) to ``output_dir/filename``; returns its path."""
    path = Path(output_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "reason"])
        writer.writeheader()
        writer.writerows({"file": str(e["file"]), "reason": str(e["reason"])} for e in errors)
    return path
