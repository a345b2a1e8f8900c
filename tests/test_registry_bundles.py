"""``medgain review`` on the bundles whose data is not a datalist JSON, end to end on tiny data: train one epoch
in process (registered in a SQLite store), review through the bundle's own evaluate config, and check the report's
unit-level table, model card and that no slide name or planted identifier reaches the report or the store.

Whole-slide: ``--data`` is the data set folder of ``medgain wsi patches``; a patch's unit is its slide."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from monai.bundle import run as bundle_run

from medgain.cli import main as medgain_main
from medgain.registry import PatchTableLayout, data_layout, review_model, scan_for_identifiers, store_locations
from medgain.synth import make_wsi_dataset

WSI = Path(__file__).resolve().parents[1] / "bundles" / "wsi_patch_gain" / "configs"
PLANTED = "MRN8812345"


def _planted_slides(root: Path) -> Path:
    """Six 1024² slides renamed to carry a patient identifier in the slide id and the file name; returns the
    label CSV."""
    labels = make_wsi_dataset(root, 6, seed=1, size=1024, tumour_rate=0.5, mpp=2.0)
    with labels.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        source = root / row["image"]
        target = source.with_name(f"{PLANTED}_{source.name}")
        source.rename(target)
        row["image"] = str(target.relative_to(root))
        row["slide"] = f"{PLANTED}-{row['slide']}"
    with labels.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return labels


@pytest.fixture(scope="module")
def wsi_review(tmp_path_factory: pytest.TempPathFactory) -> Any:
    saved = {k: os.environ.get(k) for k in ("MEDGAIN_PHI_SALT", "MLFLOW_TRACKING_URI")}
    os.environ["MEDGAIN_PHI_SALT"] = "registry-bundles-salt"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("registry_wsi")
    labels = _planted_slides(root / "slides")
    data = root / "data"
    args = ["wsi", "patches", "--labels", str(labels), "--out", str(data), "--level", "1", "--patch-size", "32",
            "--max-eval-patches", "60", "--max-per-class", "24", "--seed", "1"]
    assert medgain_main(args) == 0
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("wsi_patch_gain", artifact_location=(root / "artifacts").as_uri())
    bundle_run("training", meta_file=str(WSI / "metadata.json"), config_file=str(WSI / "train.yaml"),
               bundle_root=str(root / "run"), dataset_dir=str(data), tracking_uri=uri, network="small_cnn",
               patch_size=32, level=1, batch_size=8, num_workers=0, max_epochs=1)
    review = review_model("wsi_patch_gain", "1", data, root / "review", tracking_uri=uri, n_bootstrap=50,
                          gallery_size=2, overrides={"slide_batch_size": 64})
    yield {"root": root, "data": data, "uri": uri, "review": review}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_wsi_review_by_slide(wsi_review: Any) -> None:
    review, data = wsi_review["review"], wsi_review["data"]
    assert isinstance(data_layout(data), PatchTableLayout)
    with (data / "patches_test.csv").open() as fh:
        n_patches = sum(1 for _ in csv.DictReader(fh))
    with (data / "slides_test.csv").open() as fh:
        n_slides = sum(1 for _ in csv.DictReader(fh))
    assert review["counts"]["frames"] == n_patches and review["counts"]["positives"] > 0 and review["unit"] == "slide"
    assert math.isfinite(review["figures"]["auc"]["value"]) and math.isfinite(review["figures"]["iou"]["value"])
    gallery = review["gallery"]
    assert len(gallery["true_positive"]) + len(gallery["false_negative"]) > 0
    assert all(shown["ref"].startswith("f-") for kind in ("true_positive", "false_negative", "false_positive")
               for shown in gallery[kind])
    assert review["resampled_by"] == "slide"  # whole slides are resampled
    level = review["subgroups"]["level"]
    assert level["figures"]["n"] == n_slides and sum(u["frames"] for u in level["units"]) == n_patches
    assert all(u["unit"].startswith("s-") for u in level["units"])
    card = review["model_card"]
    assert card["bundle"] == "wsi_patch_gain" and card["network"] == "small_cnn" and card["input_size"] == "32x32"
    assert card["training_data"].startswith("training: 2 slides (1 with tumour)")
    assert "test: 2 slides (1 with tumour), 60 patches" in card["training_data"]
    text = (wsi_review["root"] / "review" / "report.html").read_text()
    assert "Slide level (2 slides" in text and "false alarms / slide" in text
    version = mlflow.MlflowClient(wsi_review["uri"]).get_model_version("wsi_patch_gain", "1")
    assert version.tags["review.data_hash"] == card["training_data_hash"] == review["data_hash"]


def test_wsi_review_names_no_slide(wsi_review: Any) -> None:
    root = wsi_review["root"]
    review_files = [root / "review" / name for name in ("report.html", "review.json")]
    found = scan_for_identifiers(review_files + store_locations(wsi_review["uri"]), {PLANTED, "slide_00"})
    assert found == [], found


def test_data_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--data not found"):
        data_layout(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a known data folder"):
        data_layout(tmp_path)
