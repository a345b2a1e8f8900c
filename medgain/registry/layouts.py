"""Data layouts of the review: what ``medgain review --data`` is for each kind of bundle, and the three things
that differ between them (how the bundle's evaluate workflow is given the data, and the split the version's
training run held out; where the per-frame unit and subgroup fields come from; the training-data summary of the
model card). Everything else of the review is shared.

- :class:`DatalistLayout`: a MONAI datalist JSON (the capsule bundle);
- :class:`PatchTableLayout`: a whole-slide data set folder with ``patches_<split>.csv`` and ``slides_<split>.csv``
  (``medgain wsi patches``; the whole-slide bundle), the unit of a frame (a patch) being its slide;
- :class:`DermoscopyLayout`: an ISIC 2020 / HAM10000 CSV with its ``images/`` (and ``masks/``) folder (the
  dermoscopy bundle), the unit of an image being its patient.

Identifiers (study ids, slide names, patient ids) leave a layout only as salted pseudonyms (:mod:`medgain.data.phi`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medgain.data import (
    DERMOSCOPY_LAYOUTS,
    apply_mask_budget,
    dermoscopy_cv_items,
    expand_frames,
    fold_items,
    load_datalist,
    prepare_items,
    read_dermoscopy_csv,
    study_ref,
)
from medgain.registry.figures import GROUP_FIELDS, SUBGROUP_FIELDS
from medgain.tracking import data_hash
from medgain.wsi import SPLITS, read_patch_table, split_slides_table

if TYPE_CHECKING:
    from monai.bundle import ConfigParser

__all__ = ["DataLayout", "DatalistLayout", "DermoscopyLayout", "PatchTableLayout", "data_layout"]


class DataLayout(ABC):
    """The data a review evaluates, in one layout.

    Args:
        path: the ``--data`` path (resolved).
    """

    #: what the frames are grouped by (resampled together; the unit-level table of the report)
    unit = "study"
    #: training-run parameters that name local files: left out of the model card
    local_params: tuple[str, ...] = ("dataset_dir",)

    def __init__(self, path: Path) -> None:
        self.path = path

    def follow(self, params: Mapping[str, str]) -> None:
        """Adopt what the reviewed version's training run recorded about its data split (nothing by default)."""

    @abstractmethod
    def workflow_args(self) -> dict[str, Any]:
        """Config values that point the bundle's evaluate workflow at the data."""

    def configure(self, parser: ConfigParser) -> None:
        """Adjust the parsed evaluate config before it is instantiated (nothing by default)."""

    @abstractmethod
    def identity(self) -> str:
        """The data hash compared with the training run's ``data_hash`` tag (same value: same training data)."""

    @abstractmethod
    def join(self, rows: list[dict[str, Any]], split: str) -> dict[str, list[Any]]:
        """Set each record's unit pseudonym (``group``, None when unknown) and return per subgroup field the value
        of each record."""

    @abstractmethod
    def training_summary(self, params: Mapping[str, str]) -> dict[str, str]:
        """``training_data`` (and what else the layout knows) for the model card, given the training params."""


def _age_band(value: Any) -> str | None:
    try:
        age = float(value)
    except (TypeError, ValueError):
        return None
    if math.isnan(age):
        return None
    low = int(age // 20 * 20)
    return f"{low}-{low + 19}"


class DatalistLayout(DataLayout):
    """A MONAI datalist JSON (paths relative to its folder); subgroup fields and the unit (the first of
    :data:`~medgain.registry.figures.GROUP_FIELDS` every item carries) are read from the split's items."""

    def workflow_args(self) -> dict[str, Any]:
        return {"dataset_dir": str(self.path.parent), "datalist": str(self.path)}

    def identity(self) -> str:
        return data_hash(self.path)

    def join(self, rows: list[dict[str, Any]], split: str) -> dict[str, list[Any]]:
        items = {(os.path.normpath(i["image"]), int(i["frame"])): i
                 for i in expand_frames(load_datalist(self.path, split))}
        found = [items.get((os.path.normpath(r["file"]), int(r["frame"])), {}) for r in rows]
        group_field = next((f for f in GROUP_FIELDS if found and all(f in i for i in found)), None)
        for row, item in zip(rows, found):
            row["group"] = study_ref(item[group_field]) if group_field else None
        fields: dict[str, list[Any]] = {}
        for name in SUBGROUP_FIELDS:
            if any(name in i for i in found):
                fields[name] = [i.get(name) for i in found]
        for age_key in ("age_approx", "age"):
            if "age_band" not in fields and any(age_key in i for i in found):
                fields["age_band"] = [_age_band(i.get(age_key)) for i in found]
        return fields

    def training_summary(self, params: Mapping[str, str]) -> dict[str, str]:
        content = json.loads(self.path.read_text())
        parts = []
        for split, items in content.items():
            if isinstance(items, list):
                ill = sum(1 for i in items if isinstance(i, dict) and i.get("label", 0))
                prevalence = round(ill / len(items), 4) if items else None
                parts.append(f"{split}: {len(items)} items, {ill} ill (prevalence {prevalence})")
        fraction, seed = float(params.get("masks_fraction", 1.0)), int(params.get("seed", 0))
        train = prepare_items(self.path, "training", fraction, seed)
        masks = sum(1 for i in train if i.get("has_mask") and i["label"])
        return {"training_data": "; ".join(parts),
                "masks_used": f"{masks} of {sum(1 for i in train if i['label'])} ill training frames "
                              f"(fraction {fraction})"}


class PatchTableLayout(DataLayout):
    """A whole-slide data set folder (``medgain wsi patches``): ``patches_<split>.csv`` (one patch a row; a
    record's ``frame`` is its row) and ``slides_<split>.csv``; a patch's unit is its slide, named by
    ``study_ref(slide id)``. The identity is the hash of ``patches_training.csv`` (what training records)."""

    unit = "slide"

    def workflow_args(self) -> dict[str, Any]:
        return {"dataset_dir": str(self.path)}

    def identity(self) -> str:
        return data_hash(self.path / "patches_training.csv")

    def join(self, rows: list[dict[str, Any]], split: str) -> dict[str, list[Any]]:
        slides = {os.path.abspath(os.path.join(self.path, s["image"])): s["slide"] for s in split_slides_table(self.path, split)}
        for row in rows:
            slide = slides.get(os.path.abspath(os.path.join(self.path, row["file"])))
            if slide is None:
                raise ValueError(f"{self.path / f'slides_{split}.csv'}: evaluated slide of record {row['ref']} "
                                 "is not listed")
            row["group"] = study_ref(slide)
        return {}

    def training_summary(self, params: Mapping[str, str]) -> dict[str, str]:
        parts = []
        for split in SPLITS:
            table = self.path / f"patches_{split}.csv"
            if not table.is_file():
                continue
            patches = read_patch_table(table)
            slides = split_slides_table(self.path, split)
            ill = sum(r["label"] for r in patches)
            parts.append(f"{split}: {len(slides)} slides ({sum(int(s['label']) for s in slides)} with tumour), "
                         f"{len(patches)} patches, {ill} tumour (prevalence {round(ill / len(patches), 4)})")
        return {"training_data": "; ".join(parts),
                "masks_used": "every tumour patch (masks rasterised from the slides' annotations)"}


class DermoscopyLayout(DataLayout):
    """The dermoscopy bundle's data: an ISIC 2020 or HAM10000 CSV (``--data`` is the CSV, or the data folder
    holding ``train.csv``) with ``images/`` and, optionally, ``masks/`` beside it, as ``medgain synth dermoscopy``
    writes. A record's unit is the image's patient (HAM10000: its lesion), named by ``study_ref(patient id)``;
    subgroups are sex, anatomical site and the 20-year age band of the CSV. The identity is the hash of the CSV
    (what training records).

    The bundle draws its held-out test patients from the CSV with the training seed: :meth:`follow` takes the
    training run's ``seed``, ``n_folds`` and ``fold``, so that the review evaluates the test split that version
    never saw (the bundle's default ``test_fraction``, no ``test_csv``), for every compared version alike.
    """

    unit = "patient"
    local_params = ("dataset_dir", "csv_path", "pretrained_path")
    #: run parameters that decide the split (see :meth:`follow`)
    SPLIT_PARAMS = ("seed", "n_folds", "fold")

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.csv = path / "train.csv" if path.is_dir() else path
        self.folder = self.csv.parent
        self.image_dir = self.folder / "images"
        self.mask_dir = self.folder / "masks" if (self.folder / "masks").is_dir() else None
        self.split_params: dict[str, int] = {}

    def follow(self, params: Mapping[str, str]) -> None:
        missing = [name for name in self.SPLIT_PARAMS if name not in params]
        if missing:
            raise ValueError(f"{self.csv}: the training run records no {missing}; cannot redraw its test split")
        self.split_params = {name: int(params[name]) for name in self.SPLIT_PARAMS}

    def workflow_args(self) -> dict[str, Any]:
        return {"dataset_dir": str(self.folder), "csv_path": str(self.csv), "image_dir": str(self.image_dir),
                "mask_dir": None if self.mask_dir is None else str(self.mask_dir), **self.split_params}

    def configure(self, parser: ConfigParser) -> None:
        """Refuse a split other than the bundle's held-out ``test`` (its cross-validation folds are training data)."""
        if parser["split"] != "test":
            raise ValueError(f"{self.csv}: the dermoscopy bundle is reviewed on its held-out 'test' patients, "
                             f"not {parser['split']!r}")

    def identity(self) -> str:
        return data_hash(self.csv)

    def join(self, rows: list[dict[str, Any]], split: str) -> dict[str, list[Any]]:
        items = {os.path.abspath(i["image"]): i for i in read_dermoscopy_csv(self.csv, self.image_dir,
                                                                              verify_images=False)}
        fields: dict[str, list[Any]] = {"sex": [], "anatom_site_general": [], "age_band": []}
        for row in rows:
            item = items.get(os.path.abspath(row["file"]))
            if item is None:
                raise ValueError(f"{self.csv}: evaluated image of record {row['ref']} is not listed")
            row["group"] = study_ref(item["patient"])
            clinical = item["clinical"]
            sex, age, site = next(spec["metadata"] for spec in DERMOSCOPY_LAYOUTS.values()
                                  if set(spec["metadata"]) <= set(clinical))
            fields["sex"].append(clinical[sex])
            fields["anatom_site_general"].append(clinical[site])
            fields["age_band"].append(_age_band(clinical[age]))
        return fields

    def training_summary(self, params: Mapping[str, str]) -> dict[str, str]:
        fold, seed, n_folds = int(params["fold"]), int(params["seed"]), int(params["n_folds"])
        with tempfile.TemporaryDirectory() as tmp:  # the fold table names images and patients: it stays local
            splits = dermoscopy_cv_items(self.csv, self.image_dir, tmp, mask_dir=self.mask_dir, n_folds=n_folds,
                                         seed=seed, verify_images=False)
        groups = {f"fold {k}{' (validation)' if k == fold else ''}": [i for i in splits["cv"] if i["fold"] == k]
                  for k in range(n_folds)}
        groups["test"] = splits["test"]
        parts = []
        for name, items in groups.items():
            ill = sum(i["label"] for i in items)
            prevalence = round(ill / len(items), 4) if items else None
            parts.append(f"{name}: {len(items)} images of {len({i['patient'] for i in items})} patients, "
                         f"{ill} melanomas (prevalence {prevalence})")
        fraction = float(params.get("masks_fraction", 1.0))
        train = apply_mask_budget(fold_items(splits["cv"], fold, "training"), fraction, seed, base_dir=self.folder)
        ill = [i for i in train if i["label"]]
        return {"training_data": "; ".join(parts),
                "masks_used": f"{sum(1 for i in ill if i['has_mask'])} of {len(ill)} training melanomas "
                              f"({sum(1 for i in ill if 'label_map' in i)} with a mask; fraction {fraction})"}


def _dermoscopy_csv(path: Path) -> bool:
    """Whether ``path`` is a CSV whose header is of a dermoscopy layout (image, patient and label columns)."""
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    with path.open(newline="", encoding="utf-8-sig") as f:
        header = set(next(csv.reader(f), []))
    return any({spec["image"], spec["patient"], spec["label"]} <= header for spec in DERMOSCOPY_LAYOUTS.values())


def data_layout(data: str | os.PathLike) -> DataLayout:
    """The layout of ``--data``: a datalist JSON file, a dermoscopy CSV (or the folder of its ``train.csv``), or a
    whole-slide data set folder.

    Raises:
        FileNotFoundError: when ``data`` does not exist.
        ValueError: naming ``data`` when it is a CSV or folder of no known layout.
    """
    path = Path(data).resolve()
    if path.is_file() and path.suffix.lower() == ".csv":
        if not _dermoscopy_csv(path):
            raise ValueError(f"{path}: not a dermoscopy CSV (ISIC 2020: image_name, patient_id, target; "
                             "HAM10000: image_id, lesion_id, dx)")
        return DermoscopyLayout(path)
    if path.is_file():
        return DatalistLayout(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: --data not found (a datalist JSON or a bundle's data folder)")
    if (path / "patches_training.csv").is_file() and (path / "slides_training.csv").is_file():
        return PatchTableLayout(path)
    if _dermoscopy_csv(path / "train.csv"):
        return DermoscopyLayout(path)
    raise ValueError(f"{path}: not a known data folder (a whole-slide folder holds patches_<split>.csv and "
                     "slides_<split>.csv, a dermoscopy folder train.csv and images/); give a datalist JSON for a "
                     "datalist bundle")
