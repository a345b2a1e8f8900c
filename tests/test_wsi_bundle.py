"""The whole-slide bundle end to end, in process through ``monai.bundle.run``: patch tables → training (resumed) →
evaluation (patches + slides: slide AUC, FROC) → standalone slide inference. Tiny slides, one epoch."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from monai.bundle import run, verify_net_in_out

from medgain.cli import main as medgain_main
from medgain.data import study_ref
from medgain.synth import make_wsi_dataset
from medgain.wsi import SPLITS, PatchIdd, patch_datalist, scan_slides, split_slides, split_slides_table

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "wsi_patch_gain"
CONFIGS = BUNDLE / "configs"
TINY = {"network": "small_cnn", "patch_size": 32, "level": 1, "batch_size": 8, "num_workers": 0}


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
    """Six 1024² slides (three with tumours), split 2 / 2 / 2 by `medgain wsi patches` at level 1, 32-px patches."""
    root = tmp_path_factory.mktemp("wsi_bundle")
    labels = make_wsi_dataset(root / "slides", 6, seed=1, size=1024, tumour_rate=0.5, mpp=2.0)
    out = root / "data"
    args = ["wsi", "patches", "--labels", str(labels), "--out", str(out), "--level", "1", "--patch-size", "32",
            "--max-eval-patches", "80"]
    assert medgain_main(args) == 0
    return out


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wsi_root")
    _run("training", ["train.yaml"], bundle_root=str(root), dataset_dir=str(dataset), max_epochs=1, **TINY)
    return root


def _client(root: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{root / 'outputs' / 'mlflow.db'}")


def _runs(root: Path, prefix: str) -> list:
    client = _client(root)
    experiment = client.get_experiment_by_name("wsi_patch_gain")
    return [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name.startswith(prefix)]


def _artifacts(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for entry in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return found


def test_patch_tables_split_slides_and_feed_monai(dataset: Path) -> None:
    slides = {split: split_slides_table(dataset, split) for split in SPLITS}
    ids = [s["slide"] for split in SPLITS for s in slides[split]]
    assert sorted(ids) == [f"slide_{i:03d}" for i in range(6)]  # every slide in exactly one split
    assert all(sorted(s["label"] for s in slides[split]) == [0, 1] for split in SPLITS)  # stratified
    with (dataset / "patches_training.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sum(int(r["label"]) for r in rows) * 2 == len(rows) > 0  # balanced
    assert {r["level"] for r in rows} == {"1"}
    items = patch_datalist(dataset, "training", 32, level=1)
    assert [i["index"] for i in items] == list(range(len(rows)))
    tumour = next(i for i in items if i["label"] == 1)
    assert tumour["annotation"].endswith(".xml") and Path(tumour["image"]).is_file()
    assert tumour["location"] == [int(rows[tumour["index"]]["y"]), int(rows[tumour["index"]]["x"])]
    with pytest.raises(ValueError, match=r"patches_training.csv, line 2: patch at level 1, the bundle runs at level 0"):
        patch_datalist(dataset, "training", 32, level=0)
    assert scan_slides(dataset.parent / "slides" / "images") == sorted(
        str(p) for p in (dataset.parent / "slides" / "images").glob("*.tif")
    )
    assert len(scan_slides(dataset.parent / "slides" / "labels.csv")) == 6
    with pytest.raises(ValueError, match="summing to 1"):
        split_slides([{"label": 0}], (0.5, 0.5, 0.5))
    rows = [{"slide": f"s{i}", "label": int(i < 5)} for i in range(10)] + [{"slide": "lone", "label": 0}]
    split = split_slides(rows[:10], (0.6, 0.2, 0.2), seed=3)
    assert [sorted(r["label"] for r in split[s]) for s in SPLITS] == [[0, 0, 0, 1, 1, 1], [0, 1], [0, 1]]
    assert split == split_slides(rows[:10], (0.6, 0.2, 0.2), seed=3) != split_slides(rows[:10], (0.6, 0.2, 0.2), seed=4)
    with pytest.raises(ValueError, match="3 tumour and 3 normal slides are needed; there are 1 tumour and 1 normal"):
        split_slides([rows[0], rows[-1]], (0.6, 0.2, 0.2))  # one slide per label: no validation, no test
    tiny = split_slides([rows[0], rows[-1]], (1.0, 0.0, 0.0))  # training only, as asked
    assert [len(tiny[s]) for s in SPLITS] == [2, 0, 0]


def test_patch_ids_come_from_the_wsi_metadata() -> None:
    from monai.data import MetaTensor

    patch = MetaTensor(torch.zeros(3, 4, 4), meta={"path": "a.tif", "index": torch.tensor(7)})
    out = PatchIdd()({"image": patch})
    assert out["image_path"] == "a.tif" and out["frame"] == 7
    with pytest.raises(KeyError, match=r"lacks \['index'\].*additional_meta_keys=\['index'\]"):
        PatchIdd()({"image": MetaTensor(torch.zeros(3, 4, 4), meta={"path": "a.tif"})})


def test_patch_table_naming_a_slide_of_another_split_is_refused(dataset: Path, tmp_path: Path) -> None:
    broken = tmp_path / "data"
    shutil.copytree(dataset, broken)
    shutil.copy(broken / "slides_validation.csv", broken / "slides_training.csv")
    with pytest.raises(ValueError, match=r"patches_training.csv, line 2: slide .* is not listed in .*slides_training"):
        patch_datalist(broken, "training", 32)


def test_training_is_tracked_registers_the_model_and_resumes(trained: Path, dataset: Path, tmp_path: Path) -> None:
    (train_run,) = _runs(trained, "train-small_cnn-L1P32-EX100%-seed0-")  # the default: no attention mining
    client = _client(trained)
    assert train_run.info.status == "FINISHED"
    expected = {"loss", "loss_cl", "loss_ex", "val_auc", "val_tpr_at_fpr_0.001", "val_tpr_at_fpr_0.0005",
                "val_iou", "val_attention_in_mask"}
    assert expected <= set(train_run.data.metrics)
    assert train_run.data.params["level"] == "1" and train_run.data.params["backend"] == "tifffile"
    assert train_run.data.tags["bundle"] == "wsi_patch_gain" and train_run.data.tags["patch_size"] == "32"
    artifacts = _artifacts(client, train_run.info.run_id)
    assert {"attention/validation_epoch_001.png", "roc/roc_validation_epoch_001.png", "checkpoint/model.pt"} <= set(
        artifacts
    )
    best = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert best["model_spec"]["image_size"] == [32, 32] and best["model_spec"]["class_names"] == ["normal", "tumour"]
    # the task and the magnification learned: slides at 2.0 microns per pixel, read at level 1
    assert best["model_spec"]["bundle"] == "wsi_patch_gain" and best["model_spec"]["mpp"] == 4.0
    threshold = best["operating_point"]["threshold"]
    assert threshold is None or math.isfinite(threshold)
    (version,) = client.search_model_versions("name='wsi_patch_gain'")
    assert version.run_id == train_run.info.run_id
    # resume from the last checkpoint: only the second epoch runs
    root = tmp_path / "resumed"
    shutil.copytree(trained, root)
    _run("training", ["train.yaml"], bundle_root=str(root), dataset_dir=str(dataset), max_epochs=2,
         resume_from=str(root / "models" / "checkpoint_last.pt"), registered_model_name=None, **TINY)
    (resumed,) = _runs(root, "train-")  # the resumed training continues its MLflow run
    assert resumed.info.run_id == train_run.info.run_id and resumed.info.status == "FINISHED"
    assert [m.step for m in _client(root).get_metric_history(resumed.info.run_id, "val_auc")] == [1, 2]
    assert sorted(p.name for p in (root / "models").glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=2.pt"]


def test_evaluate_reports_patch_and_slide_metrics_in_mlflow(trained: Path, dataset: Path) -> None:
    _run("evaluate", ["train.yaml", "evaluate.yaml"], bundle_root=str(trained), dataset_dir=str(dataset),
         num_workers=0, batch_size=8)  # network, patch size and level from the checkpoint
    out = trained / "outputs" / "evaluation"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"test_sensitivity", "test_auc", "test_iou", "test_slide_auc", "test_froc", "test_n_slides"} <= set(metrics)
    assert metrics["test_n_slides"] == 2 and metrics["test_n_missing"] == 0
    assert metrics["test_slide_auc"] is not None and 0.0 <= metrics["test_slide_auc"] <= 1.0
    assert metrics["test_n_tumours"] >= 1 and 0.0 <= metrics["test_froc"] <= 1.0
    with (out / "slides" / "slides.csv").open() as fh:
        scored = {r["slide"] for r in csv.DictReader(fh)}
    assert scored == {s["slide"] for s in split_slides_table(dataset, "test")}
    with (out / "predictions.csv").open() as fh:
        predictions = list(csv.DictReader(fh))
    with (dataset / "patches_test.csv").open() as fh:
        assert len(predictions) == len(list(csv.DictReader(fh)))
    (eval_run,) = _runs(trained, "evaluate-test-small_cnn-")
    assert {"test_slide_auc", "test_froc", "test_froc_sensitivity_at_1", "test_auc"} <= set(eval_run.data.metrics)
    assert eval_run.data.metrics["test_froc"] == pytest.approx(metrics["test_froc"])
    artifacts = set(_artifacts(_client(trained), eval_run.info.run_id))
    slide = study_ref(sorted(scored)[0])  # MLflow names slides by their pseudonym; the local folder by slide id
    assert {"metrics.json", "roc/roc_test.png", "attention/test.png", "predictions.csv", "slides/slides.csv",
            "slides/errors.csv", f"slides/{slide}/thumbnail.png", f"slides/{slide}/probability_overlay.png",
            f"slides/{slide}/attention_overlay.png", f"slides/{slide}/lesions.csv"} <= artifacts
    assert not any("slide_" in name for name in artifacts)
    logged = _client(trained).download_artifacts(eval_run.info.run_id, "slides/slides.csv", str(trained / "dl"))
    with open(logged) as fh:
        rows = list(csv.DictReader(fh))
    assert {r["ref"] for r in rows} == {study_ref(s) for s in scored} and "slide_" not in Path(logged).read_text()
    assert sorted(r["label"] for r in rows) == ["0", "1"]


def test_standalone_slide_inference_skips_broken_slides_and_resumes(
    trained: Path, dataset: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "slides"
    inputs.mkdir()
    images = sorted((dataset.parent / "slides" / "images").glob("*.tif"))[:2]
    for image in images:
        shutil.copy(image, inputs / image.name)
    (inputs / "cut.tif").write_bytes(images[0].read_bytes()[:20000])
    alone = tmp_path / "bundle"  # inference.yaml and the model file only
    (alone / "models").mkdir(parents=True)
    shutil.copy(trained / "models" / "model.pt", alone / "models")
    out = tmp_path / "out"
    common = {"meta_file": str(CONFIGS / "metadata.json"), "config_file": str(CONFIGS / "inference.yaml"),
              "logging_file": str(CONFIGS / "logging.conf"), "bundle_root": str(alone), "input_dir": str(inputs),
              "output_dir": str(out)}  # the level comes from the model file
    with pytest.raises(RuntimeError) as refused:  # MONAI's config error, caused by medgain's
        run("inference", **common, level=0)
    assert "the model was trained with level=1 but 0 was given" in str(refused.value.__cause__)
    run("inference", **common)
    with (out / "errors.csv").open() as fh:
        (error,) = list(csv.DictReader(fh))
    assert error["slide"] == "cut" and "cut.tif: truncated TIFF" in error["error"]
    with (out / "slides.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["slide"] for r in rows] == [p.stem for p in images]
    assert all(math.isfinite(float(r["score"])) for r in rows)
    record = json.loads((out / images[0].stem / "slide.json").read_text())
    assert record["level"] == 1 and record["patch_size"] == 32 and record["mpp"] == 2.0
    assert record["model_mpp"] == record["level_mpp"] == 4.0 and "operating point" in record["lesion_threshold_source"]
    stamp = (out / images[0].stem / "slide.json").stat().st_mtime_ns
    run("inference", **common)  # finished slides are not run again
    assert (out / images[0].stem / "slide.json").stat().st_mtime_ns == stamp


def test_verify_net_in_out() -> None:
    verify_net_in_out(
        "network_def",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "train.yaml"),
        network="small_cnn",
    )
