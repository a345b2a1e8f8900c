"""Dermoscopy datalists from the published ISIC 2020 and HAM10000 CSVs, and the patient-metadata encoding.

ISIC 2020 (``ISIC_2020_Training_GroundTruth.csv`` / Kaggle ``train.csv``): ``image_name, patient_id, sex,
age_approx, anatom_site_general_challenge, diagnosis, benign_malignant, target``, images ``<image_name>.jpg``.
HAM10000 (``HAM10000_metadata.csv``): ``lesion_id, image_id, dx, dx_type, age, sex, localization``, melanoma is
``dx == "mel"``, images ``<image_id>.jpg`` (often split over two folders); there is no patient id, so the lesion
id groups the images. Masks, where present, are ``<image>_segmentation.png`` (the ISIC naming).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DERMOSCOPY_LAYOUTS",
    "LABEL_COLUMNS",
    "MetadataEncoder",
    "check_predictive_metadata",
    "read_dermoscopy_csv",
]

#: columns that encode the diagnosis: never model inputs.
LABEL_COLUMNS = frozenset({"diagnosis", "benign_malignant", "target", "dx", "dx_type"})
#: per layout: image-id column, patient column, default metadata columns, numeric metadata columns.
DERMOSCOPY_LAYOUTS: dict[str, dict[str, Any]] = {
    "isic2020": {
        "image": "image_name",
        "patient": "patient_id",
        "label": "target",
        "metadata": ("sex", "age_approx", "anatom_site_general_challenge"),
        "numeric": ("age_approx",),
    },
    "ham10000": {
        "image": "image_id",
        "patient": "lesion_id",
        "label": "dx",
        "metadata": ("sex", "age", "localization"),
        "numeric": ("age",),
    },
}
UNKNOWN = "unknown"
_MISSING = {"", "unknown", "nan", "na", "n/a", "none", "null"}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _detect_layout(path: Path, columns: Sequence[str]) -> str:
    for name, layout in DERMOSCOPY_LAYOUTS.items():
        if {layout["image"], layout["patient"], layout["label"]} <= set(columns):
            return name
    raise ValueError(
        f"{path}: not an ISIC 2020 (image_name, patient_id, target) or HAM10000 (image_id, lesion_id, dx) CSV; "
        f"columns: {list(columns)}"
    )


def _label(path: Path, row_number: int, layout: str, value: str) -> int:
    value = value.strip()
    if layout == "ham10000":
        if not value:
            raise ValueError(f"{path}, row {row_number}: empty 'dx'")
        return int(value.lower() == "mel")
    if value not in ("0", "1", "0.0", "1.0"):
        raise ValueError(f"{path}, row {row_number}: 'target' must be 0 or 1, got {value!r}")
    return int(float(value))


def _find_image(name: str, image_dirs: Sequence[Path]) -> Path | None:
    for folder in image_dirs:
        for suffix in _IMAGE_SUFFIXES:
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _image_size(path: Path, decode: bool) -> tuple[int, int]:
    """(H, W) of an image; with ``decode`` the whole file is decoded (JPEGs at 1/8 scale, which still reads every
    compressed block), so truncated or corrupt files are found."""
    try:
        with Image.open(path) as img:
            size = (img.height, img.width)
            if decode:
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
            return size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        error = ValueError(f"{path}: cannot decode image ({err})")
        error.file = str(path)  # type: ignore[attr-defined]
        raise error from err


def _metadata_value(path: Path, row_number: int, column: str, value: str | None, numeric: bool) -> str | float | None:
    text = (value or "").strip()
    if text.lower() in _MISSING:
        return None
    if not numeric:
        return text
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{path}, row {row_number}: {column} must be a number or empty, got {text!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{path}, row {row_number}: {column} is {text!r}")
    return number


def _row_files(
    path: Path, row_number: int, name: str, folders: Sequence[Path], mask_dir: str | os.PathLike | None, decode: bool
) -> tuple[Path, tuple[int, int], Path | None]:
    """The image of a CSV row, its (H, W) and its mask (None when there is none); errors carry ``file``."""
    image = _find_image(name, folders)
    if image is None:
        err = FileNotFoundError(
            f"{path}, row {row_number}: image {name} not found as {name}.jpg in {[str(d) for d in folders]}"
        )
        err.file = str(folders[0] / f"{name}.jpg")  # type: ignore[attr-defined]
        raise err
    size = _image_size(image, decode)
    mask = Path(mask_dir) / f"{name}_segmentation.png" if mask_dir is not None else None
    if mask is None or not mask.is_file():
        return image, size, None
    mask_size = _image_size(mask, decode)
    if mask_size != size:
        mismatch = ValueError(
            f"{mask}: mask is {mask_size[0]}x{mask_size[1]} but its image {image} is {size[0]}x{size[1]}"
        )
        mismatch.file = str(mask)  # type: ignore[attr-defined]
        raise mismatch
    return image, size, mask


def read_dermoscopy_csv(
    csv_path: str | os.PathLike,
    image_dirs: str | os.PathLike | Sequence[str | os.PathLike],
    mask_dir: str | os.PathLike | None = None,
    layout: str = "auto",
    metadata_columns: Sequence[str] | None = None,
    numeric_columns: Sequence[str] | None = None,
    verify_images: bool = True,
    errors: list[dict] | None = None,
) -> list[dict]:
    """Datalist items from an ISIC 2020 or HAM10000 CSV as published.

    Every row becomes one item (or, with ``errors``, an error row); nothing is dropped silently. Missing metadata
    (an empty cell, "unknown", "nan") becomes None and is encoded as a category of its own by
    :class:`MetadataEncoder`.

    Args:
        csv_path: the metadata / ground-truth CSV.
        image_dirs: folder(s) holding ``<image>.jpg`` (``.jpeg`` / ``.png`` accepted).
        mask_dir: optional folder of ``<image>_segmentation.png`` lesion masks, for some or all images.
        layout: "isic2020", "ham10000" or "auto" (from the columns).
        metadata_columns: metadata columns to keep; default: the layout's sex, age and site columns.
        numeric_columns: which of them are numbers; default: the layout's age column.
        verify_images: decode every image (and mask) once to find corrupt files; False only checks that they
            exist and reads their headers.
        errors: for inference: when a list is given, a row whose image is missing or unreadable, or whose mask is
            unreadable or of another size, is appended to it as ``{"file", "row", "reason"}`` (see
            ``medgain.data.write_errors_csv``) instead of raising, and the other rows are read.

    Returns:
        items ``{"image", "label" (1 = melanoma), "patient", "image_name", "clinical" ({column: value or None}),
        "image_size" ([H, W]), "row"}`` plus ``"label_map"`` (mask path) where a mask exists.

    Raises:
        FileNotFoundError: for a missing CSV, image folder or image (naming the CSV row).
        ValueError: naming the file (and row) for a missing column, a label column requested as metadata, an
            invalid label or number, an empty patient id, a repeated image, a corrupt image or mask, or a mask
            whose size differs from its image.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CSV not found")
    folders = [Path(image_dirs)] if isinstance(image_dirs, (str, os.PathLike)) else [Path(d) for d in image_dirs]
    for folder in folders + ([Path(mask_dir)] if mask_dir is not None else []):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: folder not found")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    if layout == "auto":
        layout = _detect_layout(path, columns)
    if layout not in DERMOSCOPY_LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {sorted(DERMOSCOPY_LAYOUTS)}, got {layout!r}")
    spec = DERMOSCOPY_LAYOUTS[layout]
    meta_cols = list(spec["metadata"] if metadata_columns is None else metadata_columns)
    numeric = set(spec["numeric"] if numeric_columns is None else numeric_columns)
    leaking = sorted(LABEL_COLUMNS & set(meta_cols))
    if leaking:
        raise ValueError(f"{path}: column(s) {leaking} encode the diagnosis and cannot be metadata inputs")
    missing = [c for c in (spec["image"], spec["patient"], spec["label"], *meta_cols) if c not in columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} for the {layout} layout; found {columns}")

    items: list[dict] = []
    seen: dict[str, int] = {}
    for row_number, row in enumerate(rows, start=2):  # row 1 is the header
        name = (row[spec["image"]] or "").strip()
        if not name:
            raise ValueError(f"{path}, row {row_number}: empty {spec['image']}")
        if name in seen:
            raise ValueError(f"{path}, row {row_number}: image {name} already listed in row {seen[name]}")
        seen[name] = row_number
        patient = (row[spec["patient"]] or "").strip()
        if not patient:
            raise ValueError(f"{path}, row {row_number}: empty {spec['patient']} for image {name}")
        label = _label(path, row_number, layout, row[spec["label"]] or "")
        try:
            image, (height, width), mask = _row_files(path, row_number, name, folders, mask_dir, verify_images)
        except (FileNotFoundError, ValueError) as err:
            if errors is None:
                raise
            errors.append({"file": getattr(err, "file", name), "row": row_number, "reason": str(err)})
            continue
        item = {
            "image": str(image),
            "label": label,
            "patient": patient,
            "image_name": name,
            "clinical": {c: _metadata_value(path, row_number, c, row[c], c in numeric) for c in meta_cols},
            "image_size": [height, width],
            "row": row_number,
        }
        if mask is not None:
            item["label_map"] = str(mask)
        items.append(item)
    return items


def check_predictive_metadata(
    items: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    numeric: Sequence[str] = (),
    clinical_key: str = "clinical",
    label_key: str = "label",
) -> None:
    """Refuse a metadata column that predicts the label perfectly on these (training) items.

    A categorical column does when no value (missing counting as one) occurs with both labels; a numeric one when
    a threshold separates the known values of the two classes and the missing values all carry one label. Such a
    column is a leak (e.g. a diagnosis code under another name) or a data set too small to learn from.

    Raises:
        ValueError: naming the column.
    """
    labels = np.asarray([int(item[label_key] != 0) for item in items])
    if labels.size == 0 or labels.min() == labels.max():
        return
    for column in columns:
        values = [item[clinical_key].get(column) for item in items]
        known = np.asarray([v is not None for v in values])
        if column in numeric:
            x = np.asarray([float(v) if v is not None else np.nan for v in values])
            pos, neg = x[known & (labels == 1)], x[known & (labels == 0)]
            one_class = pos.size == 0 or neg.size == 0
            separated = one_class or bool(pos.min() > neg.max() or pos.max() < neg.min())
            leak = separated and np.unique(labels[~known]).size <= 1
        else:
            seen: dict[Any, set[int]] = {}
            for v, y in zip(values, labels):
                seen.setdefault(v, set()).add(int(y))
            leak = all(len(ys) == 1 for ys in seen.values())
        if leak:
            raise ValueError(
                f"metadata column {column!r} predicts the label perfectly on the training items; it is refused as "
                "a model input (a leak of the diagnosis, or too few training images)"
            )


class MetadataEncoder:
    """One-hot / standardised encoding of patient metadata, fitted on the training items.

    Categorical columns: one feature per category seen in training plus ``unknown`` (missing or unseen values).
    Numeric columns: ``(value - mean) / std`` (0 when missing) and a ``<column>=unknown`` indicator.

    Args:
        columns: metadata columns (keys of each item's ``clinical`` dict); label columns are refused.
        numeric: the numeric ones among them.
        clinical_key: item key of the raw metadata dict.
        output_key: item key that :meth:`encode` fills with the float32 feature vector.
    """

    def __init__(
        self,
        columns: Sequence[str],
        numeric: Sequence[str] = (),
        clinical_key: str = "clinical",
        output_key: str = "metadata",
    ) -> None:
        leaking = sorted(LABEL_COLUMNS & set(columns))
        if leaking:
            raise ValueError(f"MetadataEncoder: column(s) {leaking} encode the diagnosis and cannot be inputs")
        unknown_numeric = sorted(set(numeric) - set(columns))
        if unknown_numeric:
            raise ValueError(f"MetadataEncoder: numeric column(s) {unknown_numeric} are not among {list(columns)}")
        self.columns = list(columns)
        self.numeric = [c for c in self.columns if c in set(numeric)]
        self.clinical_key, self.output_key = clinical_key, output_key
        self.categories: dict[str, list[str]] = {}
        self.stats: dict[str, tuple[float, float]] = {}
        self._fitted = False

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` has run (or the encoder comes from :meth:`from_state`)."""
        return self._fitted

    @property
    def feature_names(self) -> list[str]:
        """Names of the encoded features, in order."""
        names = []
        for column in self.columns:
            if column in self.stats:
                names += [column, f"{column}={UNKNOWN}"]
            else:
                names += [f"{column}={c}" for c in self.categories.get(column, [])] + [f"{column}={UNKNOWN}"]
        return names

    @property
    def num_features(self) -> int:
        """Length of the encoded vector."""
        return len(self.feature_names)

    def fit(self, items: Sequence[Mapping[str, Any]], check_leakage: bool = True) -> MetadataEncoder:
        """Learn categories and statistics from the training items.

        Args:
            items: training items with a ``clinical`` dict and a ``label``.
            check_leakage: refuse a perfectly predictive column (:func:`check_predictive_metadata`).

        Raises:
            ValueError: naming an item without a column, or a perfectly predictive column.
        """
        for index, item in enumerate(items):
            absent = [c for c in self.columns if c not in item.get(self.clinical_key, {})]
            if absent:
                raise ValueError(f"MetadataEncoder: item {index} ({item.get('image', '?')}) has no metadata {absent}")
        if check_leakage:
            check_predictive_metadata(items, self.columns, self.numeric, self.clinical_key)
        self.categories, self.stats = {}, {}
        for column in self.columns:
            values = [item[self.clinical_key][column] for item in items]
            if column in self.numeric:
                known = np.asarray([float(v) for v in values if v is not None])
                mean = float(known.mean()) if known.size else 0.0
                std = float(known.std()) if known.size > 1 else 1.0
                self.stats[column] = (mean, std if std > 0 else 1.0)
            else:
                self.categories[column] = sorted({str(v) for v in values if v is not None} - {UNKNOWN})
        self._fitted = True
        return self

    def transform(self, clinical: Mapping[str, Any]) -> np.ndarray:
        """The float32 feature vector of one item's raw metadata dict."""
        if not self.fitted:
            raise RuntimeError("MetadataEncoder: call fit() on the training items first")
        features: list[float] = []
        for column in self.columns:
            value = clinical.get(column)
            if column in self.stats:
                mean, std = self.stats[column]
                features += [0.0, 1.0] if value is None else [(float(value) - mean) / std, 0.0]
            else:
                cats = self.categories[column]
                one_hot = [0.0] * (len(cats) + 1)
                one_hot[cats.index(str(value)) if value is not None and str(value) in cats else len(cats)] = 1.0
                features += one_hot
        return np.asarray(features, np.float32)

    def encode(self, items: Sequence[Mapping[str, Any]]) -> list[dict]:
        """New items with ``output_key`` set to the encoded vector of their ``clinical`` dict."""
        return [{**item, self.output_key: self.transform(item.get(self.clinical_key, {}))} for item in items]

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state, to save next to the model."""
        return {
            "columns": self.columns,
            "numeric": self.numeric,
            "categories": self.categories,
            "stats": {k: list(v) for k, v in self.stats.items()},
        }

    @classmethod
    def from_state(
        cls, state: Mapping[str, Any], clinical_key: str = "clinical", output_key: str = "metadata"
    ) -> MetadataEncoder:
        """Rebuild a fitted encoder from :meth:`state`."""
        encoder = cls(state["columns"], state["numeric"], clinical_key, output_key)
        encoder.categories = {k: list(v) for k, v in state["categories"].items()}
        encoder.stats = {k: (float(v[0]), float(v[1])) for k, v in state["stats"].items()}
        encoder._fitted = True
        return encoder
