"""The capsule-endoscopy bundle end to end through ``python -m monai.bundle`` (tiny images, two epochs)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.models
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import write_dicom
from PIL import Image

from medgain.data.phi import frame_ref
from medgain.synth.capsule import make_capsule_dataset
from medgain.demo import CAPSULE_BUNDLE, bundle_run

TINY = {"image_size": 64, "batch_size": 8, "num_workers": 0, "network": "small_cnn"}  # every network: test_every_network
CONFIGS = CAPSULE_BUNDLE / "configs"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_capsule_dataset(
        tmp_path_factory.mktemp("capsule") / "data", 90, seed=1, size=64, prevalence=0.3, frames_per_study=6
    ).parent


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundle_root")
    bundle_run("training", ["train.yaml"], bundle_root=root, dataset_dir=dataset, max_epochs=2, am_weight=1.0,
               **TINY)  # attention mining is off by default; the bundle still has to train with it
    return root


def _client(root: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{root / 'outputs' / 'mlflow.db'}")


def _runs(root: Path, prefix: str) -> list:
    client = _client(root)
    experiment = client.get_experiment_by_name("capsule_endoscopy_gain")
    return [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name.startswith(prefix)]


def _artifacts(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for entry in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return found


def test_training_run_is_tracked_in_mlflow(trained: Path, dataset: Path) -> None:
    (run,) = _runs(trained, "train-")
    client = _client(trained)
    assert run.info.status == "FINISHED"
    expected = {"loss", "loss_cl", "loss_am", "loss_ex", "val_auc", "val_tpr_at_fpr_0.0005", "val_tpr_at_fpr_0.001",
                "val_iou", "val_attention_in_mask", "val_attention_outside_fov", "val_accuracy"}
    assert expected <= set(run.data.metrics)
    assert "loss_area" not in run.data.metrics  # area_weight 0: switched off, not logged as a constant 0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")] == [1, 2]
    assert len(client.get_metric_history(run.info.run_id, "loss_am")) > 2  # logged every iteration
    for name in ("am_weight", "ex_weight", "grad_magnitude", "masks_fraction", "lesion_labels", "network"):
        assert name in run.data.params
    artifacts = _artifacts(client, run.info.run_id)
    for expected_file in ("attention/validation_epoch_001.png", "attention/validation_epoch_002.png",
                          "roc/roc_validation_epoch_002.png", "checkpoint/model.pt", "model/MLmodel"):
        assert expected_file in artifacts
    # a readable name and the tags a reviewer filters on
    assert run.info.run_name.startswith("train-small_cnn-AM+EX100%-seed0-")
    tags = run.data.tags
    assert tags["bundle"] == "capsule_endoscopy_gain" and tags["network"] == "small_cnn" and tags["seed"] == "0"
    assert tags["data_hash"] == hashlib.sha256((dataset / "datalist.json").read_bytes()).hexdigest()[:12]
    assert len(tags["medgain_commit"]) >= 12
    best = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert run.data.metrics["best_epoch"] == best["epoch"]
    assert run.data.metrics["best_val_auc"] == pytest.approx(best["metrics"]["val_auc"], nan_ok=True)
    (version,) = client.search_model_versions("name='capsule_endoscopy_gain'")  # one version per training run
    assert version.run_id == run.info.run_id and version.source.endswith("/artifacts/model")
    assert {k: str(v) for k, v in client.get_registered_model("capsule_endoscopy_gain").aliases.items()} == {
        "candidate": str(version.version)
    }
    assert f"epoch {best['epoch']}" in version.description and "small_cnn at 64x64" in version.description
    signature = mlflow.models.Model.load(client.download_artifacts(run.info.run_id, "model", str(trained / "dl")))
    assert list(signature.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 64, 64]
    assert best["model_spec"] == {
        "network": "small_cnn", "num_classes": 2, "image_size": [64, 64], "in_channels": 3,
        "target_layer": "features.3", "normalization": None, "class_names": ["normal", "lesion"],
        "bundle": "capsule_endoscopy_gain", "modality": "ES",
    }
    assert best["provenance"] == {"run_id": run.info.run_id, "model_name": "capsule_endoscopy_gain",
                                  "model_version": str(version.version)}
    point = best["operating_point"]
    assert point["max_fpr"] == 0.001 and (point["threshold"] is None or math.isfinite(point["threshold"]))
    assert (trained / "models" / "checkpoint_last.pt").is_file()


def test_training_resumes_from_a_checkpoint(trained: Path, dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "resumed"
    shutil.copytree(trained, root)
    last = root / "models" / "checkpoint_last.pt"
    result = bundle_run(
        "training", ["train.yaml"], bundle_root=root, dataset_dir=dataset, max_epochs=3, resume_from=last,
        capture_output=True, **TINY,
    )
    log = result.stdout + result.stderr
    assert "from iteration" in log
    assert "Got new best metric" not in log  # MONAI's "new best … 0.0" after a resume: gone
    state = torch.load(last, weights_only=False)["trainer"]
    assert state["iteration"] == 3 * state["epoch_length"]
    (run,) = _runs(root, "train-")  # the resumed training continues its MLflow run
    assert run.info.status == "FINISHED"
    history = _client(root).get_metric_history(run.info.run_id, "val_auc")
    assert [m.step for m in history] == [1, 2, 3]  # only the resumed epoch ran, into the same history
    # the earlier process's checkpoint_epoch=2.pt does not linger beside the resumed run's epoch-3 one
    assert sorted(p.name for p in (root / "models").glob("*epoch=*.pt")) == ["checkpoint_epoch=3.pt"]


def test_evaluate_reports_the_shipped_operating_point_and_links_the_training_run(trained: Path, dataset: Path) -> None:
    result = bundle_run(  # no network / image size given: they come from the checkpoint
        "evaluate", ["train.yaml", "evaluate.yaml"], bundle_root=trained, dataset_dir=dataset, num_workers=0,
        batch_size=8, capture_output=True,
    )
    assert "Got new best metric" not in result.stdout + result.stderr
    out = trained / "outputs" / "evaluation"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {
        "test_sensitivity", "test_specificity", "test_false_alarms", "test_false_alarms_per_1000", "test_accuracy",
        "test_retuned_tpr_at_fpr_0.001", "test_retuned_tpr_at_fpr_0.0005", "test_auc", "test_iou",
        "test_attention_in_mask", "test_attention_outside_fov", "test_fpr_upper", "test_fpr_above_bound",
        *[k for k in metrics if k.startswith("test_retuned_") and k.endswith(
            ("_threshold", "_negatives", "_positives", "_false_alarms"))],
    }
    notes = json.loads((out / "metrics_notes.json").read_text())  # 9 negatives cannot resolve 0.1 %
    assert "needs >= 1000 negatives" in notes["test_retuned_tpr_at_fpr_0.001"]
    test_items = json.loads((dataset / "datalist.json").read_text())["test"]
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(test_items) and {"file", "frame", "score", "probability", "decision", "label"} <= set(rows[0])
    best = torch.load(trained / "models" / "model.pt", weights_only=True)
    threshold = best["operating_point"]["threshold"]
    if threshold is not None:  # the headline figures are the CSV's decisions at the stored threshold
        ill = [r for r in rows if int(r["label"]) != 0]
        flagged = [int(float(r["score"]) >= threshold) for r in ill]
        assert metrics["test_sensitivity"] == pytest.approx(sum(flagged) / len(ill))
        assert metrics["test_false_alarms"] == sum(
            int(float(r["score"]) >= threshold) for r in rows if int(r["label"]) == 0
        )
    assert (out / "roc_test.png").is_file() and (out / "attention" / "test.png").is_file()
    (run,) = _runs(trained, "evaluate-test-small_cnn-")
    (train_run,) = _runs(trained, "train-")
    assert re.fullmatch(r"f-[0-9a-f]{16}", run.data.params["checkpoint"])  # a pseudonym, as dataset_dir
    assert not {"max_epochs", "epoch_length"} & set(run.data.params)  # no training-only params
    assert 0.0 <= run.data.metrics["test_attention_outside_fov"] <= 1.0
    assert run.data.tags["training_run_id"] == train_run.info.run_id
    assert run.data.tags["model_name"] == "capsule_endoscopy_gain" and run.data.tags["model_version"] == "1"
    assert "needs >= 1000" in run.data.tags["note.test_retuned_tpr_at_fpr_0.001"]
    version = _client(trained).get_model_version("capsule_endoscopy_gain", "1")
    assert version.tags["evaluation_run_id"] == run.info.run_id
    artifacts = _artifacts(_client(trained), run.info.run_id)
    assert {"metrics.json", "roc/roc_test.png", "attention/test.png", "predictions.csv"} <= set(artifacts)
    refused = bundle_run(
        "evaluate", ["train.yaml", "evaluate.yaml"], bundle_root=trained, dataset_dir=dataset, image_size=32,
        capture_output=True, check=False,
    )
    assert refused.returncode != 0 and "trained with image_size=[64, 64] but 32 was given" in refused.stderr


def test_inference_on_a_folder_with_clips_and_broken_files(trained: Path, dataset: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    (inputs / "clips").mkdir(parents=True)
    frames = sorted((dataset / "images").glob("*.png"))[:2]
    for frame in frames:
        shutil.copy(frame, inputs / frame.name)
    clip = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted((dataset / "images").glob("*.png"))[2:5]])
    write_dicom(inputs / "clips" / "clip.dcm", clip)
    (inputs / "broken.png").write_bytes(frames[0].read_bytes()[:60])
    (inputs / "clips" / "truncated.dcm").write_bytes((inputs / "clips" / "clip.dcm").read_bytes()[:400])
    out = tmp_path / "out"
    alone = tmp_path / "bundle"  # standalone: inference.yaml only, in a folder without training data or MLflow
    shutil.copytree(CONFIGS, alone / "configs")
    (alone / "models").mkdir()
    shutil.copy(trained / "models" / "model.pt", alone / "models")
    bundle_run(
        "inference", ["inference.yaml"], bundle=alone, input_dir=inputs, output_dir=out, num_workers=0
    )
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    assert sorted(int(r["frame"]) for r in rows if r["file"].endswith("clip.dcm")) == [0, 1, 2]
    threshold = torch.load(trained / "models" / "model.pt", weights_only=True)["operating_point"]["threshold"]
    if threshold is None:
        assert all(r["decision"] == "" for r in rows)
    else:
        assert all(int(r["decision"]) == int(float(r["score"]) >= threshold) for r in rows)
    with (out / "errors.csv").open() as f:
        errors = {Path(r["file"]).name: r["reason"] for r in csv.DictReader(f)}
    assert set(errors) == {"broken.png", "truncated.dcm"} and all(errors.values())
    assert len(list((out / "heatmaps").glob("*.png"))) == 5
    heatmap = nib.load(next((out / "heatmaps").glob("*.nii.gz"))).get_fdata()
    assert heatmap.shape == (64, 64) and 0.0 <= heatmap.min() and heatmap.max() <= 1.0  # the trained input size
    refused = bundle_run(
        "inference", ["inference.yaml"], bundle=alone, input_dir=inputs, output_dir=tmp_path / "o2",
        image_size=224, capture_output=True, check=False,
    )
    assert refused.returncode != 0 and "trained with image_size=[64, 64] but 224 was given" in refused.stderr


def _broken_dataset(dataset: Path, tmp_path: Path, how: str) -> tuple[Path, str]:
    """A copy of the data set with one training item broken; returns its folder and the offending file."""
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    datalist = json.loads((data / "datalist.json").read_text())
    # image errors on a negative surface during training; a positive's files are read earlier, for the fill colour
    item = next(i for i in datalist["training"] if i["label"] == (1 if how == "label_map_size" else 0))
    image, label_map = data / item["image"], data / item["label_map"]
    if how == "corrupt_png":
        image.write_bytes(image.read_bytes()[:100])
        bad = image
    elif how == "missing_file":
        image.unlink()
        bad = image
    elif how == "label_map_size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(label_map)
        bad = label_map
    else:  # truncated DICOM
        bad = image.with_suffix(".dcm")
        write_dicom(bad, np.asarray(Image.open(image).convert("RGB"))[None])
        bad.write_bytes(bad.read_bytes()[:-500])
        item["image"] = str(bad.relative_to(data))
    (data / "datalist.json").write_text(json.dumps(datalist))
    return data, str(bad)


@pytest.mark.parametrize("how", ["corrupt_png", "truncated_dicom", "label_map_size", "missing_file"])
def test_bad_input_is_a_clear_error_naming_the_file(dataset: Path, tmp_path: Path, how: str) -> None:
    data, bad = _broken_dataset(dataset, tmp_path, how)
    result = bundle_run(
        "training", ["train.yaml"], bundle_root=tmp_path / "root", dataset_dir=data, max_epochs=1,
        capture_output=True, check=False, **TINY,
    )
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if bad in line and "Error" in line]
    assert errors, result.stderr[-3000:]
    if how in ("corrupt_png", "truncated_dicom"):  # failed during training: the MLflow run says so
        (run,) = _runs(tmp_path / "root", "train-")
        # the error tag names the file by its pseudonym, never by its path (the log above keeps the path)
        assert run.info.status == "FAILED" and frame_ref(bad) in run.data.tags["error"]
        assert bad not in run.data.tags["error"] and Path(bad).name not in run.data.tags["error"]


def test_single_class_validation_gives_nan_with_a_warning(dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    datalist = json.loads((data / "datalist.json").read_text())
    datalist["validation"] = [i for i in datalist["validation"] if i["label"] == 0]
    (data / "datalist.json").write_text(json.dumps(datalist))
    result = bundle_run(
        "training", ["train.yaml"], bundle_root=tmp_path / "root", dataset_dir=data, max_epochs=2,
        capture_output=True, **TINY,
    )
    assert "TPR at FPR needs both classes" in result.stdout + result.stderr
    (run,) = _runs(tmp_path / "root", "train-")
    assert run.info.status == "FINISHED"
    assert math.isnan(run.data.metrics["val_tpr_at_fpr_0.001"]) and math.isnan(run.data.metrics["val_auc"])
    assert (tmp_path / "root" / "models" / "model.pt").is_file()  # a checkpoint is kept all the same


def test_verify_net_in_out_and_torchscript_export_of_the_trained_model(trained: Path, tmp_path: Path) -> None:
    """MONAI's verify_net_in_out and ckpt_export on the trained model with the training / evaluation configs (in
    process, as `python -m monai.bundle` calls them; tests/test_zoo.py runs them as subprocesses on inference.yaml)."""
    from monai.bundle import ckpt_export, verify_net_in_out

    common = {"meta_file": str(CONFIGS / "metadata.json"), "bundle_root": str(trained)}
    verify_net_in_out(net_id="network_def", config_file=str(CONFIGS / "train.yaml"), network="small_cnn", **common)
    exported = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(exported), ckpt_file=str(trained / "models" / "model.pt"),
                key_in_ckpt="model", config_file=[str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")],
                **common)  # the network spec from the model file
    scripted = torch.jit.load(str(exported))
    from medgain.model_file import load_model_weights
    from medgain.networks import build_classifier

    net = build_classifier("small_cnn", 2).eval()
    load_model_weights(net, trained / "models" / "model.pt")
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(scripted.eval()(x), net(x))


def test_multi_gpu_config_trains_with_two_processes(dataset: Path, tmp_path: Path) -> None:
    """multi_gpu_train.yaml under torchrun; without CUDA the two ranks are CPU processes on gloo."""
    root = tmp_path / "ddp"
    configs = json.dumps([str(CONFIGS / "train.yaml"), str(CONFIGS / "multi_gpu_train.yaml")])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training", "--bundle_root", str(root),
        "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", configs,
        "--logging_file", str(CONFIGS / "logging.conf"), "--dataset_dir", str(dataset), "--max_epochs", "1",
        *[arg for k, v in TINY.items() for arg in (f"--{k}", str(v))],
    ]
    subprocess.run(command, check=True, timeout=300)
    (run,) = _runs(root, "train-")  # only rank 0 logs
    assert run.info.status == "FINISHED" and "val_auc" in run.data.metrics
    assert "module." not in next(iter(torch.load(root / "models" / "model.pt", weights_only=True)["model"]))
