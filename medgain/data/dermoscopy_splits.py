"""Dermoscopy splits: a patient-grouped test hold-out and cross-validation folds, shared by every run through one
fold table; items of one fold; items for inference."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medgain.data.datalist import scan_folder
from medgain.data.dermoscopy import read_dermoscopy_csv
from medgain.data.folds import FOLDS_COLUMNS, check_patient_splits, grouped_stratified_folds, read_folds_csv

__all__ = [
    "TEST_FOLD", "dermoscopy_cv_items", "dermoscopy_inference_items", "draw_patient_folds", "fold_items",
    "write_fold_table",
]

#: fold number of the held-out test images in the fold table.
TEST_FOLD = -1


def _patient_folds(path: Path) -> dict[str, int]:
    read_folds_csv(path)  # validates the table (columns, integer folds, one fold per patient)
    with path.open(newline="") as f:
        return {row["patient"]: int(row["fold"]) for row in csv.DictReader(f)}


def draw_patient_folds(
    labels: Sequence[int], patients: Sequence[str], n_folds: int, seed: int = 0, test_fraction: float = 0.2
) -> np.ndarray:
    """The folds :func:`dermoscopy_cv_items` draws: a label-stratified ``test_fraction`` of the patients held out
    (fold :data:`TEST_FOLD`; ``1 / test_fraction`` rounded is the number of groups it is drawn from), the rest in
    ``n_folds`` grouped, stratified folds (:func:`grouped_stratified_folds`).

    Returns:
        (N,) int64 fold per sample.
    """
    y = np.asarray(labels)
    held = np.zeros(len(y), bool)
    if test_fraction > 0:
        held = grouped_stratified_folds(y, patients, max(2, round(1.0 / test_fraction)), seed) == 0
    rest = np.flatnonzero(~held)
    folds = np.full(len(y), TEST_FOLD, np.int64)
    folds[rest] = grouped_stratified_folds(y[rest], [patients[i] for i in rest], n_folds, seed + 1)
    return folds


def write_fold_table(items: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write a fold table (columns ``image, patient, label, fold``) atomically, as ``folds_source`` reads it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FOLDS_COLUMNS)
        for item in items:
            writer.writerow([item["image"], item["patient"], int(item["label"]), int(item["fold"])])
    os.replace(tmp, path)


def dermoscopy_cv_items(
    csv_path: str | os.PathLike,
    image_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    mask_dir: str | os.PathLike | None = None,
    n_folds: int = 5,
    seed: int = 0,
    test_fraction: float = 0.2,
    folds_source: str | os.PathLike | None = None,
    test_csv: str | os.PathLike | None = None,
    test_image_dir: str | os.PathLike | None = None,
    verify_images: bool = True,
) -> dict[str, list[dict]]:
    """Read an ISIC 2020 / HAM10000 CSV (see :func:`read_dermoscopy_csv`) and give every image a fold.

    Fold ``0 .. n_folds - 1`` are the cross-validation folds, :data:`TEST_FOLD` (-1) the held-out test images.
    No patient spans two folds or a fold and the test split. The folds come from, in this order:

    1. ``folds_source``, an existing table (e.g. of the full-image run when training on crops of the same
       images), through each image's patient;
    2. ``<output_dir>/folds.csv`` when it exists (a resumed run, another fold of the same run);
    3. otherwise they are drawn: the test patients are ``test_csv``'s (its images are the test split), or a
       label-stratified ``test_fraction`` of the patients; the rest are split by
       :func:`grouped_stratified_folds`.

    The table of these images (columns image, patient, label, fold) is written to ``<output_dir>/folds.csv``.

    Args:
        csv_path: the training CSV.
        image_dir: folder of its images.
        output_dir: folder of ``folds.csv``.
        mask_dir: folder of ``<image>_segmentation.png`` masks (some or all images).
        n_folds: cross-validation folds (>= 2).
        seed: seed of the drawn folds.
        test_fraction: share of the patients held out for testing when there is no ``test_csv`` (0 for none;
            otherwise ``1 / test_fraction`` is rounded to the number of groups the test group is drawn from).
        folds_source: fold table to follow.
        test_csv: a separate test CSV in the same layout.
        test_image_dir: folder of the test CSV's images; default ``image_dir``.
        verify_images: decode every image once (see :func:`read_dermoscopy_csv`).

    Returns:
        ``{"cv": items with fold >= 0, "test": items with fold -1}``; items as :func:`read_dermoscopy_csv` gives
        them plus ``fold``.

    Raises:
        ValueError: for a patient with images in training and in the test CSV (naming both images), a patient the
            fold table does not hold, a table whose folds are not ``n_folds``, and the errors of the readers.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    out = Path(output_dir)
    table = out / "folds.csv"
    items = read_dermoscopy_csv(csv_path, image_dir, mask_dir, verify_images=verify_images)
    test: list[dict] = []
    if test_csv is not None:
        test = read_dermoscopy_csv(test_csv, test_image_dir or image_dir, mask_dir, verify_images=verify_images)
        check_patient_splits(items, test, held_out_name=f"test ({test_csv})")
        test = [{**item, "fold": TEST_FOLD} for item in test]
    source = Path(folds_source) if folds_source is not None else (table if table.is_file() else None)
    if source is not None:
        patient_fold = _patient_folds(source)
        cv_folds = sorted({f for f in patient_fold.values() if f != TEST_FOLD})
        if cv_folds != list(range(n_folds)):
            raise ValueError(f"{source}: holds folds {cv_folds}, but n_folds is {n_folds}")
        assigned = []
        for item in items:
            if item["patient"] not in patient_fold:
                raise ValueError(
                    f"{csv_path}, row {item['row']}: patient {item['patient']!r} of image {item['image_name']} is "
                    f"not in the fold table {source}"
                )
            assigned.append({**item, "fold": patient_fold[item["patient"]]})
        for item in test:
            if patient_fold.get(item["patient"], TEST_FOLD) != TEST_FOLD:
                raise ValueError(
                    f"{test_csv}, row {item['row']}: patient {item['patient']!r} of test image {item['image_name']} "
                    f"is in training fold {patient_fold[item['patient']]} of {source}"
                )
    else:
        folds = draw_patient_folds([item["label"] for item in items], [item["patient"] for item in items], n_folds,
                                   seed, test_fraction if test_csv is None else 0.0)
        assigned = [{**item, "fold": int(fold)} for item, fold in zip(items, folds)]
    everything = assigned + test
    write_fold_table(everything, table)
    return {
        "cv": [item for item in assigned if item["fold"] != TEST_FOLD],
        "test": [item for item in everything if item["fold"] == TEST_FOLD],
    }


def fold_items(items: Sequence[Mapping[str, Any]], fold: int, split: str) -> list[dict]:
    """The items of one cross-validation round: ``split`` "training" (every fold but ``fold``) or "validation"
    (``fold`` only).

    Raises:
        ValueError: for an unknown split, or a fold that no item has.
    """
    if split not in ("training", "validation"):
        raise ValueError(f"split must be 'training' or 'validation', got {split!r}")
    folds = sorted({int(item["fold"]) for item in items})
    if int(fold) not in folds:
        raise ValueError(f"fold {fold} not among the folds of the items {folds}")
    keep = (lambda f: f != fold) if split == "training" else (lambda f: f == fold)
    return [dict(item) for item in items if keep(int(item["fold"]))]


def dermoscopy_inference_items(
    input_dir: str | os.PathLike, input_csv: str | os.PathLike | None = None
) -> tuple[list[dict], list[dict]]:
    """Images to run a trained model on, and the inputs that cannot be read.

    With ``input_csv`` (ISIC 2020 / HAM10000 layout; its label columns are read but unused) the images are the
    CSV's, with their metadata; without, every image under ``input_dir`` with unknown metadata.

    Returns:
        ``(items, errors)``: items with ``image``, ``frame`` and ``clinical``; errors ``{"file", "reason"}`` (for
        ``medgain.data.write_errors_csv``) for every missing, corrupt or unreadable image: the other images are
        processed.
    """
    if input_csv is None:
        found, errors = scan_folder(input_dir, extensions=(".png", ".jpg", ".jpeg"))
        return [{**item, "clinical": {}} for item in found], errors
    errors = []
    items = read_dermoscopy_csv(input_csv, input_dir, errors=errors)
    errors = [{"file": e["file"], "reason": e["reason"]} for e in errors]
    return [{**item, "frame": 0} for item in items], errors
