"""Capsule frames as Kvasir-Capsule publishes them (one folder per finding class, ``metadata.csv`` with video,
frame, finding and bounding box) and as a team exports them (one folder per class) → the bundle's datalist,
and one epoch of the capsule bundle on the Kvasir-Capsule-layout miniature."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgain.cli import main
from medgain.data import check_study_splits, load_datalist
from medgain.data.kvasir import KVASIR_CAPSULE_COLUMNS, capsule_datalist, parse_class_roles
from medgain.demo import bundle_run
from medgain.synth.capsule import make_capsule_frame

SIZE = 48
VIDEOS = [f"{0x3ada1b2c4d5e6f70 + 7919 * v:016x}" for v in range(6)]  # Kvasir-Capsule's videos: 16 hex digits
# class folder -> (metadata finding_class, finding_category, lesion drawn, bounding box given, frames per video)
CLASSES = {
    "Normal clean mucosa": ("Normal clean mucosa", "Luminal", False, False, 4),
    "Pylorus": ("Pylorus", "Anatomy", False, False, 1),
    "Angiectasia": ("Angiectasia", "Luminal", True, True, 1),
    "Erosion": ("Erosion", "Luminal", True, True, 1),
    "Ulcer": ("Ulcer", "Luminal", True, False, 1),
    "Foreign body": ("Foreign Body", "Luminal", False, False, 1),
}


def _bbox(label_map: np.ndarray) -> list[int]:
    rows, cols = np.nonzero(label_map)
    x0, x1, y0, y1 = int(cols.min()), int(cols.max()) + 1, int(rows.min()), int(rows.max()) + 1
    return [x0, y0, x1, y0, x1, y1, x0, y1]  # four corners, clockwise from the top left


def make_kvasir_tree(root: Path) -> dict[str, list[int]]:
    """A miniature of Kvasir-Capsule's labelled images: class folders of ``<video>_<frame>.jpg`` frames and a
    ``;``-separated metadata.csv in the published columns. Returns each boxed frame's box corners."""
    rows, boxes = [], {}
    frame_no = 0
    for v, video in enumerate(VIDEOS):
        for folder, (finding, category, lesion, boxed, n) in CLASSES.items():
            (root / folder).mkdir(parents=True, exist_ok=True)
            for _ in range(n):
                frame_no += 1
                image, label_map = make_capsule_frame(7, v, frame_no, size=SIZE, positive=lesion)
                name = f"{video}_{frame_no}.jpg"
                Image.fromarray(image).save(root / folder / name, quality=95)
                corners = _bbox(label_map) if boxed else []
                if boxed:
                    boxes[name] = corners
                rows.append([name, video, str(frame_no), category, finding, *map(str, corners or [""] * 8)])
    lines = [";".join(KVASIR_CAPSULE_COLUMNS)] + [";".join(r) for r in rows]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return boxes


@pytest.fixture(scope="module")
def kvasir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[int]]]:
    root = tmp_path_factory.mktemp("kvasir") / "labelled_images"
    return root, make_kvasir_tree(root)


def test_kvasir_layout_datalist(kvasir, tmp_path):
    root, boxes = kvasir
    out = tmp_path / "data" / "datalist.json"
    summary = capsule_datalist(root, out, "kvasir-capsule", split_fractions=(0.6, 0.2, 0.2), seed=0)
    content = json.loads(out.read_text())
    items = [item for split in content.values() for item in split]
    # foreign bodies are left out by default; 6 videos x 8 frames remain
    assert summary["excluded"] == 6 and len(items) == 48
    assert {s: c["videos"] for s, c in summary["splits"].items()} == {"training": 4, "validation": 1, "test": 1}
    videos = {s: {i["study"] for i in split} for s, split in content.items()}
    assert not (videos["training"] & videos["validation"] or videos["training"] & videos["test"]
                or videos["validation"] & videos["test"])  # no video in two splits
    check_study_splits(out)
    by_class = {c: [i for i in items if i["finding_class"] == c] for c in CLASSES}
    normal = by_class["Normal clean mucosa"] + by_class["Pylorus"]
    assert all(i["label"] == 0 and "label_map" not in i for i in normal)
    assert all(i["label"] == 1 for c in ("Angiectasia", "Erosion", "Ulcer") for i in by_class[c])
    # a lesion frame without a box: a positive without a mask
    assert all("label_map" not in i and "mask_kind" not in i for i in by_class["Ulcer"])
    # a bounding box: a box mask, recorded as such, 1 inside the box and 0 outside
    for item in by_class["Angiectasia"] + by_class["Erosion"]:
        assert item["mask_kind"] == "box" and item["label_map"].startswith("box_masks/")
        mask = np.asarray(Image.open(out.parent / item["label_map"]))
        x0, y0, x1, _, _, y1, _, _ = boxes[Path(item["image"]).name]
        expected = np.zeros((SIZE, SIZE), np.uint8)
        expected[y0:y1, x0:x1] = 1
        np.testing.assert_array_equal(mask, expected)
    assert summary["splits"]["training"]["lesion_with_box"] == 8 and summary["splits"]["training"]["lesion"] == 12
    loaded = load_datalist(out, "training")  # the bundle's loader finds every file
    assert all(Path(i["image"]).is_file() for i in loaded)
    # the same arguments give the same datalist
    again = tmp_path / "again" / "datalist.json"
    capsule_datalist(root, again, "kvasir-capsule", split_fractions=(0.6, 0.2, 0.2), seed=0)
    assert [[i["study"] for i in s] for s in json.loads(again.read_text()).values()] == [
        [i["study"] for i in s] for s in content.values()
    ]


def test_class_roles_are_overridable_and_checked(kvasir, tmp_path):
    root, _ = kvasir
    out = tmp_path / "datalist.json"
    summary = capsule_datalist(root, out, class_roles=parse_class_roles(["foreign_body=lesion", "Pylorus=exclude"]))
    items = [i for s in json.loads(out.read_text()).values() for i in s]
    assert summary["excluded"] == 6 and {i["label"] for i in items if i["finding_class"] == "Foreign body"} == {1}
    assert not any(i["finding_class"] == "Pylorus" for i in items)
    with pytest.raises(ValueError, match="role must be one of"):
        parse_class_roles(["Polyp=tumour"])
    with pytest.raises(ValueError, match="given twice"):
        parse_class_roles(["Polyp=lesion", "polyp=normal"])
    with pytest.raises(ValueError, match="no class folder 'Worms'"):
        capsule_datalist(root, out, class_roles={"Worms": "lesion"})


def test_kvasir_layout_errors_name_the_file(tmp_path):
    root = tmp_path / "k"
    make_kvasir_tree(root)
    stored = root / "Pylorus" / f"{VIDEOS[1]}_14.jpg"  # listed as .jpg, stored as .png: found by its stem
    Image.open(stored).save(stored.with_suffix(".png"))
    stored.unlink()
    capsule_datalist(root, tmp_path / "d.json")
    assert f"Pylorus/{VIDEOS[1]}_14.png" in (tmp_path / "d.json").read_text()
    (root / "Mystery").mkdir()
    Image.new("RGB", (SIZE, SIZE)).save(root / "Mystery" / f"{VIDEOS[0]}_999.jpg")
    with pytest.raises(ValueError, match=r"_999\.jpg: frame not in .*metadata\.csv"):
        capsule_datalist(root, tmp_path / "d.json")
    lines = (root / "metadata.csv").read_text().splitlines()
    lines.append(";".join([f"{VIDEOS[0]}_999.jpg", VIDEOS[0], "999", "Luminal", "Mystery", *[""] * 8]))
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['Mystery'\] have no role.*--map 'Mystery=lesion'"):
        capsule_datalist(root, tmp_path / "d.json")
    lines.append(";".join(["gone.jpg", VIDEOS[0], "1000", "Luminal", "Ulcer", *[""] * 8]))
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(FileNotFoundError, match=r"metadata\.csv: line \d+: frame 'gone\.jpg' is in no class folder"):
        capsule_datalist(root, tmp_path / "d.json", class_roles={"Mystery": "lesion"})
    (root / "metadata.csv").write_text(lines[0].replace("finding_class", "finding") + "\n")
    with pytest.raises(ValueError, match=r"metadata\.csv: not a Kvasir-Capsule metadata CSV: missing .*'finding_class'"):
        capsule_datalist(root, tmp_path / "d.json")


def test_folders_layout_and_cli(tmp_path, capsys):
    root = tmp_path / "export"
    for v in range(4):
        for cls, positive in (("lesion", True), ("normal", False)):
            folder = root / cls / f"patient{v}"
            folder.mkdir(parents=True)
            for f in range(3):
                image, _ = make_capsule_frame(3, v, f, size=SIZE, positive=positive)
                Image.fromarray(image).save(folder / f"frame_{f:04d}.png")
    out = tmp_path / "lists" / "datalist.json"
    args = ["data", "capsule-datalist", "--layout", "folders", "--root", str(root), "--out", str(out),
            "--map", "lesion=lesion", "--map", "normal=normal", "--split-fractions", "0.5", "0.25", "0.25"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "training: 12 frames, 6 lesion (0 with a box mask), 2 videos" in printed
    content = json.loads(out.read_text())
    assert [len({i["study"] for i in content[s]}) for s in ("training", "validation", "test")] == [2, 1, 1]
    assert all(i["study"].startswith("patient") and "frame_number" not in i for s in content.values() for i in s)
    check_study_splits(out)
    assert main(args[:-6] + ["--split-fractions", "0.5", "0.25", "0.25"]) == 1  # no role for 'lesion' / 'normal'
    assert "have no role" in capsys.readouterr().err


def test_capsule_bundle_trains_on_the_kvasir_miniature(kvasir, tmp_path):
    root, _ = kvasir
    data = tmp_path / "data"
    assert main(["data", "capsule-datalist", "--layout", "kvasir-capsule", "--root", str(root),
                 "--out", str(data / "datalist.json"), "--split-fractions", "0.6", "0.2", "0.2"]) == 0
    bundle_root = tmp_path / "bundle"
    bundle_run("training", ["train.yaml"], bundle_root=bundle_root, dataset_dir=data, max_epochs=1, image_size=32,
               batch_size=8, num_workers=0, network="small_cnn")
    assert (bundle_root / "models" / "model.pt").is_file()
