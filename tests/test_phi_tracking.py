"""No patient identifier leaves the site through tracking (issue 19, section 3): the error tag of a failed run,
descriptions, notes, warnings logged as tags and artifact names reach MLflow with their paths, data file names
and person names as salted pseudonyms, while the local log keeps the real names. End to end: identifiers planted
in DICOM headers, folder and file names, then train (and a failing train), evaluate, review, promote, package
and the partner's `medgain infer`; the whole MLflow store, the review report, the package zip and the partner's
shareable copy hold none of them."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pydicom
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from monai.bundle import run as bundle_run
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from registry_helpers import (
    CONFIGS,
    PATIENT_FOLDER,
    TINY,
    identifiers,
    make_store,
    phi_dataset,
    registry_env,
    train,
)

from medgain.data.phi import frame_ref, pseudonym, pseudonymise_text, study_ref
from medgain.handlers.failure import TrainingFailureHandler
from medgain.partner import run_partner_inference
from medgain.registry import build_package, promote, review_model, scan_for_identifiers, store_locations
from medgain.tracking import tracking_artifact_path
from medgain.tracking.delivery import _send_artifact

NAME = "capsule_endoscopy_gain"
PERSON = "DOE^JANE"
MRN = "MRN1234567"
BAD_FOLDER = f"{PERSON}_{MRN}"
BAD_NAME = f"{MRN}_allnan.dcm"


def test_free_text_leaves_with_pseudonyms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGAIN_PHI_SALT", "phi-text")
    path = f"/data/{BAD_FOLDER}/{BAD_NAME}"
    message = f"ValueError: {path}: frame 0 holds non-finite pixel values (4 NaN, 0 infinite)."
    shared = pseudonymise_text(message)
    assert shared == f"ValueError: {frame_ref(path)}: frame 0 holds non-finite pixel values (4 NaN, 0 infinite)."
    assert pseudonymise_text(shared) == shared  # pseudonyms are kept
    assert pseudonymise_text(f"reviewed '{BAD_NAME}' of {PERSON}, folder /data/{BAD_FOLDER};") == (
        f"reviewed '{frame_ref(BAD_NAME)}' of {study_ref(PERSON)}, folder {pseudonym(f'/data/{BAD_FOLDER}', 'd')};"
    )
    for kept in ("Review: runs:/0a1b/review/v2/report.html (test split of data 3f2a, 2026-12-07T03:00:00Z)",
                 "TPR 0/12 at FPR <= 0.001; see http://127.0.0.1:5000/#/experiments/1", "roc_test.png 0.93"):
        assert pseudonymise_text(kept) == kept
    assert "DOE" not in pseudonymise_text(r"C:\data\DOE JANE\x.png sqlite:////srv/DOE/mlflow.db")
    assert tracking_artifact_path("review/v2/report.html") == "review/v2/report.html"
    assert tracking_artifact_path(f"crops/{BAD_FOLDER}/{BAD_NAME}") == (
        f"crops/{pseudonymise_text(BAD_FOLDER)}/{frame_ref(BAD_NAME)}"
    )


def test_artifact_names_are_pseudonymised_on_upload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDGAIN_PHI_SALT", "phi-artifacts")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("x", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    folder = tmp_path / "staged" / "overlays"
    (folder / BAD_FOLDER).mkdir(parents=True)
    (folder / BAD_FOLDER / BAD_NAME).write_text("pixels")
    (folder / "summary.csv").write_text("ref\n")
    _send_artifact(client, run_id, folder, f"crops/{PERSON}")
    _send_artifact(client, run_id, folder / "summary.csv", None)
    logged = sorted(str(p.relative_to(tmp_path / "artifacts")) for p in (tmp_path / "artifacts").rglob("*")
                    if p.is_file())
    person, patient, name = study_ref(PERSON), pseudonymise_text(BAD_FOLDER), frame_ref(BAD_NAME)
    assert logged == sorted([f"{run_id}/artifacts/crops/{person}/{patient}/{name}",
                             f"{run_id}/artifacts/crops/{person}/summary.csv", f"{run_id}/artifacts/summary.csv"])
    assert (folder / BAD_FOLDER / BAD_NAME).is_file()  # the local files keep their names


def test_failure_tag_is_pseudonymised_and_the_local_log_is_not(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MEDGAIN_PHI_SALT", "phi-failure")
    tags: dict[str, str] = {}
    client = SimpleNamespace(set_tag=lambda run, key, value: tags.__setitem__(key, value),
                             set_terminated=lambda run, status: tags.__setitem__("status", status))
    handler = SimpleNamespace(cur_run=SimpleNamespace(info=SimpleNamespace(run_id="r1")), client=client)
    path = f"/data/{BAD_FOLDER}/{BAD_NAME}"
    cause = ValueError(f"{path}: frame 0 holds non-finite pixel values")
    wrapped = RuntimeError("applying transform <LoadFrame>")
    wrapped.__cause__ = cause
    with caplog.at_level(logging.ERROR, logger="medgain.handlers.failure"), pytest.raises(RuntimeError):
        TrainingFailureHandler(mlflow_handler=handler)(SimpleNamespace(), wrapped)
    assert tags == {"error": f"ValueError: {frame_ref(path)}: frame 0 holds non-finite pixel values",
                    "status": "FAILED"}
    assert path in caplog.text and frame_ref(path) in caplog.text


def _nan_dicom(path: Path, size: int) -> None:
    """A float DICOM of NaN pixels whose header names the planted patient."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = PERSON, MRN, "OT"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    ds.FloatPixelData = np.full((size, size), np.nan, np.float32).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _sqlite_dump(db: Path, out: Path) -> Path:
    """The text dump of the MLflow database (what `sqlite3 .dump` shows), to be searched like the rest."""
    with sqlite3.connect(db) as con:
        out.write_text("\n".join(con.iterdump()))
    return out


def test_no_identifier_reaches_tracking_review_or_package(tmp_path: Path) -> None:
    with registry_env("phi-tracking-salt"):
        datalist = phi_dataset(tmp_path / "data")
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        make_store(uri, tmp_path / "artifacts")
        # a failing training: a NaN frame in a patient-named folder, first in the training split
        bad_dir = tmp_path / "bad"
        bad_file = bad_dir / BAD_FOLDER / BAD_NAME
        _nan_dicom(bad_file, TINY["image_size"])
        content = json.loads(datalist.read_text())
        for item in (*content["training"], *content["validation"], *content["test"]):
            item["image"] = str(datalist.parent / item["image"])
            for key in ("label_map", "lesion_map"):
                if key in item:
                    item[key] = str(datalist.parent / item[key])
        content["training"][0]["image"] = str(bad_file)
        (bad_dir / "datalist.json").write_text(json.dumps(content))
        with pytest.raises(RuntimeError):  # MONAI's "Failed to evaluate ConfigExpression" over the cause
            bundle_run("training", meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "train.yaml"),
                       bundle_root=str(tmp_path / "failed"), dataset_dir=str(bad_dir), tracking_uri=uri, seed=0,
                       **{**TINY, "max_epochs": 1})
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name(NAME).experiment_id
        failed = [r for r in client.search_runs([experiment]) if r.info.status == "FAILED"]
        assert len(failed) == 1 and frame_ref(bad_file) in failed[0].data.tags["error"]
        assert "non-finite" in failed[0].data.tags["error"]
        # a training that completes (with its test evaluation), its review, promotion and partner package
        train(tmp_path / "run", datalist, uri, seed=0)
        version = str(client.get_registered_model(NAME).latest_versions[0].version)
        review_model(NAME, version, datalist, tmp_path / "review", tracking_uri=uri, n_bootstrap=20, gallery_size=2)
        gate = tmp_path / "gate.yaml"
        gate.write_text(yaml.safe_dump({"rules": ["test_auc >= 0.0"], "not_worse_than": "champion"}))
        promote(NAME, version, "champion", gate, "dr-a", tracking_uri=uri, first_champion=True)
        key = Ed25519PrivateKey.generate()
        private, public = tmp_path / "signer.pem", tmp_path / "signer.pub.pem"
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
        package = tmp_path / "partner.zip"
        build_package(f"{NAME}@champion", package, tracking_uri=uri, include_wheel=False, sign_key=private)
        # the partner scores a folder of its own patient's frames; its local predictions may name them
        result = run_partner_inference(package, datalist.parent / PATIENT_FOLDER, tmp_path / "partner_out",
                                       public_key=public, pseudonymise_outputs=True, num_workers=0)
        assert (tmp_path / "partner_out" / "predictions.csv").is_file()
        assert any(r.info.run_name.startswith("evaluate-") for r in client.search_runs([experiment]))
        planted = identifiers() | {PERSON, MRN, BAD_FOLDER, "allnan"}
        # the planted identifiers are where they were put (headers, folder and file names) ...
        assert {n for _, n in scan_for_identifiers([datalist.parent, bad_dir], planted)} == planted
        # ... and nowhere in the MLflow store (database, its dump, artifacts), the review, the package or what the
        # partner may share back
        locations = store_locations(uri)
        dump = _sqlite_dump(locations[0], tmp_path / "mlflow_dump.sql")
        reports = [tmp_path / "review" / "report.html", tmp_path / "review" / "review.json"]
        shared = [result["shareable"]]
        assert scan_for_identifiers([*locations, dump, *reports, package, *shared], planted) == []
