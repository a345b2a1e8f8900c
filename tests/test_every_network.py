"""Every registered network through the capsule bundle: train → evaluate → inference (tiny, in-process)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from monai.bundle import run

from medgain.demo import CAPSULE_BUNDLE
from medgain.model_file import load_model, load_model_spec
from medgain.networks import IMAGENET_NORMALIZATION, TARGET_LAYERS, build_classifier
from medgain.synth.capsule import make_capsule_dataset

CONFIGS = CAPSULE_BUNDLE / "configs"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_capsule_dataset(
        tmp_path_factory.mktemp("nets") / "data", 20, seed=3, size=32, prevalence=0.4, frames_per_study=2
    ).parent


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the module: creating a store's tables costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _run(run_id: str, configs: list[str], **override: object) -> None:
    files = [str(CONFIGS / name) for name in configs]
    run(
        run_id,
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=files if len(files) > 1 else files[0],
        logging_file=str(CONFIGS / "logging.conf"),
        **override,
    )


def _train_evaluate_infer(root: Path, dataset: Path, tracking_uri: str, network: str, **train: object) -> Path:
    common = {
        "bundle_root": str(root), "dataset_dir": str(dataset), "num_workers": 0, "batch_size": 4,
        "tracking_uri": tracking_uri,
    }
    _run("training", ["train.yaml"], network=network, image_size=32, max_epochs=1, **common, **train)
    _run("evaluate", ["train.yaml", "evaluate.yaml"], **common)
    _run("inference", ["inference.yaml"], bundle_root=str(root), input_dir=str(dataset / "images"),
         output_dir=str(root / "inference"), num_workers=0)
    return root / "models" / "model.pt"


@pytest.mark.parametrize("network", sorted(TARGET_LAYERS))
def test_every_registered_network_trains_evaluates_and_infers(
    network: str, dataset: Path, tracking_uri: str, tmp_path: Path
) -> None:
    checkpoint = _train_evaluate_infer(tmp_path, dataset, tracking_uri, network, registered_model_name=None)
    spec = load_model_spec(checkpoint)
    assert spec.network == network and spec.target_layer == TARGET_LAYERS[network] and spec.image_size == (32, 32)
    metrics = json.loads((tmp_path / "outputs" / "evaluation" / "metrics.json").read_text())
    assert "test_auc" in metrics and "test_sensitivity" in metrics
    with open(tmp_path / "inference" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(list((dataset / "images").glob("*.png")))
    assert len(list((tmp_path / "inference" / "heatmaps").glob("*.nii.gz"))) == len(rows)


def test_pretrained_weights_bring_imagenet_normalisation_into_the_model_and_unveil_panels_run(
    dataset: Path, tracking_uri: str, tmp_path: Path
) -> None:
    weights = tmp_path / "pretrained.pt"
    torch.save(build_classifier("small_cnn", 5).state_dict(), weights)  # another head: kept fresh
    checkpoint = _train_evaluate_infer(
        tmp_path / "run", dataset, tracking_uri, "small_cnn", pretrained_path=str(weights), unveil_panels=True
    )
    assert (tmp_path / "run" / "outputs" / "unveil" / "epoch_001.png").is_file()  # the opt-in unveiling panels
    spec = load_model_spec(checkpoint)
    assert spec.normalization == IMAGENET_NORMALIZATION  # recorded…
    model = load_model(checkpoint)
    plain = build_classifier("small_cnn", 2).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(IMAGENET_NORMALIZATION["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZATION["std"]).view(1, 3, 1, 1)
    with torch.no_grad():  # …and applied by the network itself, so [0, 1] images go in everywhere
        torch.testing.assert_close(model(x), plain((x - mean) / std))
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))  # and exported with it
