"""Registry review, promotion gate, partner package and PHI, end to end on a tiny synthetic capsule set:
train two versions -> review (HTML rendered in a browser) -> promote (pass, fail, override, unreviewed) ->
package -> verify (one byte changed in any file, wrong key) -> standalone inference from the unpacked package ->
no planted identifier anywhere in the MLflow store, the reports or the package."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
import yaml
from monai.bundle import run as monai_run
from PIL import Image
from registry_helpers import CONFIGS, identifiers, make_keys, make_store, phi_dataset, registry_env, train

from medgain.cli import main
from medgain.data.phi import frame_ref
from medgain.partner import run_partner_inference
from medgain.registry import (
    PackageVerificationError,
    PromotionRefused,
    build_package,
    promote,
    review_model,
    scan_for_identifiers,
    store_locations,
    verify_package,
)

NAME = "capsule_endoscopy_gain"


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Two trained versions, both reviewed (the second against the champion), gated and packaged."""
    with registry_env("registry-test-salt"):
        root = tmp_path_factory.mktemp("registry")
        datalist = phi_dataset(root / "data")
        uri = f"sqlite:///{root / 'mlflow.db'}"
        make_store(uri, root / "artifacts")
        train(root / "run1", datalist, uri, seed=1)  # validation sets no operating threshold: cannot be packaged
        train(root / "run2", datalist, uri, seed=0)
        state: dict[str, Any] = {"root": root, "datalist": datalist, "uri": uri, "client": mlflow.MlflowClient(uri)}
        common = {"tracking_uri": uri, "n_bootstrap": 100, "gallery_size": 4}
        state["review1"] = review_model(NAME, "1", datalist, root / "review1", against="champion", **common)
        gate = root / "gate.yaml"
        gate.write_text(yaml.safe_dump({"rules": ["test_auc >= 0.0"], "not_worse_than": "champion"}))
        state["gate"] = gate
        # version 1 (no operating threshold) cannot be promoted; it stays the baseline version 2 is compared with
        state["client"].set_registered_model_alias(NAME, "baseline", "1")
        state["review2"] = review_model(NAME, "2", datalist, root / "review2", against="baseline", **common)
        state["promoted"] = promote(NAME, "2", "champion", gate, "dr-a", tracking_uri=uri, first_champion=True)
        yield state


def test_review_report_and_registry_records(flow: Any) -> None:
    review, client = flow["review2"], flow["client"]
    figures = review["figures"]
    assert {"auc", "tpr_at_fpr_0.0005", "tpr_at_fpr_0.001", "iou", "attention_in_mask"} <= set(figures)
    for name, f in figures.items():
        if not np.isnan(f["value"]):
            assert f["low"] - 1e-9 <= f["value"] <= f["high"] + 1e-9, name
    assert review["resampled_by"] == "study" and review["counts"]["frames"] == 18
    card = review["model_card"]
    assert card["bundle"] == NAME and card["network"] == "small_cnn" and card["input_size"] == "32x32"
    assert "train" in card["training_run"] and len(card["medgain_commit"]) >= 12
    assert card["training_data"].startswith("training: 30 items") and "of 11 ill training frames" in card["masks_used"]
    # against the baseline (version 1) on the same frames: paired differences and the disagreeing frames
    comparison = review["comparison"]
    assert comparison["version"] == "1" and set(comparison["figures"]) >= {"auc", "iou"}
    auc = comparison["figures"]["auc"]
    assert auc["value"] == pytest.approx(auc["candidate"] - auc["champion"]) and auc["low"] <= auc["high"]
    assert flow["review1"]["comparison"] is None and "no version" in flow["review1"]["notes"]["comparison"]
    assert [row["budget"] for row in review["operating_points"]][:2] == ["FPR <= 0.05 %", "FPR <= 0.1 %"]
    stored = review["stored_operating_point"]  # a dozen validation frames cannot back 0.1 %
    assert not stored["backed"] and "operating_point_fpr_upper" in review["gate_values"]
    assert html.escape(stored["statement"]) in (flow["root"] / "review2" / "report.html").read_text()
    study_level = review["subgroups"]["level"]
    assert study_level["figures"]["n"] == 6 and all(u["unit"].startswith("s-") for u in study_level["units"])
    # logged on the version's run and linked from the version
    version = client.get_model_version(NAME, "2")
    assert version.tags["review.report"] == f"runs:/{version.run_id}/review/v2/report.html"
    assert "Review: [report](#/experiments/" in version.description and "Best model of training run" in version.description
    page = f"/runs/{version.run_id}/artifacts/review/v2/report.html)"  # a link the MLflow UI opens
    assert page in version.description and version.tags["review.page"].endswith(page[:-1])
    logged = client.download_artifacts(version.run_id, "review/v2/report.html", str(flow["root"] / "dl"))
    assert Path(logged).read_text() == (flow["root"] / "review2" / "report.html").read_text()


def test_report_is_self_contained(flow: Any) -> None:
    text = (flow["root"] / "review2" / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//)""", text) and "<script" not in text
    images = re.findall(r"src='data:image/png;base64,([^']+)'", text)
    gallery = flow["review2"]["gallery"]
    shown = sum(len(gallery[k]) for k in ("true_positive", "false_negative", "false_positive"))
    assert shown > 0 and len(images) >= 2 + shown  # ROC, calibration (+ confusion) and every gallery frame
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as png:
            assert png.size[0] > 20
    for kind in ("true_positive", "false_negative", "false_positive"):
        for frame in gallery[kind]:
            assert frame["ref"] in text and re.fullmatch(r"f-[0-9a-f]{16}", frame["ref"])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_a_browser(flow: Any) -> None:
    shot = flow["root"] / "report.png"
    subprocess.run(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--window-size=1500,2400", "--virtual-time-budget=15000", f"--screenshot={shot}",
         (flow["root"] / "review2" / "report.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1500)
    coloured = np.abs(pixels.astype(int) - pixels.mean(axis=2, keepdims=True)).max(axis=2) > 40
    assert (pixels < 200).any(axis=2).mean() > 0.02 and coloured.mean() > 0.005  # text, plots and overlays drawn


def test_promotion_gate(flow: Any) -> None:
    client, uri = flow["client"], flow["uri"]
    assert flow["promoted"]["decision"] == "promoted"
    tags = client.get_model_version(NAME, "2").tags
    assert tags["promotion.champion.reviewer"] == "dr-a" and tags["promotion.champion.decision"] == "promoted"
    assert len(tags["promotion.champion.gate_sha256"]) == 64 and tags["promotion.champion.rule.0"].endswith("pass")
    with pytest.raises(PromotionRefused, match="version 1: its model file has no finite operating threshold"):
        promote(NAME, "1", "production", flow["gate"], "dr-b", override=True, reason="pilot", tracking_uri=uri)
    strict = flow["root"] / "strict.yaml"
    strict.write_text(yaml.safe_dump({"rules": ["test_auc >= 1.01", "test_tpr_at_fpr_0.001 >= 0.60"]}))
    code = main(["promote", "--model", NAME, "--version", "2", "--alias", "production", "--gate", str(strict),
                 "--reviewer", "dr-b", "--tracking-uri", uri])
    assert code == 3
    assert "production" not in client.get_registered_model(NAME).aliases
    tags = client.get_model_version(NAME, "2").tags
    assert tags["promotion.production.decision"] == "refused" and "FAIL" in tags["promotion.production.rule.0"]
    with pytest.raises(ValueError, match="--reason"):
        promote(NAME, "2", "production", strict, "dr-b", override=True, tracking_uri=uri)
    result = promote(NAME, "2", "production", strict, "dr-b", override=True, reason="pilot study", tracking_uri=uri)
    assert result["decision"] == "overridden"
    tags = client.get_model_version(NAME, "2").tags
    assert tags["promotion.production.override_reason"] == "pilot study"
    assert str(client.get_registered_model(NAME).aliases["production"]) == "2"
    # a version without a review of its own is never promoted
    v1 = client.get_model_version(NAME, "1")
    unreviewed = client.create_model_version(NAME, v1.source, run_id=v1.run_id)
    with pytest.raises(PromotionRefused, match="no review report"):
        promote(NAME, str(unreviewed.version), "champion", flow["gate"], "dr-b", tracking_uri=uri)


@pytest.fixture(scope="module")
def package(flow: Any) -> Any:
    root = flow["root"]
    client, uri = flow["client"], flow["uri"]
    if str(client.get_registered_model(NAME).aliases.get("champion")) != "2":
        promote(NAME, "2", "champion", flow["gate"], "dr-b", override=True, reason="test order", tracking_uri=uri)
    private, public = make_keys(root, "signer")
    zip_path = root / "partner_bundle.zip"
    manifest = build_package(f"{NAME}@champion", zip_path, tracking_uri=uri, sign_key=private)
    return {"zip": zip_path, "manifest": manifest, "public": public, "private": private}


def test_a_version_without_an_operating_threshold_is_not_packaged(flow: Any, tmp_path: Path) -> None:
    checkpoint = torch.load(flow["root"] / "run1" / "models" / "model.pt", weights_only=False, map_location="cpu")
    assert checkpoint["operating_point"]["threshold"] is None  # the premise: seed 1 reaches no TPR at 0.1 % FPR
    with pytest.raises(ValueError, match="version 1: its model file has no finite operating threshold"):
        build_package(f"{NAME}@1", tmp_path / "p.zip", tracking_uri=flow["uri"], include_wheel=False, unpromoted=True)
    assert not (tmp_path / "p.zip").exists()


def test_package_contents_and_verification(flow: Any, package: Any) -> None:
    zip_path, public = package["zip"], package["public"]
    names = set(zipfile.ZipFile(zip_path).namelist())
    expected = {"configs/inference.yaml", "configs/evaluate.yaml", "configs/train.yaml", "configs/metadata.json",
                "configs/logging.conf", "models/model.pt", "models/model.ts", "docs/README.md", "docs/model_card.md",
                "docs/review_report.html", "requirements.txt", "LICENSE", "manifest.json", "manifest.sig"}
    assert expected <= names and any(re.fullmatch(r"wheels/medgain-.*\.whl", n) for n in names)
    manifest = package["manifest"]
    assert manifest["version"] == "2" and manifest["alias"] == "champion" and "torch" in manifest["dependencies"]
    meta = json.loads(zipfile.ZipFile(zip_path).read("configs/metadata.json"))
    assert meta["version"] == "0.2.1" and "version 2 (champion)" in meta["changelog"]["0.2.1"]
    weights = torch.load(io.BytesIO(zipfile.ZipFile(zip_path).read("models/model.pt")), weights_only=True)
    assert weights["model_spec"]["image_size"] == [32, 32] and set(weights) == {
        "model", "model_spec", "operating_point", "epoch", "provenance"}
    scripted = torch.jit.load(io.BytesIO(zipfile.ZipFile(zip_path).read("models/model.ts")))
    assert scripted(torch.rand(2, 3, 32, 32)).shape == (2, 2)
    assert verify_package(zip_path, public)["model"] == NAME
    assert main(["verify", str(zip_path), "--public-key", str(public)]) == 0
    _, other = make_keys(flow["root"], "other")
    with pytest.raises(PackageVerificationError, match="does not verify"):
        verify_package(zip_path, other)
    # one byte changed in any file is refused, naming that file (the manifest and its signature: the signature)
    with zipfile.ZipFile(zip_path) as archive:
        members = {i.filename: archive.read(i) for i in archive.infolist()}
    for target in sorted(members):
        tampered = flow["root"] / "tampered.zip"
        with zipfile.ZipFile(tampered, "w") as archive:
            for name, data in members.items():
                if name == target:
                    data = bytes([data[0] ^ 1]) + data[1:]
                archive.writestr(name, data)
        with pytest.raises(PackageVerificationError, match=re.escape(target)):
            verify_package(tampered, public)
    assert main(["verify", str(tampered), "--public-key", str(public)]) == 1


def test_standalone_inference_from_the_package(flow: Any, package: Any, tmp_path: Path) -> None:
    # a fresh folder outside the repository: the unpacked package and a few frames, no MLflow store, no datalist
    unpacked, frames = tmp_path / "partner", tmp_path / "frames"
    zipfile.ZipFile(package["zip"]).extractall(unpacked)
    frames.mkdir()
    for item in json.loads(flow["datalist"].read_text())["test"][:4]:
        shutil.copy(flow["datalist"].parent / item["image"], frames / f"frame_{len(list(frames.iterdir()))}.dcm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW")} | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml",
               "--meta_file", "configs/metadata.json", "--input_dir", str(frames), "--output_dir",
               str(tmp_path / "out"), "--num_workers", "0"]
    result = subprocess.run(command, cwd=unpacked, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(unpacked.glob("**/mlflow.db")) and not (unpacked / "mlruns").exists()
    # the bundle's own inference with the registered model file gives identical predictions
    client = flow["client"]
    champion = client.get_model_version_by_alias(NAME, "champion")
    checkpoint = client.download_artifacts(champion.run_id, "checkpoint/model.pt", str(tmp_path / "ckpt"))
    monai_run("inference", meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.yaml"),
              bundle_root=str(tmp_path / "own"), input_dir=str(frames), output_dir=str(tmp_path / "own_out"),
              checkpoint=checkpoint, num_workers=0)
    with open(tmp_path / "out" / "predictions.csv") as f:
        packaged = list(csv.DictReader(f))
    with open(tmp_path / "own_out" / "predictions.csv") as f:
        own = list(csv.DictReader(f))
    assert len(packaged) == 4 and packaged == own
    # a changed file in the unpacked package: `medgain infer` (the partner's command) refuses to run it
    config = unpacked / "configs" / "train.yaml"
    config.write_text(config.read_text() + "\n# edited\n")
    with pytest.raises(PackageVerificationError, match="configs/train.yaml holds"):
        run_partner_inference(unpacked, frames, tmp_path / "refused", public_key=package["public"], num_workers=0)
    assert not (tmp_path / "refused").exists()


def test_no_identifier_leaves_the_hospital(flow: Any, package: Any) -> None:
    planted = identifiers()
    # the scanner finds what was planted where it is (the data) ...
    data_hits = {needle for _, needle in scan_for_identifiers([flow["datalist"].parent], planted)}
    assert data_hits == planted
    # ... and finds none of it in the MLflow store (database + artifacts), the review reports or the package
    locations = store_locations(flow["uri"])
    assert len(locations) == 2 and locations[1] == flow["root"] / "artifacts"
    reports = [flow["root"] / r / n for r in ("review1", "review2") for n in ("report.html", "review.json")]
    assert scan_for_identifiers([*locations, *reports, package["zip"]], planted) == []
    # frames are named by their salted pseudonym in what MLflow holds
    client = flow["client"]
    evaluations = [r for r in client.search_runs([client.get_experiment_by_name(NAME).experiment_id])
                   if r.info.run_name.startswith("evaluate-")]
    logged = client.download_artifacts(evaluations[0].info.run_id, "predictions.csv", str(flow["root"] / "dl_pred"))
    with open(logged) as f:
        refs = [row["ref"] for row in csv.DictReader(f)]
    test_items = json.loads(flow["datalist"].read_text())["test"]
    assert sorted(refs) == sorted(frame_ref(flow["datalist"].parent / i["image"], 0) for i in test_items)
