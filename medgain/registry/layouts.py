"""Data layouts of the review: what ``medgain review --data`` is for each kind of bundle, and the three things
that differ between them (how the bundle's evaluate workflow is given the data, where the per-frame subgroup
fields come from, the training-data summary of the model card). Everything else of the review is shared.

- :class:`DatalistLayout`: a MONAI datalist JSON (the capsule bundle);
- :class:`PatchTableLayout`: a whole-slide data set folder with ``patches_<split>.csv`` and ``slides_<split>.csv``
  (``medgain wsi patches``; the whole-slide bundle), the unit of a frame (a patch) being its slide.

Identifiers (study ids, slide names) leave a layout only as salted pseudonyms (:mod:`medgain.data.phi`).
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medgain.data import expand_frames, load_datalist, prepare_items, study_ref
from medgain.registry.figures import GROUP_FIELDS, SUBGROUP_FIELDS
from medgain.tracking import data_hash
from medgain.wsi import SPLITS, read_patch_table, split_slides_table

if TYPE_CHECKING:
    from monai.bundle import ConfigParser

__all__ = ["DataLayout", "DatalistLayout", "PatchTableLayout", "data_layout"]


class DataLayout(ABC):
    """The data a review evaluates, in one layout.

    Args:
        path: the ``--data`` path (resolved).
    """

    #: what the frames are grouped by (resampled together; the unit-level table of the report)
    unit = "study"

    def __init__(self, path: Path) -> None:
        self.path = path

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

    def configure(self, parser: ConfigParser) -> None:
        """Keep the slide evaluation's per-slide artifacts (folders and tables named by slide id and path) out of
        MLflow: its slide figures are still logged as metrics, its files stay in the local output folder."""
        for i, handler in enumerate(parser["validate"]["handlers"]):
            if isinstance(handler, dict) and str(handler.get("_target_", "")).endswith("SlideEvaluation"):
                parser[f"validate#handlers#{i}#mlflow_handler"] = None

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


def data_layout(data: str | os.PathLike) -> DataLayout:
    """The layout of ``--data``: a datalist JSON file, or a whole-slide data set folder.

    Raises:
        FileNotFoundError: when ``data`` does not exist.
        ValueError: naming ``data`` when it is a folder of no known layout.
    """
    path = Path(data).resolve()
    if path.is_file():
        return DatalistLayout(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: --data not found (a datalist JSON or a bundle's data folder)")
    if (path / "patches_training.csv").is_file() and (path / "slides_training.csv").is_file():
        return PatchTableLayout(path)
    raise ValueError(f"{path}: not a known data folder (a whole-slide folder holds patches_<split>.csv and "
                     "slides_<split>.csv); give a datalist JSON for a datalist bundle")
