"""Data-set assembly used by the bundles: datalist split → frame items with the mask budget applied."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from medgain.data.datalist import apply_mask_budget, expand_frames, load_datalist
from medgain.outputs import write_csv_atomic

__all__ = ["check_image_splits", "check_study_splits", "prepare_items", "write_errors_csv"]


def check_image_splits(datalist: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> None:
    """Raise ValueError when one image file is listed in two splits of a datalist: its frames would leak between
    training and evaluation. Paths are compared resolved (``..``, ``.`` and symbolic links followed); every item
    stands for all the frames of its file (see :func:`medgain.data.datalist.expand_frames`), so a file in two
    splits is an error whatever frame the items name.

    Args:
        datalist: MONAI datalist JSON.
        base_dir: folder that relative ``image`` paths are relative to; default: the JSON's folder.
    """
    path = Path(datalist)
    base = Path(base_dir) if base_dir is not None else path.parent
    content = json.loads(path.read_text())
    owner: dict[Path, tuple[str, str]] = {}
    for split, items in content.items():
        if not isinstance(items, list):
            continue
        for item in items:
            image = item.get("image") if isinstance(item, dict) else None
            if not isinstance(image, str):
                continue
            resolved = (base / image).resolve()
            first_split, first_name = owner.setdefault(resolved, (split, image))
            if first_split != split:
                raise ValueError(
                    f"{datalist}: image file {resolved} appears in both '{first_split}' and '{split}' (listed as "
                    f"{first_name!r} and {image!r}); frames of one file must stay in one split"
                )


def check_study_splits(
    datalist: str | os.PathLike, study_key: str = "study", base_dir: str | os.PathLike | None = None
) -> None:
    """Raise ValueError when a study (patient) or an image file appears in two splits of a datalist: its frames
    would leak between training and evaluation. Items without ``study_key`` are not checked for studies; image
    files are checked by :func:`check_image_splits`.

    Args:
        datalist: MONAI datalist JSON.
        study_key: item key of the study (patient) identifier.
        base_dir: folder that relative ``image`` paths are relative to; default: the JSON's folder.
    """
    content = json.loads(Path(datalist).read_text())
    owner: dict[str, str] = {}
    for split, items in content.items():
        if not isinstance(items, list):
            continue
        for item in items:
            study = item.get(study_key) if isinstance(item, dict) else None
            if study is None:
                continue
            if owner.setdefault(str(study), split) != split:
                raise ValueError(
                    f"{datalist}: study {study!r} appears in both '{owner[str(study)]}' and '{split}'; "
                    "frames of one study must stay in one split"
                )
    check_image_splits(datalist, base_dir)


def prepare_items(datalist: str | os.PathLike, split: str, masks_fraction: float = 1.0, seed: int = 0) -> list[dict]:
    """Items of one split, one per frame (multi-frame DICOM expanded), with ``has_mask`` from the mask budget.

    The datalist is validated first (files exist, labels are integers, no study and no image file spans two
    splits). The mask budget ranks frames by their path relative to the datalist's folder.

    Args:
        datalist: MONAI datalist JSON; paths are relative to its folder.
        split: "training", "validation" or "test".
        masks_fraction: fraction of the positives with a label map that keep their mask (1.0, 0.1, 0.01 …).
        seed: seed of the mask-budget choice.
    """
    items = load_datalist(datalist, split)
    check_study_splits(datalist)
    return apply_mask_budget(expand_frames(items), masks_fraction, seed, base_dir=Path(datalist).parent)


def write_errors_csv(errors: Sequence[dict], output_dir: str | os.PathLike, filename: str = "errors.csv") -> Path:
    """Write the unreadable inputs (``{"file", "reason"}`` rows) to ``output_dir/filename``, whole or not at all
    (:func:`medgain.outputs.write_csv_atomic`); returns its path."""
    rows = [(str(e["file"]), str(e["reason"])) for e in errors]
    return write_csv_atomic(Path(output_dir) / filename, ["file", "reason"], rows)
