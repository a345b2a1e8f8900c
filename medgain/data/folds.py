"""Cross-validation folds stratified by label and grouped by patient, and the ``folds.csv`` table."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FOLDS_COLUMNS",
    "assign_folds",
    "check_patient_splits",
    "grouped_stratified_folds",
    "read_folds_csv",
    "write_folds_csv",
]

FOLDS_COLUMNS = ("image", "patient", "label", "fold")


def grouped_stratified_folds(
    labels: Sequence[int] | np.ndarray, groups: Sequence[Any], n_folds: int, seed: int = 0
) -> np.ndarray:
    """Assign every sample to one of ``n_folds`` folds so that no group (patient) spans two folds and every fold
    holds about the same share of each class.

    Groups are visited in a seeded random order, those with the most positives first, then the largest; each goes
    to the fold where the sum over classes of the squared class share per fold grows least (ties: the fold with
    the fewest samples, then the lowest index). Positives are thereby spread first, as evenly as the groups allow.

    Args:
        labels: (N,) 0/1 labels (any non-zero label counts as positive).
        groups: (N,) patient ids.
        n_folds: number of folds, at least 2.
        seed: seed of the visiting order among equal groups.

    Returns:
        (N,) int64 fold index in ``[0, n_folds)``.

    Raises:
        ValueError: for mismatched lengths, ``n_folds < 2``, fewer groups than folds, or fewer groups with a
            positive sample than folds (a fold without positives has no AUC).
    """
    y = (np.asarray(labels).reshape(-1) != 0).astype(np.int64)
    g = np.asarray([str(v) for v in groups])
    if y.size != g.size:
        raise ValueError(f"grouped_stratified_folds: {y.size} labels but {g.size} groups")
    if n_folds < 2:
        raise ValueError(f"grouped_stratified_folds: n_folds must be at least 2, got {n_folds}")
    names, inverse = np.unique(g, return_inverse=True)
    negatives = np.bincount(inverse, weights=1 - y, minlength=names.size)
    counts = np.stack([negatives, np.bincount(inverse, weights=y, minlength=names.size)], axis=1)
    n_pos_groups = int((counts[:, 1] > 0).sum())
    if names.size < n_folds:
        raise ValueError(f"grouped_stratified_folds: {names.size} patients cannot fill {n_folds} folds")
    if n_pos_groups < n_folds:
        raise ValueError(
            f"grouped_stratified_folds: only {n_pos_groups} patients have a positive image, fewer than the "
            f"{n_folds} folds; every fold needs a positive"
        )
    totals = np.maximum(counts.sum(0), 1.0)
    shuffled = np.random.default_rng(seed).permutation(names.size)
    order = shuffled[np.lexsort((-counts[shuffled].sum(1), -counts[shuffled, 1]))]
    fold_counts = np.zeros((n_folds, 2))
    group_fold = np.empty(names.size, np.int64)
    for group in order:
        share = (fold_counts + counts[group]) / totals
        growth = (share**2).sum(1) - ((fold_counts / totals) ** 2).sum(1)
        best = np.lexsort((np.arange(n_folds), fold_counts.sum(1), np.round(growth, 12)))[0]
        group_fold[group] = best
        fold_counts[best] += counts[group]
    return group_fold[inverse]


def write_folds_csv(
    items: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    n_folds: int,
    seed: int = 0,
    image_key: str = "image",
    patient_key: str = "patient",
    label_key: str = "label",
    filename: str = "folds.csv",
) -> tuple[list[dict], Path]:
    """Split datalist items into grouped, stratified folds and write the fold table.

    Args:
        items: datalist items with an image path, a patient id and a 0/1 label.
        output_dir: folder of the table (created if missing).
        n_folds: number of folds.
        seed: fold seed (see :func:`grouped_stratified_folds`).
        image_key: item key of the image path.
        patient_key: item key of the patient id.
        label_key: item key of the label.
        filename: name of the table.

    Returns:
        the items with a ``fold`` entry added, and the path of the table (columns image, patient, label, fold).

    Raises:
        KeyError: naming the first item that lacks a key.
        ValueError: see :func:`grouped_stratified_folds`.
    """
    for index, item in enumerate(items):
        missing = [k for k in (image_key, patient_key, label_key) if k not in item]
        if missing:
            raise KeyError(f"write_folds_csv: item {index} ({item.get(image_key, '?')}) has no {missing}")
    folds = grouped_stratified_folds(
        [int(item[label_key]) for item in items], [item[patient_key] for item in items], n_folds, seed
    )
    path = Path(output_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FOLDS_COLUMNS)
        for item, fold in zip(items, folds):
            writer.writerow([item[image_key], item[patient_key], int(item[label_key]), int(fold)])
    return [{**item, "fold": int(fold)} for item, fold in zip(items, folds)], path


def read_folds_csv(path: str | os.PathLike) -> dict[str, int]:
    """Read a fold table written by :func:`write_folds_csv` and check that no patient spans two folds.

    Returns:
        image path → fold.

    Raises:
        FileNotFoundError: when the table does not exist.
        ValueError: naming the file and row for a missing column, a non-integer fold, a repeated image or a
            patient in two folds.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: fold table not found")
    folds: dict[str, int] = {}
    patient_fold: dict[str, tuple[int, int]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in FOLDS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        for row_number, row in enumerate(reader, start=2):
            try:
                fold = int(row["fold"])
            except ValueError:
                raise ValueError(f"{path}, row {row_number}: fold {row['fold']!r} is not an integer") from None
            if row["image"] in folds:
                raise ValueError(f"{path}, row {row_number}: image {row['image']} is listed twice")
            first = patient_fold.setdefault(row["patient"], (fold, row_number))
            if first[0] != fold:
                raise ValueError(
                    f"{path}, row {row_number}: patient {row['patient']!r} is in fold {fold} but row {first[1]} "
                    f"puts them in fold {first[0]}"
                )
            folds[row["image"]] = fold
    return folds


def assign_folds(
    items: Sequence[Mapping[str, Any]], folds_csv: str | os.PathLike, patient_key: str = "patient"
) -> list[dict]:
    """Give items the folds of an existing fold table, through their patient, so that derived items (e.g. crops
    of the same images) and resumed runs use the same folds.

    Returns:
        new items with ``fold`` set.

    Raises:
        ValueError: naming the first item whose patient the table does not hold (and the table errors of
            :func:`read_folds_csv`).
    """
    path = Path(folds_csv)
    read_folds_csv(path)  # validates the table
    with path.open(newline="") as f:
        patient_fold = {row["patient"]: int(row["fold"]) for row in csv.DictReader(f)}
    out = []
    for index, item in enumerate(items):
        patient = str(item[patient_key])
        if patient not in patient_fold:
            raise ValueError(
                f"item {index} ({item.get('image', '?')}): patient {patient!r} is not in the fold table {path}"
            )
        out.append({**item, "fold": patient_fold[patient]})
    return out


def check_patient_splits(
    training: Sequence[Mapping[str, Any]],
    held_out: Sequence[Mapping[str, Any]],
    patient_key: str = "patient",
    image_key: str = "image",
    held_out_name: str = "test",
) -> None:
    """Raise when a patient of the held-out split also has an image in the training items.

    Raises:
        ValueError: naming the patient and both images.
    """
    held = {str(item[patient_key]): item.get(image_key, "?") for item in held_out}
    for index, item in enumerate(training):
        patient = str(item[patient_key])
        if patient in held:
            raise ValueError(
                f"training item {index} ({item.get(image_key, '?')}): patient {patient!r} also has "
                f"{held[patient]} in the {held_out_name} split; a patient's images must stay in one split"
            )
