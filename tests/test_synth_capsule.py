"""Tests of the synthetic capsule-endoscopy generator and the ``medgain synth capsule`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

from medgain.cli import main
from medgain.synth.capsule import LESION_KINDS, SPLITS, make_capsule_dataset, make_capsule_frame

ARGS = {"n_frames": 60, "seed": 3, "size": 64, "prevalence": 0.3, "frames_per_study": 5}


def _items(datalist_path: Path) -> list[dict]:
    datalist = json.loads(datalist_path.read_text())
    assert set(datalist) == set(SPLITS) == {"training", "validation", "test"}
    return [dict(item, split=split) for split, items in datalist.items() for item in items]


def _png(root: Path, rel: str) -> np.ndarray:
    with Image.open(root / rel) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_capsule_dataset(tmp_path_factory.mktemp("capsule"), **ARGS)


def test_deterministic(dataset: Path, tmp_path: Path) -> None:
    make_capsule_dataset(tmp_path, **ARGS)
    files = sorted(p.relative_to(dataset.parent) for p in dataset.parent.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 3 * ARGS["n_frames"] + 2
    for rel in files:
        assert (dataset.parent / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    other = make_capsule_dataset(tmp_path / "other", **{**ARGS, "seed": 4})
    first = _items(dataset)[0]["image"]
    assert (dataset.parent / first).read_bytes() != (other.parent / first).read_bytes()


def test_frames_independent_of_generation_order(dataset: Path) -> None:
    items = _items(dataset)
    for item in (items[-1], items[len(items) // 2], items[0]):  # rendered alone, in reverse order
        study, frame = (int(part[5:]) for part in Path(item["image"]).stem.split("_"))
        image, label_map = make_capsule_frame(ARGS["seed"], study, frame, ARGS["size"], positive=bool(item["label"]))
        np.testing.assert_array_equal(image, _png(dataset.parent, item["image"]))
        np.testing.assert_array_equal(label_map, _png(dataset.parent, item["label_map"]))


def test_splits_disjoint_by_study_and_mixed(dataset: Path) -> None:
    items = _items(dataset)
    assert len(items) == ARGS["n_frames"]
    studies = {split: {i["study"] for i in items if i["split"] == split} for split in SPLITS}
    assert not studies["training"] & studies["validation"]
    assert not studies["training"] & studies["test"]
    assert not studies["validation"] & studies["test"]
    summary = json.loads((dataset.parent / "dataset.json").read_text())
    assert summary["seed"] == ARGS["seed"] and summary["size"] == ARGS["size"]
    for split in studies:
        labels = [i["label"] for i in items if i["split"] == split]
        assert 0 in labels and 1 in labels, split
        assert summary["splits"][split]["frames"] == len(labels)
        assert summary["splits"][split]["positives"] == sum(labels)
    assert len(studies["training"]) > len(studies["validation"])
    for item in items:
        assert not Path(item["image"]).is_absolute() and item["image"].startswith("images/")
        assert item["label_map"] == item["image"].replace("images/", "labels/")
        assert item["shortcut"] is False


def test_prevalence_spread_over_studies(dataset: Path) -> None:
    items = _items(dataset)
    labels = np.array([i["label"] for i in items])
    assert labels.sum() == round(ARGS["n_frames"] * ARGS["prevalence"])
    per_study: dict[str, int] = {}
    for item in items:
        per_study[item["study"]] = per_study.get(item["study"], 0) + item["label"]
    assert len(per_study) == ARGS["n_frames"] // ARGS["frames_per_study"]
    assert set(per_study.values()) <= {1, 2}  # 0.3 * 5 frames = 1.5 positives per study


def test_label_maps_match_labels_and_kinds(dataset: Path) -> None:
    root = dataset.parent
    seen: set[int] = set()
    for item in _items(dataset):
        label_map = _png(root, item["label_map"])
        assert label_map.shape == (ARGS["size"], ARGS["size"]) and label_map.dtype == np.uint8
        kinds = set(np.unique(label_map).tolist()) - {0}
        assert bool(kinds) == (item["label"] == 1), item
        assert kinds == set(item["lesion_kinds"]), item
        assert kinds <= set(LESION_KINDS.values())
        seen |= kinds
    assert len(seen) >= 3


def test_nifti_equals_png_label_map(dataset: Path) -> None:
    root = dataset.parent
    for item in _items(dataset):
        nifti = nib.load(root / item["label_map"].replace(".png", ".nii.gz"))
        np.testing.assert_array_equal(nifti.affine, np.eye(4))
        assert nifti.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(nifti.get_fdata(), _png(root, item["label_map"]))


def test_corners_outside_field_of_view_are_dark(dataset: Path) -> None:
    root = dataset.parent
    c = ARGS["size"] // 10
    for item in _items(dataset):
        image = _png(root, item["image"])
        assert image.shape == (ARGS["size"], ARGS["size"], 3) and image.dtype == np.uint8
        corners = np.stack([image[:c, :c], image[:c, -c:], image[-c:, :c], image[-c:, -c:]])
        assert corners.max() < 20, item["image"]
        assert image[3 * c : -3 * c, 3 * c : -3 * c, 0].mean() > 60, item["image"]  # lit mucosa in the centre


def test_lesions_differ_in_colour_from_surrounding_mucosa() -> None:
    pooled: dict[int, tuple[list, list]] = {k: ([], []) for k in LESION_KINDS.values()}
    for i in range(40):
        image, label = make_capsule_frame(7, i // 4, i % 4, size=64, positive=True)
        assert label.any()
        for kind in np.unique(label[label > 0]):
            lesion = label == kind
            ring = binary_dilation(lesion, iterations=4) & ~binary_dilation(label > 0, iterations=1)
            pooled[int(kind)][0].append(image[lesion].astype(float))
            pooled[int(kind)][1].append(image[ring].astype(float))
    stats = {}
    for kind, (inside, around) in pooled.items():
        assert inside, f"no lesion of kind {kind}"
        inside, around = np.concatenate(inside), np.concatenate(around)
        log_rg = [np.mean(np.log1p(a[:, 0]) - np.log1p(a[:, 1])) for a in (inside, around)]
        stats[kind] = (log_rg, inside.mean(0), around.mean(0))
    for kind in (LESION_KINDS["bleeding"], LESION_KINDS["angioectasia"], LESION_KINDS["polyp"]):
        (lesion_rg, mucosa_rg), _, _ = stats[kind]
        assert lesion_rg > mucosa_rg + 0.2, (kind, lesion_rg, mucosa_rg)
    (lesion_rg, mucosa_rg), lesion_mean, mucosa_mean = stats[LESION_KINDS["ulcer"]]
    assert lesion_rg < mucosa_rg  # pale fibrin centre
    assert lesion_mean[2] > mucosa_mean[2] + 10  # white-yellow, more blue than the orange mucosa


def test_dicom_round_trip(dataset: Path, tmp_path: Path) -> None:
    args = {**ARGS, "n_frames": 10}
    png_list = make_capsule_dataset(tmp_path / "png", **args)
    dcm_list = make_capsule_dataset(tmp_path / "dcm", dicom=True, **args)
    study_uids: dict[str, str] = {}
    for png_item, dcm_item in zip(_items(png_list), _items(dcm_list)):
        assert dcm_item["image"] == png_item["image"].replace(".png", ".dcm")
        ds = pydicom.dcmread(dcm_list.parent / dcm_item["image"])
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.1"
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "ES" and ds.PhotometricInterpretation == "RGB"
        assert (ds.SamplesPerPixel, ds.PlanarConfiguration, ds.BitsAllocated, ds.BitsStored) == (3, 0, 8, 8)
        np.testing.assert_array_equal(ds.pixel_array, _png(png_list.parent, png_item["image"]))
        assert study_uids.setdefault(ds.PatientID, ds.StudyInstanceUID) == ds.StudyInstanceUID
    assert len(set(study_uids.values())) == args["n_frames"] // args["frames_per_study"]
    again = make_capsule_dataset(tmp_path / "dcm2", dicom=True, **args)
    first = _items(dcm_list)[0]["image"]
    assert (dcm_list.parent / first).read_bytes() == (again.parent / first).read_bytes()


def test_shortcut_only_on_positives_and_away_from_lesions(dataset: Path, tmp_path: Path) -> None:
    root = dataset.parent
    with_shortcut = make_capsule_dataset(tmp_path, **{**ARGS, "shortcut_rate": 1.0})
    n_changed = 0
    for plain, marked in zip(_items(dataset), _items(with_shortcut)):
        assert marked["shortcut"] == (plain["label"] == 1)
        before, after = _png(root, plain["image"]), _png(tmp_path, marked["image"])
        changed = (before != after).any(-1)
        assert changed.any() == marked["shortcut"], marked["image"]
        lesion_zone = binary_dilation(_png(root, plain["label_map"]) > 0, iterations=3)
        assert not (changed & lesion_zone).any(), marked["image"]
        n_changed += int(changed.any())
    assert n_changed == round(ARGS["n_frames"] * ARGS["prevalence"])

    half = make_capsule_dataset(tmp_path / "half", **{**ARGS, "shortcut_rate": 0.5})
    items = _items(half)
    flagged = [i for i in items if i["shortcut"]]
    assert all(i["label"] == 1 for i in flagged)
    assert len(flagged) == round(0.5 * sum(i["label"] for i in items))


def test_shortcut_confined_to_the_training_splits(tmp_path: Path) -> None:
    path = make_capsule_dataset(tmp_path, **{**ARGS, "shortcut_rate": 1.0,
                                             "shortcut_splits": ("training", "validation")})
    splits = json.loads(path.read_text())
    for name, items in splits.items():
        positives = [i for i in items if i["label"] == 1]
        assert positives, name
        expected = [name != "test"] * len(positives)
        assert [i["shortcut"] for i in positives] == expected, name
    summary = json.loads((tmp_path / "dataset.json").read_text())
    assert summary["shortcut_splits"] == ["training", "validation"] and summary["splits"]["test"]["shortcuts"] == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prevalence": 1.5}, "prevalence"),
        ({"shortcut_rate": -0.1}, "shortcut_rate"),
        ({"size": 16}, "size"),
        ({"n_frames": 0}, "n_frames"),
        ({"seed": -1}, "seed"),
        ({"split_fractions": (0.5, 0.2, 0.2)}, "split_fractions"),
        ({"shortcut_splits": ("train",)}, "shortcut_splits"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_capsule_dataset(tmp_path, **{**ARGS, **kwargs})
    assert not (tmp_path / "datalist.json").exists()


def test_out_dir_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "not_a_dir"
    target.write_text("x")
    with pytest.raises(ValueError, match="not_a_dir"):
        make_capsule_dataset(target, **ARGS)


def test_cli_help(capsys: pytest.CaptureFixture) -> None:
    for argv in (["--help"], ["synth", "--help"], ["synth", "capsule", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    assert "--n-frames" in capsys.readouterr().out
    result = subprocess.run(
        [sys.executable, "-m", "medgain.cli", "synth", "capsule", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "--shortcut-rate" in result.stdout


def test_cli_writes_datalist(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    argv = ["synth", "capsule", "--out", str(out), "--n-frames", "12", "--seed", "1", "--size", "32"]
    assert main([*argv, "--prevalence", "0.5", "--frames-per-study", "2"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "datalist.json") in printed and "training: " in printed and "test: " in printed
    items = _items(out / "datalist.json")
    assert len(items) == 12 and sum(i["label"] for i in items) == 6
    assert _png(out, items[0]["image"]).shape == (32, 32, 3)


@pytest.mark.parametrize(
    "extra",
    [
        ["--prevalence", "1.5"],
        ["--shortcut-rate", "-1"],
        ["--size", "16"],
        ["--n-frames", "0"],
        ["--seed", "x"],
        ["--split-fractions", "0.5", "0.2", "0.2"],
    ],
)
def test_cli_rejects_bad_arguments(tmp_path: Path, extra: list[str], capsys: pytest.CaptureFixture) -> None:
    argv = ["synth", "capsule", "--out", str(tmp_path), "--n-frames", "4", "--seed", "0", *extra]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert extra[0] in capsys.readouterr().err
    assert not (tmp_path / "datalist.json").exists()
