"""``medgain review`` on the bundles whose data is not a datalist JSON, end to end on tiny data: train one epoch
in process (registered in a SQLite store), review through the bundle's own evaluate config, and check the report's
unit-level table, model card and that no slide name or planted identifier reaches the report or the store.

Whole-slide: ``--data`` is the data set folder of ``medgain wsi patches``; a patch's unit is its slide.
Dermoscopy: ``--data`` is the folder of the ISIC-style CSV (or the CSV); an image's unit is its patient, the
subgroups are sex, anatomical site and age band; reviewed against a champion, packaged, verified, and the
package's standalone inference gives the bundle's own predictions."""

from __future__ import annotations

import csv
import math
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from monai.bundle import run as bundle_run
from PIL import Image
from registry_helpers import registry_env

from medgain.cli import main as medgain_main
from medgain.data import study_ref
from medgain.handlers import SlideEvaluation
from medgain.registry import (
    DermoscopyLayout,
    PatchTableLayout,
    build_package,
    data_layout,
    review_model,
    scan_for_identifiers,
    store_locations,
    verify_package,
)
from medgain.synth import make_dermoscopy_dataset, make_wsi_dataset

WSI = Path(__file__).resolve().parents[1] / "bundles" / "wsi_patch_gain" / "configs"
DERMOSCOPY = Path(__file__).resolve().parents[1] / "bundles" / "dermoscopy_gain" / "configs"
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
    with registry_env("registry-bundles-salt"):
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
    (tmp_path / "train.csv").write_text("image,label\na.png,0\n")
    with pytest.raises(ValueError, match="not a dermoscopy CSV"):
        data_layout(tmp_path / "train.csv")
    (tmp_path / "train.csv").write_text("image_name,patient_id,target\nISIC_1,P1,0\n")
    layout = data_layout(tmp_path)
    assert isinstance(layout, DermoscopyLayout) and layout.csv == (tmp_path / "train.csv").resolve()
    with pytest.raises(ValueError, match="records no \\['n_folds', 'fold'\\]"):
        layout.follow({"seed": "0"})
    with pytest.raises(ValueError, match="held-out 'test' patients, not 'validation'"):
        layout.configure({"split": "validation"})  # type: ignore[arg-type]


def _planted_dermoscopy(root: Path) -> Path:
    """40 tiny dermoscopy images whose file names and patient ids carry a patient identifier; returns the folder."""
    csv_path = make_dermoscopy_dataset(root, 40, seed=4, prevalence=0.35, images_per_patient=3, min_size=40,
                                       max_size=64)
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        name = f"{PLANTED}_{row['image_name']}"
        (root / "images" / f"{row['image_name']}.jpg").rename(root / "images" / f"{name}.jpg")
        (root / "masks" / f"{row['image_name']}_segmentation.png").rename(root / "masks" / f"{name}_segmentation.png")
        row["image_name"], row["patient_id"] = name, f"{PLANTED}-{row['patient_id']}"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def _train_dermoscopy(root: Path, data: Path, uri: str, head_lr: float) -> None:
    bundle_run("training", meta_file=str(DERMOSCOPY / "metadata.json"), config_file=str(DERMOSCOPY / "train.yaml"),
               bundle_root=str(root), dataset_dir=str(data), tracking_uri=uri, network="small_cnn", image_size=32,
               batch_size=8, num_workers=0, n_folds=2, max_epochs=4, am_start_epoch=0, tta_views=1, head_lr=head_lr)


@pytest.fixture(scope="module")
def dermoscopy_review(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Two versions (champion: 1) of the dermoscopy bundle; version 2 reviewed against the champion."""
    with registry_env("registry-bundles-salt"):
        root = tmp_path_factory.mktemp("registry_dermoscopy")
        data = _planted_dermoscopy(root / "data")
        uri = f"sqlite:///{root / 'mlflow.db'}"
        client = mlflow.MlflowClient(uri)
        client.create_experiment("dermoscopy_gain", artifact_location=(root / "artifacts").as_uri())
        _train_dermoscopy(root / "run1", data, uri, head_lr=1e-3)
        _train_dermoscopy(root / "run2", data, uri, head_lr=3e-3)
        client.set_registered_model_alias("dermoscopy_gain", "champion", "1")
        review = review_model("dermoscopy_gain", "2", data, root / "review", against="champion", tracking_uri=uri,
                              n_bootstrap=50, gallery_size=2, overrides={"tta_views": 1})
        yield {"root": root, "data": data, "uri": uri, "client": client, "review": review}


def test_dermoscopy_review_by_patient_with_subgroups(dermoscopy_review: Any) -> None:
    review, data, root = dermoscopy_review["review"], dermoscopy_review["data"], dermoscopy_review["root"]
    assert all(isinstance(data_layout(d), DermoscopyLayout) for d in (data, data / "train.csv"))
    with (root / "run2" / "outputs" / "folds.csv").open() as fh:  # the training run's own held-out test split
        test = [row for row in csv.DictReader(fh) if row["fold"] == "-1"]
    assert review["counts"] == {"frames": len(test), "positives": sum(int(r["label"]) for r in test)}
    assert review["unit"] == "patient" and review["resampled_by"] == "patient"
    level = review["subgroups"]["level"]
    assert level["figures"]["n"] == len({r["patient"] for r in test})
    assert all(u["unit"].startswith("s-") for u in level["units"])
    subgroups = review["subgroups"]["subgroups"]
    assert set(subgroups) == {"sex", "anatom_site_general", "age_band"}
    assert {"female", "male"} <= set(subgroups["sex"])
    assert all(re.fullmatch(r"\d+-\d+", band) for band in subgroups["age_band"])
    assert math.isfinite(review["figures"]["auc"]["value"]) and math.isfinite(review["figures"]["iou"]["value"])
    gallery = review["gallery"]
    assert sum(len(gallery[k]) for k in ("true_positive", "false_negative", "false_positive")) > 0
    comparison = review["comparison"]
    assert comparison["version"] == "1" and {"auc", "iou"} <= set(comparison["figures"])
    card = review["model_card"]
    assert card["bundle"] == "dermoscopy_gain" and card["network"] == "small_cnn" and card["input_size"] == "32x32"
    assert card["training_data_hash"] == review["data_hash"] and "csv_path" not in card["training_params"]
    assert card["training_data"].startswith("fold 0 (validation): ")
    assert f"test: {len(test)} images of {level['figures']['n']} patients" in card["training_data"]
    assert re.fullmatch(r"\d+ of \d+ training melanomas \(\d+ with a mask; fraction 1.0\)", card["masks_used"])
    text = (root / "review" / "report.html").read_text()
    assert "Patient level (" in text and "false alarms / patient" in text and "anatom_site_general" in text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_dermoscopy_report_renders_in_a_browser(dermoscopy_review: Any) -> None:
    shot = dermoscopy_review["root"] / "report.png"
    subprocess.run(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--window-size=1500,2400", "--virtual-time-budget=15000", f"--screenshot={shot}",
         (dermoscopy_review["root"] / "review" / "report.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    coloured = np.abs(pixels.astype(int) - pixels.mean(axis=2, keepdims=True)).max(axis=2) > 40
    assert (pixels < 200).any(axis=2).mean() > 0.02 and coloured.mean() > 0.001  # text, plots and overlays drawn


def test_dermoscopy_package_runs_standalone_and_names_no_patient(dermoscopy_review: Any, tmp_path: Path) -> None:
    root, data, client = dermoscopy_review["root"], dermoscopy_review["data"], dermoscopy_review["client"]
    zip_path = root / "partner_bundle.zip"
    build_package("dermoscopy_gain@2", zip_path, tracking_uri=dermoscopy_review["uri"], include_wheel=False,
                  unpromoted=True)
    assert verify_package(zip_path, allow_unsigned=True)["model"] == "dermoscopy_gain"
    unpacked = tmp_path / "partner"
    zipfile.ZipFile(zip_path).extractall(unpacked)
    inputs = tmp_path / "images"
    inputs.mkdir()
    for image in sorted((data / "images").glob("*.jpg"))[:4]:
        shutil.copy(image, inputs / image.name)
    scripted = torch.jit.load(str(unpacked / "models" / "model.ts"))
    weights = torch.load(unpacked / "models" / "model.pt", weights_only=True)["model"]
    num_metadata = weights["metadata_branch.0.weight"].shape[1]
    assert scripted(torch.rand(2, 3, 32, 32), torch.zeros(2, num_metadata)).shape == (2, 2)
    bundle_run("run", meta_file=str(unpacked / "configs" / "metadata.json"),
               config_file=str(unpacked / "configs" / "inference.yaml"), bundle_root=str(unpacked),
               input_dir=str(inputs), output_dir=str(tmp_path / "out"), num_workers=0, tta_views=1)
    version = client.get_model_version("dermoscopy_gain", "2")
    checkpoint = client.download_artifacts(version.run_id, "checkpoint/model.pt", str(tmp_path / "ckpt"))
    bundle_run("inference", meta_file=str(DERMOSCOPY / "metadata.json"), config_file=str(DERMOSCOPY / "inference.yaml"),
               bundle_root=str(tmp_path / "own"), input_dir=str(inputs), output_dir=str(tmp_path / "own_out"),
               checkpoint=checkpoint, num_workers=0, tta_views=1)
    with (tmp_path / "out" / "predictions.csv").open() as fh:
        packaged = list(csv.DictReader(fh))
    with (tmp_path / "own_out" / "predictions.csv").open() as fh:
        assert len(packaged) == 4 and packaged == list(csv.DictReader(fh))
    planted = {PLANTED, "SYN_000", "SP_000"}
    assert {needle for _, needle in scan_for_identifiers([data / "train.csv"], planted)} == planted
    review_files = [root / "review" / name for name in ("report.html", "review.json")]
    found = scan_for_identifiers(review_files + store_locations(dermoscopy_review["uri"]) + [zip_path], planted)
    assert found == [], found


def test_slide_tables_sent_to_mlflow_name_no_slide(tmp_path: Path) -> None:
    local = tmp_path / "slides"
    local.mkdir()
    slides = [{"slide": f"{PLANTED}_a", "image": str(tmp_path / f"{PLANTED}_a.tif"), "label": 1},
              {"slide": f"{PLANTED}_b", "image": str(tmp_path / f"{PLANTED}_b.tif"), "label": 0}]
    with (local / "errors.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["slide", "path", "error"])
        writer.writeheader()
        writer.writerow({"slide": f"{PLANTED}_b", "path": slides[1]["image"],
                         "error": f"ValueError: {slides[1]['image']}: truncated TIFF"})
    handler = SlideEvaluation(slides, inferer=None, output_dir=str(local))  # type: ignore[arg-type]
    record = {"slide": f"{PLANTED}_a", "path": slides[0]["image"], "score": 1.5, "probability": 0.82, "n_patches": 9,
              "n_lesions": 1, "mpp": 2.0}
    sent = tmp_path / "sent"
    sent.mkdir()
    written = handler._pseudonymised_tables([record], sent)
    assert [p.name for p in written] == ["slides.csv", "errors.csv"] and scan_for_identifiers([sent], {PLANTED}) == []
    with written[0].open() as fh:
        assert list(csv.DictReader(fh)) == [{"ref": study_ref(f"{PLANTED}_a"), "label": "1", "score": "1.5",
                                              "probability": "0.82", "n_patches": "9", "n_lesions": "1", "mpp": "2.0"}]
    with written[1].open() as fh:
        assert list(csv.DictReader(fh)) == [{"ref": study_ref(f"{PLANTED}_b"), "error": "ValueError"}]
