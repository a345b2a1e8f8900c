"""The glimpse-attention bundle end to end through ``python -m monai.bundle`` (tiny pattern2 images, 2 epochs)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import mlflow
import pytest
from monai.bundle import run
from PIL import Image

from medgain.cli import main as medgain_main
from medgain.demo import bundle_run
from medgain.model_file import load_model, load_model_spec, load_operating_point
from medgain.synth import make_pattern_dataset, make_wsi_dataset

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "glimpse_attention"
TINY = {
    "image_size": 48,
    "batch_size": 4,
    "num_workers": 0,
    "glimpse_size": 8,
    "hidden_size": 16,
    "context_size": 16,
    "num_glimpses": 3,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("glimpse")
    data = make_pattern_dataset(base / "data", "pattern2", 16, seed=0, size=48, rgb=True,
                                split_fractions=(0.5, 0.25, 0.25)).parent
    root = base / "root"
    bundle_run("training", ["train.yaml"], bundle=BUNDLE, bundle_root=root, dataset_dir=data, max_epochs=2, **TINY)
    return data, root


def test_training_logs_glimpses_statistics_and_best_model(trained: tuple[Path, Path]) -> None:
    _, root = trained
    assert (root / "models" / "model.pt").is_file() and (root / "models" / "checkpoint_last.pt").is_file()
    spec = load_model_spec(root / "models" / "model.pt")  # the model file describes its network
    assert spec.architecture == "glimpse" and spec.network == "small_cnn" and spec.glimpse["num_glimpses"] == 3
    assert load_model(root / "models" / "model.pt").num_glimpses == 3
    panels = sorted((root / "outputs" / "glimpses").glob("validation_epoch_*.png"))
    assert [p.name for p in panels] == ["validation_epoch_001.png", "validation_epoch_002.png"]
    assert Image.open(panels[0]).size == (2 * 288, 2 * 288)  # 2 tumour + 2 normal images, 48² tiles enlarged ×6
    client = mlflow.MlflowClient(f"sqlite:///{root / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("glimpse_attention")
    (run,) = client.search_runs([experiment.experiment_id])
    metrics = run.data.metrics
    for name in ("val_f1", "val_auc", "val_glimpse_step_distance", "val_glimpse_center_spread",
                 "val_glimpse_on_tumour", "val_glimpse_2_accuracy", "loss_location", "loss_per_glimpse"):
        assert name in metrics, name
    assert metrics["val_glimpse_step_distance"] > 0.1  # the initial glimpses are spread
    assert run.data.params["num_glimpses"] == "3"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "glimpses")}
    assert artifacts == {"glimpses/validation_epoch_001.png", "glimpses/validation_epoch_002.png"}


def test_evaluate_and_inference_write_glimpse_tables(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, root = trained
    bundle_run("evaluate", ["train.yaml", "evaluate.yaml"], bundle=BUNDLE, bundle_root=root, dataset_dir=data, **TINY)
    evaluation = root / "outputs" / "evaluation"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert {"test_f1", "test_auc", "test_glimpse_on_tumour", "test_glimpse_0_accuracy"} <= set(metrics)
    with open(evaluation / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["label"] for r in rows} == {"0", "1"}
    assert [p.name for p in (evaluation / "glimpses").iterdir()] == ["test.png"]

    images = tmp_path / "input"
    images.mkdir()
    source = data / "images" / "000000.png"
    Image.open(source).resize((96, 72)).save(images / "wide.png")  # another size: coordinates in source pixels
    shutil.copy(source, images / "same.png")
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "inference"
    bundle_run("inference", ["inference.yaml"], bundle=BUNDLE, bundle_root=root, input_dir=images,  # standalone
               output_dir=out, batch_size=4, num_workers=0)
    with open(out / "predictions.csv") as f:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(f)}
    assert set(rows) == {"same.png", "wide.png"}
    same, wide = rows["same.png"], rows["wide.png"]
    threshold = load_operating_point(root / "models" / "model.pt")["threshold"]
    expected = "" if threshold is None else str(int(float(same["score"]) >= threshold))
    assert same["decision"] == expected and 0.0 <= float(same["probability"]) <= 1.0
    for t in range(3):
        x, y = float(same[f"glimpse{t}_x"]), float(same[f"glimpse{t}_y"])
        assert -0.5 <= x <= 47.5 and -0.5 <= y <= 47.5
        # the same image content scaled by 2 (x) and 1.5 (y): the glimpses scale with it
        assert float(wide[f"glimpse{t}_x"]) == pytest.approx((x + 0.5) * 2 - 0.5, abs=1.0)
        assert float(wide[f"glimpse{t}_height"]) == pytest.approx(float(same[f"glimpse{t}_height"]) * 1.5, rel=0.05)
    assert sorted(p.name for p in (out / "glimpses").glob("*.png")) == ["same_f0.png", "wide_f0.png"]
    assert "broken.png" in (out / "errors.csv").read_text()


def test_trains_and_evaluates_on_the_whole_slide_patch_tables(tmp_path: Path) -> None:
    """The whole-slide bundle's patch tables (tiles + tumour masks from the annotations) feed the glimpse model."""
    labels = make_wsi_dataset(tmp_path / "slides", 6, seed=1, size=1024, tumour_rate=0.5, mpp=2.0)
    data = tmp_path / "data"
    assert medgain_main(["wsi", "patches", "--labels", str(labels), "--out", str(data), "--level", "1",
                         "--patch-size", "32", "--max-per-class", "8", "--max-eval-patches", "12"]) == 0
    root = tmp_path / "root"
    wsi = {**TINY, "image_size": 32, "level": 1}
    configs = BUNDLE / "configs"
    common = {"meta_file": str(configs / "metadata.json"), "logging_file": str(configs / "logging.conf"),
              "bundle_root": str(root), "dataset_dir": str(data), **wsi}
    run("training", config_file=[str(configs / n) for n in ("train.yaml", "wsi_patches.yaml")], max_epochs=1,
        **common)  # in process: two fewer interpreter start-ups
    client = mlflow.MlflowClient(f"sqlite:///{root / 'outputs' / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("glimpse_attention").experiment_id])
    assert {"loss_location", "loss_step", "val_auc", "val_glimpse_on_tumour"} <= set(tracked.data.metrics)
    run("evaluate", config_file=[str(configs / n) for n in ("train.yaml", "evaluate.yaml", "wsi_patches.yaml")],
        **common)
    with open(root / "outputs" / "evaluation" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    with open(data / "patches_test.csv") as f:
        table = list(csv.DictReader(f))
    assert len(rows) == len(table)  # one row per test patch: its slide and table row
    assert {(Path(r["file"]).name, int(r["frame"])) for r in rows} == {
        (Path(t["slide"]).name, i) for i, t in enumerate(table)}
    for row in rows:  # glimpse boxes in pixels of the 32-px patch
        assert all(-0.5 <= float(row[f"glimpse{t}_{k}"]) <= 31.5 for t in range(3) for k in ("x", "y"))
