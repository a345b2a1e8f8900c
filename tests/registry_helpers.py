"""Shared pieces of the registry tests: a tiny synthetic capsule set whose DICOM headers and file names carry
planted patient identifiers, and in-process training of the capsule bundle into a given MLflow store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pydicom
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from monai.bundle import run as bundle_run

from medgain.demo import CAPSULE_BUNDLE
from medgain.synth.capsule import make_capsule_dataset
from medgain.tracking.store import prepare_store

#: what a hospital export carries and must never leave it
PLANTED = {
    "PatientName": "QUIRKSBY^ELVIRA",
    "PatientID": "MRN8812345",
    "PatientBirthDate": "19610412",
    "AccessionNumber": "ACC99887766",
    "InstitutionName": "StElsewhereHospital",
}
PATIENT_FOLDER = "QUIRKSBY_ELVIRA_MRN8812345"
TINY = {"image_size": 32, "batch_size": 8, "num_workers": 0, "network": "small_cnn", "max_epochs": 3}
CONFIGS = CAPSULE_BUNDLE / "configs"


@contextmanager
def registry_env(salt: str) -> Iterator[None]:
    """A fixed pseudonym salt, no ``MLFLOW_TRACKING_URI`` from the calling shell and one torch thread; the
    environment is restored afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDGAIN_PHI_SALT", salt)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        torch.set_num_threads(1)
        yield


def phi_dataset(root: Path, n_frames: int = 60) -> Path:
    """A DICOM capsule set with identifiers in the headers, the folder and file names, and the study ids;
    returns the datalist path."""
    datalist = make_capsule_dataset(
        root, n_frames, seed=1, size=32, prevalence=0.35, dicom=True, frames_per_study=3, split_fractions=(0.5, 0.2, 0.3)
    )
    content = json.loads(datalist.read_text())
    folder = root / PATIENT_FOLDER
    folder.mkdir()
    for items in content.values():
        for item in items:
            source = root / item["image"]
            ds = pydicom.dcmread(source)
            for key, value in PLANTED.items():
                setattr(ds, key, value)
            name = f"{PATIENT_FOLDER}_{source.stem}.dcm"
            ds.save_as(folder / name, enforce_file_format=True)
            source.unlink()
            item["image"] = f"{PATIENT_FOLDER}/{name}"
            item["study"] = f"{PLANTED['PatientID']}-{item['study']}"
    datalist.write_text(json.dumps(content, indent=1))
    return datalist


def identifiers() -> set[str]:
    """Every planted identifier, as it would be searched for."""
    return {*PLANTED.values(), "QUIRKSBY", "ELVIRA", PATIENT_FOLDER}


def make_store(uri: str, artifacts: Path) -> None:
    """Create the bundle's experiment with its artifacts under ``artifacts`` (not the working directory)."""
    prepare_store(uri)  # the "Default" experiment's artifacts beside the store, not in the working directory
    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name("capsule_endoscopy_gain") is None:
        client.create_experiment("capsule_endoscopy_gain", artifact_location=artifacts.as_uri())


def train(root: Path, datalist: Path, uri: str, seed: int) -> None:
    """One tiny epoch of the capsule bundle, in this process, registered in ``uri``."""
    bundle_run(
        "training",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "train.yaml"),
        bundle_root=str(root),
        dataset_dir=str(datalist.parent),
        tracking_uri=uri,
        seed=seed,
        **TINY,
    )


def make_keys(folder: Path, stem: str) -> tuple[Path, Path]:
    """A fresh Ed25519 key pair as ``<stem>.pem`` and ``<stem>.pub.pem`` in ``folder``."""
    key = Ed25519PrivateKey.generate()
    private, public = folder / f"{stem}.pem", folder / f"{stem}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public
