"""The attention-crop pipeline end to end (in-process ``monai.bundle.run`` of the dermoscopy bundle, tiny images,
one epoch): stages, crops and boxes, nested MLflow runs, ensemble weights from out-of-fold predictions, resuming."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from PIL import Image

from medgain.data import read_folds_csv
from medgain.ensemble import search_ensemble_weights
from medgain.model_file import load_model_spec
from medgain.pipeline import load_pipeline_config, model_attention_maps, read_predictions, run_attention_crop
from medgain.synth.dermoscopy import make_dermoscopy_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("attention_crop")
    data = root / "data"
    make_dermoscopy_dataset(data, 36, seed=5, prevalence=0.35, images_per_patient=3, min_size=40, max_size=96)
    config = {
        "n_folds": 2,
        "test_fraction": 0.0,  # the test-split evaluation runs: tests/test_dermoscopy_bundle.py
        "bundle": str(REPO / "bundles" / "dermoscopy_gain"),
        "common": {"network": "small_cnn", "num_workers": 0, "batch_size": 8, "max_epochs": 1, "tta_views": 1},
        "full": {"image_size": 32},
        "crop": {"size": 32, "num_overlays": 3, "min_size": 16},
        "ensemble": {"n_bootstrap": 100},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    summary = run_attention_crop(path, dataset_dir=str(data), output_dir=str(root / "out"))
    return root, summary


def _runs(out: Path) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("attention_crop")
    return client.search_runs([experiment.experiment_id])


def test_stages_write_crops_boxes_and_an_ensemble_weighted_out_of_fold(pipeline: tuple[Path, dict]) -> None:
    root, summary = pipeline
    out = root / "out"
    folds = read_folds_csv(out / "folds.csv")  # one fold per patient, or it raises
    with (out / "crops" / "boxes.csv").open(newline="") as f:
        boxes = list(csv.DictReader(f))
    assert len(boxes) == len(folds) == 36
    for row in boxes:
        y0, x0, y1, x1, h, w = (int(row[k]) for k in ("y0", "x0", "y1", "x1", "height", "width"))
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        assert Image.open(row["crop"]).size == (32, 32)
    assert len(list((out / "crops" / "overlays").glob("*.png"))) == 3
    # the crop model trained on the same folds: its fold table follows the pipeline's through the patients
    crop_folds = read_folds_csv(out / "cropnet" / "outputs" / "folds.csv")
    assert {Path(k).stem: v for k, v in crop_folds.items()} == {Path(k).stem: v for k, v in folds.items()}
    # weights: the grid optimum on the pooled out-of-fold predictions (never the test split)
    n = 2
    oof = {name: read_predictions([out / d / "outputs" / "oof" / f"fold{k}.csv" for k in range(n)])
           for name, d in (("full", "full"), ("crop", "cropnet"))}
    keys = sorted(oof["full"])
    assert keys == sorted(oof["crop"]) and len(keys) == sum(1 for f in folds.values() if f >= 0)
    labels = np.asarray([oof["full"][k][1] for k in keys])
    fold_of = {Path(image).stem: fold for image, fold in folds.items()}
    scores = {m: np.asarray([oof[m][k][0] for k in keys]) for m in oof}
    expected = search_ensemble_weights(scores, labels, groups=[fold_of[k] for k in keys])
    assert summary["weights"] == pytest.approx(expected.weights) and summary["objective"] == "fold_mean"
    assert set(summary["oof"]) == {"full", "crop", "ensemble"} and "test" not in summary
    assert summary["oof"]["full"]["fold_mean"] == pytest.approx(expected.model_auc["full"])
    assert json.loads((out / "ensemble" / "summary.json").read_text())["weights"] == summary["weights"]


def test_one_parent_run_with_stage_and_fold_runs_nested(pipeline: tuple[Path, dict]) -> None:
    root, summary = pipeline
    runs = _runs(root / "out")
    by_id = {r.info.run_id: r for r in runs}
    parent = by_id[summary["parent_run_id"]]
    assert parent.info.status == "FINISHED" and "mlflow.parentRunId" not in parent.data.tags
    stages = {r.data.tags["pipeline_stage"]: r for r in runs if "pipeline_stage" in r.data.tags}
    assert set(stages) == {"full", "crops", "cropnet", "ensemble"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in stages.values())
    for stage in ("full", "cropnet"):
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == stages[stage].info.run_id]
        names = sorted(r.info.run_name.split("-")[0] + "-" + r.data.params.get("fold", "") for r in children)
        assert names == ["train-0", "train-1"]
    client = mlflow.MlflowClient(summary["tracking_uri"])
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.artifact_location == (root / "out" / "mlruns").resolve().as_uri()  # not the working folder
    crop_artifacts = [a.path for a in client.list_artifacts(stages["crops"].info.run_id, "crops")]
    assert "crops/boxes.csv" in crop_artifacts and "crops/overlays" in crop_artifacts
    assert len(client.list_artifacts(stages["crops"].info.run_id, "crops/crops")) == 36
    assert parent.data.metrics["oof_auc_ensemble"] == pytest.approx(summary["oof"]["ensemble"]["pooled"])
    assert stages["ensemble"].data.metrics["weight_crop"] == pytest.approx(summary["weights"]["crop"])


def test_rerun_skips_finished_stages_and_resumes_a_missing_output(pipeline: tuple[Path, dict]) -> None:
    root, summary = pipeline
    out = root / "out"
    before = {r.info.run_id for r in _runs(out)}
    (out / "cropnet" / "outputs" / "oof" / "fold1.csv").unlink()
    (out / "ensemble" / "summary.json").unlink()
    again = run_attention_crop(root / "pipeline.yaml", dataset_dir=str(root / "data"), output_dir=str(out))
    assert again["weights"] == summary["weights"] and again["parent_run_id"] == summary["parent_run_id"]
    assert {r.info.run_id for r in _runs(out)} == before  # no stage trained again, no new run
    assert (out / "cropnet" / "outputs" / "oof" / "fold1.csv").is_file()


def test_chipnet_attention_source_trains_chipnet_folds_and_crops_from_their_chip_grids(
    pipeline: tuple[Path, dict],
) -> None:
    root, _ = pipeline
    out = root / "chipnet_out"
    out.mkdir()
    shutil.copytree(root / "out" / "full", out / "full")  # the same full-image stage (same data, seed and folds)
    shutil.copyfile(root / "out" / "mlflow.db", out / "mlflow.db")  # a fresh MLflow database costs seconds
    summary = run_attention_crop(
        root / "pipeline.yaml",
        dataset_dir=str(root / "data"),
        output_dir=str(out),
        attention_source="chipnet",
        chipnet={"image_size": 32, "chip_size": 8},
    )
    assert read_folds_csv(out / "folds.csv") == read_folds_csv(root / "out" / "folds.csv")
    for fold in range(2):
        spec = load_model_spec(out / "chipnet" / "models" / f"fold{fold}" / "model.pt")
        assert spec.architecture == "chipnet" and spec.chip_size == 8
    items = [{"image": str(p)} for p in sorted((root / "data" / "images").glob("*.jpg"))[:3]]
    grids = model_attention_maps(out / "chipnet" / "models" / "fold0" / "model.pt", items)
    assert all(g.shape == (4, 4) and g.sum() == pytest.approx(1.0, abs=1e-5) for g in grids)
    with (out / "crops" / "boxes.csv").open(newline="") as f:
        boxes = list(csv.DictReader(f))
    assert len(boxes) == 36 and all(Image.open(row["crop"]).size == (32, 32) for row in boxes)
    assert set(summary["oof"]) == {"full", "crop", "chipnet", "ensemble"} and set(summary["weights"]) == {
        "full", "crop", "chipnet"}
    parent = summary["parent_run_id"]
    stages = {r.data.tags["pipeline_stage"] for r in _runs(out) if r.data.tags.get("mlflow.parentRunId") == parent}
    assert stages == {"full", "chipnet", "crops", "cropnet", "ensemble"}


def test_pipeline_config_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_fold: 3\n")
    with pytest.raises(ValueError, match="bad.yaml: unknown pipeline setting\\(s\\) \\['n_fold'\\]"):
        load_pipeline_config(bad)
    bad.write_text("attention_source: saliency\n")
    with pytest.raises(ValueError, match="attention_source must be one of"):
        load_pipeline_config(bad)
    shipped = load_pipeline_config(REPO / "pipelines" / "attention_crop" / "config.yaml")
    assert shipped["crop"]["size"] == shipped["full"]["image_size"]  # crops at the full model's input size


def test_pipeline_config_refuses_repeated_keys_and_unknown_names(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_folds: 5\ncrop:\n  size: 224\nn_folds: 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml: duplicate key 'n_folds' at line 4 \(first at line 1\)"):
        load_pipeline_config(bad)
    bad.write_text("crop:\n  size: 224\n  size: 32\n")
    with pytest.raises(ValueError, match=r"bad.yaml: duplicate key 'size' at line 3 \(first at line 2\)"):
        load_pipeline_config(bad)
    bad.write_text("crop:\n  treshold: 0.2\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown 'crop' setting\(s\) \['treshold'\]"):
        load_pipeline_config(bad)
    bad.write_text(yaml.safe_dump({"bundle": str(REPO / "bundles" / "dermoscopy_gain"), "common": {"max_epoch": 1}}))
    with pytest.raises(ValueError, match=r"bad.yaml: 'common' sets \['max_epoch'\], which the bundle dermoscopy_gain"):
        run_attention_crop(bad, output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # refused before anything is written
