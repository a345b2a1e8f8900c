"""The patch data set of the whole-slide bundle: slides split by slide, patch tables per split, MONAI datalists.

Layout of a data set folder (written by :func:`make_patch_dataset`, or by hand with your own coordinates)::

    slides_<split>.csv    slide, label (1 = tumour), image, annotation   (one row per slide of the split)
    patches_<split>.csv   slide, x, y, level, label, coverage             (see medgain.wsi.patches)

for ``split`` in training, validation, test. Paths (``image``, ``annotation``, the patch tables' ``slide``) are
absolute or relative to the folder; a patch table's ``slide`` must name a slide of the same split's slide table.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medgain.wsi.evaluate import read_slide_labels
from medgain.wsi.inference import MPP_TOLERANCE, same_magnification
from medgain.wsi.patches import balance_patches, read_patch_table, slides_patch_table, write_patch_table
from medgain.wsi.slide import Slide, SlideError

__all__ = [
    "SLIDE_SUFFIXES",
    "SPLITS",
    "make_patch_dataset",
    "patch_datalist",
    "scan_slides",
    "split_mpp",
    "split_slides",
    "split_slides_table",
]

logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "test")

#: file suffixes taken as whole-slide images when a folder is scanned
SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms")


def split_slides(
    slides: Sequence[Mapping[str, Any]], fractions: Sequence[float], seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Slides split into training / validation / test, stratified by slide label (no slide in two splits).

    Per label, the validation and test counts are ``round(n * fraction)``, at least one when the fraction is
    positive; training takes the rest (at least one). Every split with a positive fraction thus holds both
    labels, which needs, per label, one slide for training and one for each other split requested.

    Args:
        slides: rows with a 0/1 ``label``.
        fractions: three non-negative numbers (training, validation, test) summing to 1.
        seed: random seed.

    Raises:
        ValueError: for fractions that are not three non-negative numbers summing to 1, or too few slides of a
            label for the splits requested (the message says how many are needed).
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    requested = [name for name, f in zip(SPLITS, fractions) if f > 0]
    needed = 1 + sum(1 for f in fractions[1:] if f > 0)
    labels = [int(r["label"]) for r in slides]
    have = {label: labels.count(label) for label in (0, 1)}
    if min(have.values()) < needed:
        raise ValueError(
            f"too few slides for the splits {', '.join(requested)} (fractions {list(fractions)}): each needs tumour "
            f"and normal slides, so {needed} tumour and {needed} normal slides are needed; there are "
            f"{have[1]} tumour and {have[0]} normal. Add slides, or request fewer splits (e.g. fractions 1 0 0: "
            "training only)"
        )
    rng = np.random.default_rng([seed, 0x5B17])
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    labels = np.array([int(r["label"]) for r in slides])
    for label in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == label))
        n = members.size
        counts = []
        for f in fractions[1:]:
            k = int(round(n * f))
            if f > 0 and k == 0 and n - sum(counts) > 1:
                k = 1
            counts.append(min(k, max(n - sum(counts) - 1, 0)))
        n_val, n_test = counts
        out["validation"] += members[:n_val].tolist()
        out["test"] += members[n_val : n_val + n_test].tolist()
        out["training"] += members[n_val + n_test :].tolist()
    return {s: [dict(slides[i]) for i in sorted(idx)] for s, idx in out.items()}


def _relative(path: str, folder: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(folder)) if path else ""


def split_slides_table(dataset_dir: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """Rows of ``dataset_dir/slides_<split>.csv``: slide, label, image, annotation (paths resolved against the
    folder, see :func:`medgain.wsi.read_slide_labels`)."""
    rows = read_slide_labels(Path(dataset_dir) / f"slides_{split}.csv", annotation_column="annotation")
    for row in rows:
        row["image"] = os.path.normpath(row["image"])
        row["annotation"] = os.path.normpath(row["annotation"]) if row["annotation"] else ""
    return rows


def make_patch_dataset(
    labels_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    level: int,
    patch_size: int,
    *,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    annotation_column: str = "annotation_xml",
    max_per_class: int | None = None,
    max_eval_patches: int | None = None,
    **table_kwargs: Any,
) -> dict[str, int]:
    """Split the slides of a label CSV by slide and write the data set folder (see the module docstring).

    Training patches are balanced (as many normal as tumour patches, at most ``max_per_class`` each);
    validation and test keep every tissue patch (at most ``max_eval_patches``, drawn at random), so that
    sensitivity at a low false-alarm rate is measured on the slides' own mix.

    Args:
        labels_csv: slide label CSV (slide, label, image, ``annotation_column``), as ``medgain synth wsi`` writes.
        out_dir: the data set folder (may be the label CSV's folder).
        level: pyramid level of the patches.
        patch_size: patch side in pixels of ``level``.
        fractions: training, validation and test shares of the slides (stratified by slide label).
        seed: random seed of the split and the sampling.
        annotation_column: column of ``labels_csv`` with the annotation files (ASAP XML or GeoJSON).
        max_per_class: cap on training patches per class.
        max_eval_patches: cap on validation / test patches per split.
        table_kwargs: passed to :func:`medgain.wsi.patch_table` (stride, min_coverage, min_tissue, backend ...).

    Returns:
        patches per table, ``{"training": n, "training_tumour": n, "validation": ...}``.

    Raises:
        ValueError: naming the file for a bad label CSV, too few slides for the splits (see
            :func:`split_slides`), or when the training slides give no tumour or no normal patch.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slides = read_slide_labels(labels_csv, annotation_column)
    counts: dict[str, int] = {}
    try:
        splits = split_slides(slides, fractions, seed)
    except ValueError as err:
        raise ValueError(f"{labels_csv}: {err}") from None
    for i, (split, members) in enumerate(splits.items()):
        table_rows = slides_patch_table(members, level, patch_size, **table_kwargs)
        if split == "training":
            try:
                table_rows = balance_patches(table_rows, max_per_class, seed)
            except ValueError as err:
                raise ValueError(f"{labels_csv}: the training slides give no usable patch table: {err}") from None
        elif max_eval_patches is not None and len(table_rows) > max_eval_patches:
            keep = np.sort(np.random.default_rng([seed, i]).choice(len(table_rows), max_eval_patches, replace=False))
            table_rows = [table_rows[k] for k in keep]
        for row in table_rows:
            row["slide"] = _relative(row["slide"], out)
        write_patch_table(table_rows, out / f"patches_{split}.csv")
        tmp = out / f".slides_{split}.csv.tmp"
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=("slide", "label", "image", "annotation"))
            writer.writeheader()
            for s in members:
                writer.writerow(
                    {
                        "slide": s["slide"],
                        "label": s["label"],
                        "image": _relative(s["image"], out),
                        "annotation": _relative(s["annotation"], out),
                    }
                )
        os.replace(tmp, out / f"slides_{split}.csv")
        counts[split] = len(table_rows)
        counts[f"{split}_tumour"] = sum(int(r["label"]) for r in table_rows)
        counts[f"{split}_slides"] = len(members)
    return counts


def split_mpp(
    dataset_dir: str | os.PathLike,
    split: str,
    level: int,
    backend: str = "tifffile",
    default_mpp: float | None = None,
    tolerance: float = MPP_TOLERANCE,
) -> float | None:
    """Microns per pixel at ``level`` of the slides of a split: the magnification a model trained on them learns.

    Args:
        dataset_dir: the data set folder (see the module docstring).
        split: training, validation or test.
        level: pyramid level of the patches.
        backend: WSI backend.
        default_mpp: microns per pixel assumed for slides without resolution tags.
        tolerance: relative spread of the slides' values beyond which a warning names the extremes.

    Returns:
        The median over the slides, or None (with a warning) when no slide has resolution tags and no
        ``default_mpp`` is given.
    """
    values: dict[str, float] = {}
    for row in split_slides_table(dataset_dir, split):
        with Slide(row["image"], backend=backend, default_mpp=default_mpp) as slide:
            if slide.mpp is not None or default_mpp is not None:
                values[row["image"]] = slide.mpp_at(level)
    if not values:
        logger.warning(
            "%s: the %s slides have no resolution tags and no default_mpp is given: the model will not know the "
            "magnification it was trained at, and inference cannot check it",
            dataset_dir,
            split,
        )
        return None
    median = float(np.median(list(values.values())))
    low, high = min(values, key=values.__getitem__), max(values, key=values.__getitem__)
    if not (same_magnification(values[low], median, tolerance) and same_magnification(values[high], median, tolerance)):
        logger.warning(
            "%s slides of %s differ in magnification at level %d: %s has %.4g, %s %.4g microns per pixel; the "
            "model records the median, %.4g",
            split,
            dataset_dir,
            level,
            low,
            values[low],
            high,
            values[high],
            median,
        )
    return median


def patch_datalist(
    dataset_dir: str | os.PathLike,
    split: str,
    patch_size: int | None = None,
    level: int | None = None,
    mpp: float | None = None,
    backend: str = "tifffile",
    default_mpp: float | None = None,
) -> list[dict[str, Any]]:
    """MONAI ``PatchWSIDataset`` items of a split (see :func:`medgain.wsi.patch_items`), with the slide's
    annotation file and ``index``, the row of the patch in ``patches_<split>.csv``.

    Args:
        dataset_dir: the data set folder (see the module docstring).
        split: training, validation or test.
        patch_size: patch side at the rows' level, set as each item's ``size``.
        level: the level every row must have (the level the network is trained and run at); None: any.
        mpp: microns per pixel the model was trained at (its spec's ``mpp``): every slide of the split must have
            it at ``level``, within :data:`~medgain.wsi.MPP_TOLERANCE`; None: not checked.
        backend: WSI backend (for the ``mpp`` check).
        default_mpp: microns per pixel assumed for slides without resolution tags (for the ``mpp`` check).

    Raises:
        FileNotFoundError: when the split's tables are missing.
        ValueError: naming the files when a patch's slide is not in the split's slide table, a tumour patch's
            slide has no annotation (its mask for GAIN would be empty), a row is at another level, or a slide
            is at another magnification than ``mpp``.
    """
    folder = Path(dataset_dir)
    table, slides_csv = folder / f"patches_{split}.csv", folder / f"slides_{split}.csv"
    for path in (table, slides_csv):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: not found; write the data set with `medgain wsi patches` (see the bundle's docs/README.md)"
            )
    annotations = {os.path.abspath(s["image"]): s["annotation"] for s in split_slides_table(folder, split)}
    items = []
    for index, row in enumerate(read_patch_table(table)):
        slide = os.path.abspath(os.path.join(folder, row["slide"]))
        if slide not in annotations:
            raise ValueError(f"{table}, line {index + 2}: slide {row['slide']!r} is not listed in {slides_csv}")
        if level is not None and row["level"] != level:
            raise ValueError(
                f"{table}, line {index + 2}: patch at level {row['level']}, the bundle runs at level {level}"
            )
        if row["label"] == 1 and not annotations[slide]:
            raise ValueError(
                f"{table}, line {index + 2}: tumour patch of {row['slide']!r}, which has no annotation in {slides_csv}"
            )
        item = {
            "image": slide,
            "location": [row["y"], row["x"]],
            "level": row["level"],
            "label": row["label"],
            "annotation": annotations[slide],
            "index": index,
        }
        if patch_size is not None:
            item["size"] = [int(patch_size), int(patch_size)]
        items.append(item)
    if not items:
        raise ValueError(f"{table}: no patches")
    if mpp is not None:
        _check_mpp(sorted({(item["image"], item["level"]) for item in items}), mpp, backend, default_mpp)
    return items


def _check_mpp(
    slides: Sequence[tuple[str, int]], mpp: float, backend: str, default_mpp: float | None
) -> None:
    """Refuse (slide, level) pairs whose microns per pixel are not the model's ``mpp`` (within the tolerance)."""
    purpose = f"checking it against the {mpp:g} microns per pixel the model was trained at"
    for path, level in slides:
        with Slide(path, backend=backend, default_mpp=default_mpp) as slide:
            found = slide.mpp_at(level, purpose)
        if not same_magnification(found, mpp):
            raise SlideError(
                f"{path}: {found:.4g} microns per pixel at level {level}, the model was trained at {mpp:.4g} "
                f"(more than {MPP_TOLERANCE:.0%} apart): its patches would be seen at another magnification. "
                "Write the patch tables at the level of the model's magnification (`medgain wsi patches --level`)"
            )


def scan_slides(source: str | os.PathLike) -> list[str]:
    """Slide files of ``source``: a folder (its files with a :data:`SLIDE_SUFFIXES` suffix, recursively, sorted),
    a CSV with an ``image`` column (paths relative to its folder), or one slide file.

    Raises:
        FileNotFoundError: when ``source`` does not exist.
        ValueError: naming ``source`` when it holds no slide.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such slide folder, list or file")
    if source.is_dir():
        found = sorted(str(p) for p in source.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
    elif source.suffix.lower() == ".csv":
        found = _slide_list_csv(source)
    else:
        found = [str(source)]
    if not found:
        raise ValueError(f"{source}: no slide files ({', '.join(SLIDE_SUFFIXES)})")
    return found


def _slide_list_csv(path: Path) -> list[str]:
    """The ``image`` column of a CSV, resolved against its folder."""
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if "image" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: a slide list needs an 'image' column (has {reader.fieldnames})")
        return [str(path.parent / row["image"]) for row in reader if row["image"]]
