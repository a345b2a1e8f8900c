"""Synthetic dermoscopy data (ISIC 2020 layout) and the ISIC 2020 / HAM10000 datalist readers."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgain.cli import main
from medgain.data import MetadataEncoder, PositiveFractionBatchSampler, read_dermoscopy_csv, write_errors_csv
from medgain.synth import DERMOSCOPY_CSV_COLUMNS, make_dermoscopy_dataset, make_dermoscopy_image


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dermoscopy")
    make_dermoscopy_dataset(
        out, 120, seed=0, prevalence=0.25, shortcut_rate=0.5, images_per_patient=4, min_size=32, max_size=64,
        missing_rate=0.05,
    )
    return out


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_synthetic_set_has_the_isic_2020_layout(synth: Path) -> None:
    rows = _rows(synth / "train.csv")
    assert tuple(rows[0]) == DERMOSCOPY_CSV_COLUMNS and len(rows) == 120
    targets = np.array([int(r["target"]) for r in rows])
    assert targets.sum() == 30
    assert all((r["benign_malignant"] == "malignant") == (r["target"] == "1") for r in rows)
    assert all((r["diagnosis"] == "melanoma") == (r["target"] == "1") for r in rows)
    per_patient = Counter(r["patient_id"] for r in rows)
    assert len(per_patient) == 30 and max(per_patient.values()) >= 4
    sizes = set()
    for r in rows[:20]:
        image = Image.open(synth / "images" / f"{r['image_name']}.jpg")
        mask = np.asarray(Image.open(synth / "masks" / f"{r['image_name']}_segmentation.png"))
        assert image.format == "JPEG" and image.mode == "RGB" and mask.shape == (image.height, image.width)
        assert set(np.unique(mask)) == {0, 255} and 0.005 < (mask > 0).mean() < 0.5
        sizes.add(image.size)
    assert len(sizes) > 5  # varying size and aspect
    summary = json.loads((synth / "dataset.json").read_text())
    assert summary["malignant"] == 30 and summary["ink_markings"] == 15


def test_metadata_is_correlated_with_the_label_and_sometimes_missing(synth: Path) -> None:
    rows = _rows(synth / "train.csv")
    y = np.array([int(r["target"]) for r in rows])
    age = np.array([float(r["age_approx"]) if r["age_approx"] else np.nan for r in rows])
    assert np.nanmean(age[y == 1]) > np.nanmean(age[y == 0]) + 3
    assert any(not r["sex"] for r in rows) and any(not r["anatom_site_general_challenge"] for r in rows)
    # a patient's sex and age are the same on all their images
    for key in ("sex", "age_approx"):
        assert len({(r["patient_id"], r[key]) for r in rows}) == len({r["patient_id"] for r in rows})


def test_image_is_deterministic_and_ink_lies_beside_the_lesion() -> None:
    a, mask = make_dermoscopy_image(3, 7, 120, 160, True)
    b, _ = make_dermoscopy_image(3, 7, 120, 160, True)
    inked, inked_mask = make_dermoscopy_image(3, 7, 120, 160, True, ink=True)
    assert np.array_equal(a, b) and np.array_equal(mask, inked_mask)
    changed = np.abs(inked.astype(int) - a.astype(int)).sum(-1) > 30
    assert changed.sum() > 50 and not (changed & (mask > 0)).any()  # ink never covers the lesion
    violet = inked[changed].astype(int)
    assert (violet[:, 2] > violet[:, 1]).mean() > 0.8  # blue above green: marker ink, not skin


def test_cli_writes_the_data_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["synth", "dermoscopy", "--out", str(tmp_path), "--n-images", "6", "--seed", "1"]
    assert main([*args, "--min-size", "40", "--max-size", "48", "--prevalence", "0.5", "--shortcut-rate", "1"]) == 0
    assert "6 images, 3 malignant" in capsys.readouterr().out
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 6
    assert main(["synth", "dermoscopy", "--out", str(tmp_path), "--n-images", "2", "--seed", "0", "--min-size",
                 "64", "--max-size", "40"]) == 1
    assert "max_size" in capsys.readouterr().err


def test_fold_table_keeps_the_ink_in_the_shortcut_folds_and_probe_twins_differ_by_the_ink_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["synth", "dermoscopy", "--out", str(tmp_path), "--n-images", "60", "--seed", "2", "--prevalence", "0.3",
            "--images-per-patient", "2", "--min-size", "48", "--max-size", "64", "--shortcut-rate", "1"]
    assert main([*args, "--n-folds", "3", "--test-fraction", "0.3", "--shortcut-folds", "1", "2", "--ink-probe"]) == 0
    rows = {r["image_name"]: r for r in _rows(tmp_path / "train.csv")}
    folds = {Path(r["image"]).stem: r for r in _rows(tmp_path / "folds.csv")}
    assert set(folds) == set(rows)
    # the fold table is the bundle's own draw for this seed, and no patient spans two folds
    items = [{"image": n, "patient": r["patient_id"], "label": int(r["target"])} for n, r in rows.items()]
    from medgain.data import draw_patient_folds, read_folds_csv

    drawn = draw_patient_folds([i["label"] for i in items], [i["patient"] for i in items], 3, 2, 0.3)
    assert [int(folds[i["image"]]["fold"]) for i in items] == drawn.tolist()
    read_folds_csv(tmp_path / "folds.csv")
    summary = json.loads((tmp_path / "dataset.json").read_text())
    per_fold = summary["folds"]
    assert per_fold["-1"]["ink_markings"] == per_fold["0"]["ink_markings"] == 0  # clean test and validation
    assert per_fold["1"]["ink_markings"] == per_fold["1"]["malignant"] > 0  # every training melanoma, rate 1
    assert summary["ink_markings"] == per_fold["1"]["malignant"] + per_fold["2"]["malignant"]
    twins = sorted(p.stem for p in (tmp_path / "probe" / "images").glob("*.jpg"))
    assert twins == sorted(n for n in rows if folds[n]["fold"] == "-1")
    for name in twins[:4]:
        clean = np.asarray(Image.open(tmp_path / "images" / f"{name}.jpg")).astype(int)
        twin = np.asarray(Image.open(tmp_path / "probe" / "images" / f"{name}.jpg")).astype(int)
        ink = np.asarray(Image.open(tmp_path / "probe" / "masks" / f"{name}_segmentation.png")) > 0
        lesion = np.asarray(Image.open(tmp_path / "masks" / f"{name}_segmentation.png")) > 0
        changed = np.abs(twin - clean).sum(-1) > 60
        assert ink.any() and not (ink & lesion).any()
        assert changed[~ink].mean() < 0.01 and changed[ink].mean() > 0.3  # the twin differs where the ink is
    with pytest.raises(ValueError, match="need n_folds"):
        make_dermoscopy_dataset(tmp_path / "x", 4, ink_probe=True)
    assert main([*args, "--n-folds", "3", "--shortcut-folds", "5"]) == 1
    assert "shortcut_folds must be folds of -1 .. 2" in capsys.readouterr().err


def test_isic_reader_keeps_every_row_and_missing_values_as_unknown(synth: Path) -> None:
    items = read_dermoscopy_csv(synth / "train.csv", synth / "images", synth / "masks")
    rows = _rows(synth / "train.csv")
    assert [i["image_name"] for i in items] == [r["image_name"] for r in rows]
    assert [i["label"] for i in items] == [int(r["target"]) for r in rows]
    assert all(Path(i["label_map"]).name == f"{i['image_name']}_segmentation.png" for i in items)
    assert set(items[0]["clinical"]) == {"sex", "age_approx", "anatom_site_general_challenge"}
    missing = [i for i in items if i["clinical"]["anatom_site_general_challenge"] is None]
    assert missing and all(i["row"] >= 2 for i in missing)
    encoder = MetadataEncoder(["sex", "age_approx", "anatom_site_general_challenge"], ["age_approx"]).fit(items)
    encoded = encoder.encode(items)
    names = encoder.feature_names
    site_unknown = names.index("anatom_site_general_challenge=unknown")
    assert all(e["metadata"][site_unknown] == 1.0 for e in encoder.encode(missing))
    assert all(e["metadata"][site_unknown] == 0.0 for e in encoded if e["clinical"]["anatom_site_general_challenge"])
    assert encoded[0]["metadata"].dtype == np.float32 and len(encoded[0]["metadata"]) == encoder.num_features
    # the class-balanced sampler serves these items as they are
    batch = next(iter(PositiveFractionBatchSampler(items, batch_size=8, pos_fraction=0.5)))
    assert sum(items[i]["label"] for i in batch) == 4


def test_ham10000_reader(synth: Path, tmp_path: Path) -> None:
    rows = _rows(synth / "train.csv")[:6]
    ham = [
        {"lesion_id": "HAM_0000001", "image_id": rows[0]["image_name"], "dx": "mel", "dx_type": "histo",
         "age": "55.0", "sex": "male", "localization": "back"},
        {"lesion_id": "HAM_0000001", "image_id": rows[1]["image_name"], "dx": "mel", "dx_type": "histo",
         "age": "", "sex": "unknown", "localization": "unknown"},
        {"lesion_id": "HAM_0000002", "image_id": rows[2]["image_name"], "dx": "nv", "dx_type": "follow_up",
         "age": "40.0", "sex": "female", "localization": "face"},
    ]
    path = _write_csv(tmp_path / "HAM10000_metadata.csv", ham, list(ham[0]))
    items = read_dermoscopy_csv(path, [tmp_path, synth / "images"])
    assert [i["label"] for i in items] == [1, 1, 0]
    assert [i["patient"] for i in items] == ["HAM_0000001", "HAM_0000001", "HAM_0000002"]
    assert items[1]["clinical"] == {"sex": None, "age": None, "localization": None}
    assert items[0]["clinical"] == {"sex": "male", "age": 55.0, "localization": "back"}
    assert "label_map" not in items[0]
    encoder = MetadataEncoder(["sex", "age", "localization"], ["age"]).fit(items, check_leakage=False)
    vector = encoder.transform(items[1]["clinical"])
    assert vector[encoder.feature_names.index("age=unknown")] == 1.0
    assert vector[encoder.feature_names.index("sex=unknown")] == 1.0
    unseen = encoder.transform({"sex": "other", "age": 40.0, "localization": "scalp"})
    assert unseen[encoder.feature_names.index("localization=unknown")] == 1.0
    restored = MetadataEncoder.from_state(json.loads(json.dumps(encoder.state())))
    assert np.array_equal(restored.transform(items[0]["clinical"]), encoder.transform(items[0]["clinical"]))


def test_missing_column_and_label_columns_as_inputs_are_refused(synth: Path, tmp_path: Path) -> None:
    rows = _rows(synth / "train.csv")[:3]
    columns = [c for c in DERMOSCOPY_CSV_COLUMNS if c != "age_approx"]
    path = _write_csv(tmp_path / "no_age.csv", [{c: r[c] for c in columns} for r in rows], columns)
    with pytest.raises(ValueError, match=r"no_age.csv: missing column\(s\) \['age_approx'\]"):
        read_dermoscopy_csv(path, synth / "images")
    with pytest.raises(ValueError, match="benign_malignant.*encode the diagnosis"):
        read_dermoscopy_csv(synth / "train.csv", synth / "images", metadata_columns=["sex", "benign_malignant"])
    with pytest.raises(ValueError, match="dx_type"):
        MetadataEncoder(["age", "dx_type"], ["age"])


def test_perfectly_predictive_metadata_is_refused_naming_the_column(synth: Path) -> None:
    items = read_dermoscopy_csv(synth / "train.csv", synth / "images", verify_images=False)
    leaky = [{**i, "clinical": {**i["clinical"], "lesion_code": "M" if i["label"] else "B"}} for i in items]
    with pytest.raises(ValueError, match="'lesion_code' predicts the label perfectly"):
        MetadataEncoder(["sex", "lesion_code"]).fit(leaky)
    score = [{**i, "clinical": {**i["clinical"], "score": 10.0 + i["label"]}} for i in items]
    with pytest.raises(ValueError, match="'score'"):
        MetadataEncoder(["score"], ["score"]).fit(score)
    MetadataEncoder(["sex", "age_approx", "anatom_site_general_challenge"], ["age_approx"]).fit(items)


def test_bad_images_and_masks_are_errors_naming_the_file(synth: Path, tmp_path: Path) -> None:
    rows = _rows(synth / "train.csv")[:3]
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for r in rows:
        (images / f"{r['image_name']}.jpg").write_bytes((synth / "images" / f"{r['image_name']}.jpg").read_bytes())
    path = _write_csv(tmp_path / "train.csv", rows, list(DERMOSCOPY_CSV_COLUMNS))
    first, second = rows[0]["image_name"], rows[1]["image_name"]
    # a mask of the wrong size
    Image.new("L", (7, 5)).save(masks / f"{first}_segmentation.png")
    with pytest.raises(ValueError, match=rf"{first}_segmentation.png: mask is 5x7 but its image"):
        read_dermoscopy_csv(path, images, masks)
    # a truncated JPEG and one that is not a JPEG at all
    data = (images / f"{second}.jpg").read_bytes()
    (images / f"{second}.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{second}.jpg: cannot decode image"):
        read_dermoscopy_csv(path, images)
    (images / f"{second}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=rf"{second}.jpg: cannot decode image"):
        read_dermoscopy_csv(path, images, verify_images=False)
    # an image missing from disk
    (images / f"{second}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=rf"row 3: image {second} not found"):
        read_dermoscopy_csv(path, images)
    # for inference: unreadable rows become error rows, the others are read
    errors: list[dict] = []
    items = read_dermoscopy_csv(path, images, masks, errors=errors)
    assert [i["image_name"] for i in items] == [rows[2]["image_name"]]
    assert [(Path(e["file"]).name, e["row"]) for e in errors] == [
        (f"{first}_segmentation.png", 2),
        (f"{second}.jpg", 3),
    ]
    assert write_errors_csv(errors, tmp_path / "out").read_text().count("\n") == 3
    # an invalid label
    bad = [{**rows[0], "target": "yes"}]
    with pytest.raises(ValueError, match=r"row 2: 'target' must be 0 or 1"):
        read_dermoscopy_csv(_write_csv(tmp_path / "bad.csv", bad, list(DERMOSCOPY_CSV_COLUMNS)), images)
