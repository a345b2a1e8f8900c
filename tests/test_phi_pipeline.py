"""No patient identifier leaves the site through the attention-crop pipeline's own MLflow writes (issue 19,
section 3): a tiny dermoscopy set whose folder, file names and patient ids look like patient identifiers goes
through the smallest pipeline (2 folds, 1 epoch, 32-pixel images); the fold and box tables, crops and overlays
reach MLflow under salted pseudonyms, and the whole store holds none of the identifiers, while the local outputs
keep the real names and the local pseudonym table maps back."""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from medgain.data.phi import frame_ref, study_ref
from medgain.pipeline import run_attention_crop
from medgain.registry import scan_for_identifiers, store_locations
from medgain.synth.dermoscopy import make_dermoscopy_dataset

REPO = Path(__file__).resolve().parents[1]
PERSON = "DOE^JANE"
MRN = "MRN1234567"
PATIENT_PREFIX = "MRN88"  # every patient id is MRN88<5 digits>


def _phi_dermoscopy(folder: Path) -> None:
    """The synthetic set with each image renamed ``MRN1234567_<name>`` (masks too) and each patient id replaced
    by an MRN-like one, in a folder named after a patient."""
    make_dermoscopy_dataset(folder, 36, seed=5, prevalence=0.35, images_per_patient=3, min_size=40, max_size=96)
    table = folder / "train.csv"
    with table.open(newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = list(reader.fieldnames or []), list(reader)
    for row in rows:
        name = row["image_name"]
        row["image_name"] = f"{MRN}_{name}"
        (folder / "images" / f"{name}.jpg").rename(folder / "images" / f"{MRN}_{name}.jpg")
        mask = folder / "masks" / f"{name}_segmentation.png"
        if mask.is_file():
            mask.rename(folder / "masks" / f"{MRN}_{name}_segmentation.png")
        row["patient_id"] = PATIENT_PREFIX + row["patient_id"].split("_")[-1]
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def phi_pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("phi_pipeline")
    data = root / f"{PERSON}_{MRN}"
    _phi_dermoscopy(data)
    config = {
        "n_folds": 2,
        "test_fraction": 0.0,
        "bundle": str(REPO / "bundles" / "dermoscopy_gain"),
        "common": {"network": "small_cnn", "num_workers": 0, "batch_size": 8, "max_epochs": 1, "tta_views": 1},
        "full": {"image_size": 32},
        "crop": {"size": 32, "num_overlays": 3, "min_size": 16},
        "ensemble": {"n_bootstrap": 20},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDGAIN_PHI_SALT", "phi-pipeline")
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        torch.set_num_threads(1)
        summary = run_attention_crop(path, dataset_dir=str(data), output_dir=str(root / "out"))
    return root, summary


def test_the_mlflow_store_holds_no_identifier(phi_pipeline: tuple[Path, dict]) -> None:
    root, summary = phi_pipeline
    needles = [PERSON, MRN, PATIENT_PREFIX]  # (short parts like "DOE" would match by chance in binary files)
    locations = store_locations(summary["tracking_uri"])
    assert any(p.is_dir() for p in locations)  # the artifact folder is scanned too
    assert scan_for_identifiers(locations, needles) == []
    # the local outputs keep the real names (and the scan would have seen them)
    local = scan_for_identifiers([root / "out" / "folds.csv", root / "out" / "crops" / "boxes.csv"], needles)
    assert {needle for _, needle in local} == set(needles)


def test_tables_crops_and_overlays_are_logged_by_pseudonym(
    phi_pipeline: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, summary = phi_pipeline
    monkeypatch.setenv("MEDGAIN_PHI_SALT", "phi-pipeline")
    out = root / "out"
    client = mlflow.MlflowClient(summary["tracking_uri"])
    with (out / "crops" / "boxes.csv").open(newline="") as f:
        boxes = list(csv.DictReader(f))
    refs = {frame_ref(row["image"]): row for row in boxes}
    crops_run = next(r for r in client.search_runs([client.get_experiment_by_name("attention_crop").experiment_id])
                     if r.data.tags.get("pipeline_stage") == "crops").info.run_id
    logged = Path(client.download_artifacts(crops_run, "crops", str(root / "download")))
    with (logged / "boxes.csv").open(newline="") as f:
        shared = list(csv.DictReader(f))
    assert "crop" not in shared[0] and "image" not in shared[0]
    assert {row["ref"] for row in shared} == set(refs)
    for row in shared:
        real = refs[row["ref"]]
        assert row["patient"] == study_ref(real["patient"])
        kept = ("label", "y0", "x0", "y1", "x1", "height", "width")
        assert [row[k] for k in kept] == [real[k] for k in kept]
    assert {p.name for p in (logged / "crops").iterdir()} == {f"{ref}.png" for ref in refs}
    overlays = {p.name for p in (logged / "overlays").iterdir()}
    assert len(overlays) == 3 and overlays <= {f"{ref}.png" for ref in refs}
    folds = Path(client.download_artifacts(summary["parent_run_id"], "folds.csv", str(root / "download")))
    with folds.open(newline="") as f:
        assert {row["ref"] for row in csv.DictReader(f)} == set(refs)
    # the local outputs keep the real names; the local pseudonym table maps every pseudonym back
    assert all(Path(row["image"]).name.startswith(MRN) for row in boxes)
    with (out / "pseudonym_map.csv").open(newline="") as f:
        names = {row["ref"]: row["name"] for row in csv.DictReader(f)}
    assert {ref: names[ref] for ref in refs} == {ref: row["image"] for ref, row in refs.items()}
    assert {names[study_ref(row["patient"])] for row in boxes} == {row["patient"] for row in boxes}
