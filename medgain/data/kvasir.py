"""Capsule-endoscopy frames as public releases and teams store them → the capsule bundle's datalist.

Two layouts:

- ``kvasir-capsule``: the labelled images of Kvasir-Capsule, one folder per finding class under ``root``
  (``Angiectasia/``, ``Blood - fresh/``, ``Normal clean mucosa/`` …) and a ``metadata.csv`` (``;``-separated)
  with the columns :data:`KVASIR_CAPSULE_COLUMNS`: each frame's file name, video, frame number, finding
  category and class, and for some findings the four corners ``x1,y1 … x4,y4`` of a bounding box (empty when
  there is none).
- ``folders``: one folder per class under ``root``; a frame's video is its sub-folder inside the class folder,
  or else its file name up to the last ``_`` (``<video>_<frame>.png``).

Finding classes become lesion (label 1) or normal (label 0) frames, or are left out, by
:data:`KVASIR_CAPSULE_ROLES` with overrides. Whole videos go to one split each. A lesion frame's bounding
boxes become a box lesion mask (a label-map PNG, 1 inside the boxes) recorded with ``"mask_kind": "box"``;
a lesion frame without a box is a positive without a mask, which the bundle's mask budget expects.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "CAPSULE_LAYOUTS",
    "FINDING_ROLES",
    "KVASIR_CAPSULE_COLUMNS",
    "KVASIR_CAPSULE_ROLES",
    "capsule_datalist",
    "parse_class_roles",
]

CAPSULE_LAYOUTS = ("kvasir-capsule", "folders")
FINDING_ROLES = ("lesion", "normal", "exclude")
KVASIR_CAPSULE_COLUMNS = (
    "filename", "video_id", "frame_number", "finding_category", "finding_class",
    "x1", "y1", "x2", "y2", "x3", "y3", "x4", "y4",
)
# The default role of each Kvasir-Capsule finding class: the pathological luminal findings are lesions; normal
# mucosa and the anatomical landmarks are normal frames; foreign bodies (retained capsules, food) and frames with
# a reduced mucosal view are neither and are left out.
KVASIR_CAPSULE_ROLES: dict[str, str] = {
    "Ampulla of Vater": "normal",
    "Angiectasia": "lesion",
    "Blood - fresh": "lesion",
    "Blood - hematin": "lesion",
    "Erosion": "lesion",
    "Erythema": "lesion",
    "Foreign body": "exclude",
    "Ileocecal valve": "normal",
    "Lymphangiectasia": "lesion",
    "Normal clean mucosa": "normal",
    "Polyp": "lesion",
    "Pylorus": "normal",
    "Reduced mucosal view": "exclude",
    "Ulcer": "lesion",
}
SPLITS = ("training", "validation", "test")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_BOX_COLUMNS = KVASIR_CAPSULE_COLUMNS[5:]


def _slug(name: str) -> str:
    """A class name compared without case, spaces and punctuation ("Blood - fresh" == "blood_fresh")."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def parse_class_roles(pairs: Sequence[str]) -> dict[str, str]:
    """``["Foreign body=lesion", ...]`` → ``{"Foreign body": "lesion", ...}``.

    Raises:
        ValueError: for a pair without ``=``, an unknown role or a class given twice.
    """
    roles: dict[str, str] = {}
    for pair in pairs:
        name, sep, role = pair.partition("=")
        name, role = name.strip(), role.strip().lower()
        if not sep or not name:
            raise ValueError(f"class role {pair!r}: expected CLASS=ROLE, e.g. 'Foreign body=lesion'")
        if role not in FINDING_ROLES:
            raise ValueError(f"class role {pair!r}: role must be one of {FINDING_ROLES}")
        if any(_slug(known) == _slug(name) for known in roles):
            raise ValueError(f"class role {pair!r}: class {name!r} is given twice")
        roles[name] = role
    return roles


def _roles_for(classes: Sequence[str], overrides: Mapping[str, str], root: Path) -> dict[str, str]:
    """The role of each class folder name: the override, else the default table, else an error."""
    table = {_slug(k): v for k, v in KVASIR_CAPSULE_ROLES.items()}
    present = {_slug(c) for c in classes}
    for name, role in overrides.items():
        if role not in FINDING_ROLES:
            raise ValueError(f"class role {name}={role}: role must be one of {FINDING_ROLES}")
        if _slug(name) not in present and _slug(name) not in table:
            raise ValueError(
                f"class role {name}={role}: no class folder {name!r} under {root} (classes: {list(classes)})"
            )
    table.update({_slug(k): v for k, v in overrides.items()})
    missing = [c for c in classes if _slug(c) not in table]
    if missing:
        raise ValueError(
            f"{root}: class folder(s) {missing} have no role; give one with --map '{missing[0]}=lesion' (or normal, "
            "exclude)"
        )
    return {c: table[_slug(c)] for c in classes}


def _class_folders(root: Path) -> dict[str, list[Path]]:
    """Each class folder's image files (recursively), sorted."""
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: data folder not found")
    folders = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
        if files:
            folders[folder.name] = files
    if not folders:
        raise ValueError(f"{root}: no class folder with {'/'.join(_IMAGE_SUFFIXES)} images")
    slugs: dict[str, str] = {}
    for name in folders:
        if slugs.setdefault(_slug(name), name) != name:
            raise ValueError(f"{root}: class folders {slugs[_slug(name)]!r} and {name!r} name the same class")
    return folders


def _read_metadata(path: Path) -> list[dict[str, str]]:
    """Rows of a Kvasir-Capsule ``metadata.csv`` (``;`` or ``,`` separated), checked for the published columns."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metadata CSV not found (give it with --metadata)")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        first = fh.readline()
        fh.seek(0)
        reader = csv.reader(fh, delimiter=";" if ";" in first else ",")
        header = [h.strip() for h in next(reader, [])]
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise ValueError(f"{path}: duplicate columns {dupes}")
        unknown = [h for h in header if h not in KVASIR_CAPSULE_COLUMNS]
        missing = [c for c in KVASIR_CAPSULE_COLUMNS if c not in header]
        if unknown or missing:
            raise ValueError(
                f"{path}: not a Kvasir-Capsule metadata CSV: missing columns {missing}, unknown columns {unknown} "
                f"(expected {list(KVASIR_CAPSULE_COLUMNS)})"
            )
        rows = []
        for line, values in enumerate(reader, start=2):
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise ValueError(f"{path}: line {line} has {len(values)} fields, the header {len(header)}")
            rows.append({"line": str(line), **{h: v.strip() for h, v in zip(header, values)}})
    return rows


def _box(row: Mapping[str, str], where: str) -> tuple[float, float, float, float] | None:
    """``(x0, y0, x1, y1)`` of a row's four corners, None when they are all empty."""
    values = [row[c] for c in _BOX_COLUMNS]
    if not any(values):
        return None
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        raise ValueError(f"{where}: bounding box {values} must be four x, y corners (numbers) or all empty") from None
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"{where}: bounding box {values} is not finite")
    xs, ys = numbers[0::2], numbers[1::2]
    return min(xs), min(ys), max(xs), max(ys)


def _kvasir_frames(root: Path, metadata: Path) -> list[dict[str, Any]]:
    """One record per metadata frame: image path, class folder, video, frame number and boxes."""
    folders = _class_folders(root)
    by_name: dict[str, tuple[str, Path]] = {}
    for folder, files in folders.items():
        for file in files:
            if file.stem in by_name:
                raise ValueError(f"{file}: the frame is also in class folder {by_name[file.stem][0]!r}")
            by_name[file.stem] = (folder, file)  # by stem: a listed .jpg may be stored as .png
    frames: dict[str, dict[str, Any]] = {}
    for row in _read_metadata(metadata):
        where = f"{metadata}: line {row['line']}"
        name = row["filename"]
        if Path(name).stem not in by_name:
            raise FileNotFoundError(f"{where}: frame {name!r} is in no class folder under {root}")
        folder, file = by_name[Path(name).stem]
        if _slug(row["finding_class"]) != _slug(folder):
            raise ValueError(
                f"{where}: {name} is in folder {folder!r} but its finding_class is {row['finding_class']!r}"
            )
        if not row["video_id"]:
            raise ValueError(f"{where}: {name} has no video_id")
        try:
            number = int(float(row["frame_number"]))
        except ValueError:
            raise ValueError(f"{where}: frame_number {row['frame_number']!r} is not a number") from None
        frame = frames.setdefault(file.name, {"path": file, "class": folder, "video": row["video_id"], "frame": number,
                                         "boxes": []})
        if (frame["video"], frame["frame"]) != (row["video_id"], number):
            raise ValueError(f"{where}: {name} is listed again with another video or frame number")
        box = _box(row, where)
        if box is not None:
            frame["boxes"].append(box)
    unlisted = [str(file) for _, file in by_name.values() if file.name not in frames]
    if unlisted:
        raise ValueError(
            f"{unlisted[0]}: frame not in {metadata} ({len(unlisted)} frames of the class folders are not)"
        )
    return sorted(frames.values(), key=lambda f: (f["video"], f["frame"], f["path"].name))


def _folder_frames(root: Path) -> list[dict[str, Any]]:
    """One record per image of a one-folder-per-class tree; the video from a sub-folder or the file name."""
    frames = []
    for folder, files in _class_folders(root).items():
        for file in files:
            parent = file.parent.relative_to(root / folder)
            if parent.parts:
                video, number = parent.as_posix(), None
            else:
                video, sep, tail = file.stem.rpartition("_")
                if not sep or not video:
                    raise ValueError(
                        f"{file}: cannot tell the frame's video; put frames in one sub-folder per video or name them "
                        "<video>_<frame>"
                    )
                number = int(tail) if tail.isdigit() else None
            frames.append({"path": file, "class": folder, "video": video, "frame": number, "boxes": []})
    return frames


def _split_videos(frames: Sequence[Mapping[str, Any]], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Assign whole videos to splits: videos with the most lesion frames first (seeded order among equals), each
    to the split whose share of lesion and normal frames lags its target fraction most."""
    counts: dict[str, np.ndarray] = {}
    for f in frames:
        counts.setdefault(f["video"], np.zeros(2))[f["label"]] += 1
    names = sorted(counts)
    shuffled = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    order = sorted(shuffled, key=lambda v: (-counts[v][1], -counts[v].sum()))
    totals = np.maximum(sum(counts.values()), 1.0)
    target = np.asarray(fractions, dtype=np.float64)
    have = np.zeros((len(SPLITS), 2))
    owner = {}
    for video in order:
        lag = ((target[:, None] - have / totals) * (counts[video] > 0)).sum(1)
        lag[target == 0] = -np.inf
        best = int(np.argmax(lag))
        owner[video] = SPLITS[best]
        have[best] += counts[video]
    return owner


def _write_box_mask(path: Path, image: Path, boxes: Sequence[tuple[float, float, float, float]], where: str) -> None:
    """A label map the size of ``image``: 1 inside the union of the boxes (pixel edges rounded outwards)."""
    with Image.open(image) as im:
        width, height = im.size
    mask = np.zeros((height, width), np.uint8)
    for x0, y0, x1, y1 in boxes:
        c0, r0 = max(math.floor(x0), 0), max(math.floor(y0), 0)
        c1, r1 = min(math.ceil(x1), width), min(math.ceil(y1), height)
        if c0 >= c1 or r0 >= r1:
            raise ValueError(f"{where}: bounding box {(x0, y0, x1, y1)} lies outside the {width}x{height} frame")
        mask[r0:r1, c0:c1] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(mask).save(tmp, format="PNG")
    os.replace(tmp, path)


def capsule_datalist(
    root: str | os.PathLike,
    out: str | os.PathLike,
    layout: str = "kvasir-capsule",
    *,
    metadata: str | os.PathLike | None = None,
    class_roles: Mapping[str, str] | None = None,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, Any]:
    """Write the capsule bundle's datalist for a folder of labelled frames.

    Items are ``{"image", "label", "study", "finding_class"}`` (``study`` is the video), plus ``frame_number``
    when known, and for a lesion frame with bounding boxes ``"label_map"`` (the box mask, written under
    ``<out folder>/box_masks/``) and ``"mask_kind": "box"``. Paths are relative to the datalist's folder.

    Args:
        root: the folder with one folder per finding class (Kvasir-Capsule's labelled images).
        out: the datalist JSON to write.
        layout: "kvasir-capsule" (class folders and ``metadata.csv``) or "folders" (class folders only).
        metadata: the Kvasir-Capsule metadata CSV; default ``<root>/metadata.csv``.
        class_roles: class name → "lesion", "normal" or "exclude", over :data:`KVASIR_CAPSULE_ROLES`.
        split_fractions: shares of the videos' frames for training, validation and test (summing to 1).
        seed: seed of the video order among videos of equal size.

    Returns:
        ``{"splits": {split: {"frames", "lesion", "lesion_with_box", "videos"}}, "excluded": n}``.

    Raises:
        FileNotFoundError / NotADirectoryError: for a missing folder, metadata CSV or listed frame.
        ValueError: for an unknown layout, bad fractions, a class without a role, a malformed metadata row or a
            frame that metadata and folders disagree on; the message names the file (and line).
    """
    if layout not in CAPSULE_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {CAPSULE_LAYOUTS}")
    fractions = [float(f) for f in split_fractions]
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative shares summing to 1, training > 0: {fractions}")
    root, out = Path(root), Path(out)
    if layout == "kvasir-capsule":
        frames = _kvasir_frames(root, Path(metadata) if metadata is not None else root / "metadata.csv")
    else:
        if metadata is not None:
            raise ValueError("--metadata is read with the kvasir-capsule layout only")
        frames = _folder_frames(root)
    roles = _roles_for(sorted({f["class"] for f in frames}), class_roles or {}, root)
    kept = [{**f, "label": int(roles[f["class"]] == "lesion")} for f in frames if roles[f["class"]] != "exclude"]
    if not kept:
        raise ValueError(f"{root}: every frame's class is excluded; nothing to list")
    owner = _split_videos(kept, fractions, seed)
    base = out.parent
    datalist: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    for f in kept:
        item: dict[str, Any] = {
            "image": os.path.relpath(f["path"], base), "label": f["label"], "study": f["video"],
            "finding_class": f["class"],
        }
        if f["frame"] is not None:
            item["frame_number"] = f["frame"]
        if f["label"] and f["boxes"]:
            mask = (base / "box_masks" / f["path"].relative_to(root)).with_suffix(".png")
            _write_box_mask(mask, f["path"], f["boxes"], str(f["path"]))
            item.update(label_map=os.path.relpath(mask, base), mask_kind="box")
        datalist[owner[f["video"]]].append(item)
    base.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(datalist, indent=2) + "\n")
    os.replace(tmp, out)
    return {
        "splits": {
            name: {
                "frames": len(items),
                "lesion": sum(i["label"] for i in items),
                "lesion_with_box": sum("label_map" in i for i in items),
                "videos": len({i["study"] for i in items}),
            }
            for name, items in datalist.items()
        },
        "excluded": len(frames) - len(kept),
    }
