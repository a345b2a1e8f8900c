"""The dermoscopy bundle end to end through in-process ``monai.bundle.run``: one fold of cross-validation,
evaluation on the held-out test split, standalone inference (tiny images, one epoch)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from monai.bundle import run

from medgain.data import read_folds_csv
from medgain.model_file import load_model
from medgain.synth.dermoscopy import make_dermoscopy_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "dermoscopy_gain" / "configs"
TINY = {"image_size": 32, "batch_size": 8, "num_workers": 0, "network": "small_cnn", "n_folds": 2, "tta_views": 2}


def _run(run_id: str, configs: list[str], **override: object) -> None:
    files = [str(CONFIGS / name) for name in configs]
    run(
        run_id,
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=files if len(files) > 1 else files[0],
        logging_file=str(CONFIGS / "logging.conf"),
        **override,
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("derm_bundle") / "data"
    make_dermoscopy_dataset(out, 40, seed=4, prevalence=0.35, images_per_patient=3, min_size=40, max_size=80)
    return out


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("derm_root")
    # AM switched on (the default is EX alone) to test the second forward through the fused model
    _run("training", ["train.yaml"], bundle_root=str(root), dataset_dir=str(dataset), max_epochs=1,
         am_weight=1.0, am_start_epoch=0, **TINY)
    return root


def _client(root: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{root / 'outputs' / 'mlflow.db'}")


def test_training_one_fold_tracks_gain_metrics_and_saves_the_fused_model(trained: Path, dataset: Path) -> None:
    client = _client(trained)
    experiment = client.get_experiment_by_name("dermoscopy_gain")
    (run_,) = client.search_runs([experiment.experiment_id])
    assert run_.info.status == "FINISHED" and run_.info.run_name.startswith("train-small_cnn-fold0-")
    assert {"loss_am", "loss_ex", "val_auc", "val_tpr_at_fpr_0.001", "val_iou", "val_attention_in_mask"} <= set(
        run_.data.metrics
    )
    assert float(client.get_metric_history(run_.info.run_id, "loss_am")[-1].value) > 0  # AM through the fused model
    assert run_.data.params["fold"] == "0" and "sex=male" in run_.data.params["metadata_features"]
    # patient-grouped folds and a held-out test split in folds.csv
    folds = read_folds_csv(trained / "outputs" / "folds.csv")
    with (dataset / "train.csv").open(newline="") as f:
        patients = {row["image_name"]: row["patient_id"] for row in csv.DictReader(f)}
    fold_of_patient: dict[str, int] = {}
    for image, fold in folds.items():
        assert fold_of_patient.setdefault(patients[Path(image).stem], fold) == fold
    assert set(folds.values()) == {-1, 0, 1} and len(folds) == 40
    best = torch.load(trained / "models" / "fold0" / "model.pt", weights_only=True)
    spec = best["model_spec"]
    assert spec["architecture"] == "fusion" and spec["target_layer"] == "image_branch.features.3"
    assert spec["metadata_encoder"]["columns"] == ["sex", "age_approx", "anatom_site_general_challenge"]
    model = load_model(trained / "models" / "fold0" / "model.pt")
    categories = spec["metadata_encoder"]["categories"]
    assert model.num_metadata == 2 + sum(len(v) + 1 for v in categories.values())  # age (+ unknown), one-hot
    assert categories["sex"] == ["female", "male"]
    # out-of-fold predictions of the validation fold, log-odds with labels
    with (trained / "outputs" / "oof" / "fold0.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    validation = sorted(image for image, fold in folds.items() if fold == 0)
    assert sorted(r["file"] for r in rows) == validation and {r["label"] for r in rows} == {"0", "1"}


def test_evaluate_on_the_test_split_and_inference_with_errors(trained: Path, dataset: Path, tmp_path: Path) -> None:
    _run("evaluate", ["train.yaml", "evaluate.yaml"], bundle_root=str(trained), dataset_dir=str(dataset), **TINY)
    evaluation = trained / "outputs" / "fold0" / "evaluation"
    with (evaluation / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    test_images = sorted(i for i, fold in read_folds_csv(trained / "outputs" / "folds.csv").items() if fold == -1)
    assert sorted(r["file"] for r in rows) == test_images
    assert (evaluation / "metrics.json").is_file()
    client = _client(trained)
    experiment = client.get_experiment_by_name("dermoscopy_gain")
    evaluate_runs = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name.startswith("evaluate")]
    assert "test_auc" in evaluate_runs[0].data.metrics and evaluate_runs[0].data.params["tta_views"] == "2"
    # standalone inference from a CSV: a missing and a corrupt image become rows of errors.csv
    inputs = tmp_path / "in"
    shutil.copytree(dataset / "images", inputs)
    with (dataset / "train.csv").open(newline="") as f:
        csv_rows = list(csv.DictReader(f))
    (inputs / f"{csv_rows[0]['image_name']}.jpg").unlink()
    (inputs / f"{csv_rows[1]['image_name']}.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "inference"
    _run("inference", ["inference.yaml"], bundle_root=str(trained), fold=0, input_dir=str(inputs),
         input_csv=str(dataset / "train.csv"), output_dir=str(out), num_workers=0, tta_views=2)
    with (out / "errors.csv").open(newline="") as f:
        errors = list(csv.DictReader(f))
    assert [Path(e["file"]).stem for e in errors] == [csv_rows[0]["image_name"], csv_rows[1]["image_name"]]
    assert "row 2" in errors[0]["reason"] and "cannot decode" in errors[1]["reason"]
    with (out / "predictions.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 38
    assert len(list((out / "heatmaps").glob("*.png"))) == 38


def test_chipnet_trains_without_gain_with_chip_attention_metrics_evaluates_and_infers(
    trained: Path, dataset: Path, tmp_path: Path
) -> None:
    root = tmp_path / "chipnet"
    client = _client(trained)  # its store, already created: a fresh MLflow database costs seconds
    chip = {**TINY, "architecture": "chipnet", "chip_size": 8, "tta_views": 1, "experiment_name": "chipnet",
            "tracking_uri": client.tracking_uri, "registered_model_name": "dermoscopy_chipnet"}
    _run("training", ["train.yaml"], bundle_root=str(root), dataset_dir=str(dataset), max_epochs=1, **chip)
    (run_,) = client.search_runs([client.get_experiment_by_name("chipnet").experiment_id])
    assert run_.info.status == "FINISHED" and run_.info.run_name.startswith("train-small_cnn-fold0-chipnet-")
    assert {"val_auc", "val_iou", "val_attention_in_mask"} <= set(run_.data.metrics)
    assert not {"loss_am", "loss_ex"} & set(run_.data.metrics)  # no GAIN handler
    assert run_.data.params["architecture"] == "chipnet" and run_.data.params["metadata_features"] == "[]"
    spec = torch.load(root / "models" / "fold0" / "model.pt", weights_only=True)["model_spec"]
    assert spec["architecture"] == "chipnet" and spec["chip_size"] == 8 and "metadata_encoder" not in spec
    model = load_model(root / "models" / "fold0" / "model.pt")
    _, grid = model.forward_with_attention(torch.rand(1, 3, 32, 32))
    assert grid.shape == (1, 1, 4, 4)
    with (root / "outputs" / "oof" / "fold0.csv").open(newline="") as f:
        assert {r["label"] for r in csv.DictReader(f)} == {"0", "1"}
    _run("evaluate", ["train.yaml", "evaluate.yaml"], bundle_root=str(root), dataset_dir=str(dataset), **chip)
    metrics = (root / "outputs" / "fold0" / "evaluation" / "metrics.json").read_text()
    assert "test_auc" in metrics and "test_iou" in metrics
    out = tmp_path / "inference"
    _run("inference", ["inference.yaml"], bundle_root=str(root), fold=0, input_dir=str(dataset / "images"),
         output_dir=str(out), num_workers=0, tta_views=2)
    assert len(list((out / "heatmaps").glob("*.png"))) == 40
