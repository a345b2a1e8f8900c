"""Datalists: loading and validating decathlon-style JSON, expanding DICOM clips, mask budget, folder scans."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.data import load_decathlon_datalist

from medgain.transforms.io import count_frames, iter_frames

__all__ = ["load_datalist", "expand_frames", "apply_mask_budget", "require_full_batch", "scan_folder"]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: datalist file not found")
    try:
        with open(path) as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: datalist is not valid JSON ({err})") from err
    if not isinstance(content, dict):
        raise ValueError(f"{path}: datalist must be a JSON object with split lists, got {type(content).__name__}")
    return content


def load_datalist(
    path: str | os.PathLike,
    split: str,
    base_dir: str | os.PathLike | None = None,
    classes: Sequence[int] = (0, 1),
) -> list[dict]:
    """Load and validate one split of a decathlon-style datalist of classification items.

    Items look like ``{"image": "images/a.png", "label": 1, "label_map": "labels/a.png", "study": "s01"}``;
    ``label_map`` is optional (``null`` counts as absent and is dropped).

    Args:
        path: datalist JSON file.
        split: list to load, e.g. ``"training"``, ``"validation"`` or ``"test"``.
        base_dir: folder that relative ``image`` / ``label_map`` paths are relative to; default: the JSON's folder.
        classes: the class indices a ``label`` may hold (default 0 = healthy, 1 = ill).

    Returns:
        New item dicts with ``image`` and ``label_map`` resolved to normalised paths; other fields are copied
        unchanged.

    Raises:
        FileNotFoundError: when the datalist or a referenced file does not exist.
        ValueError: for invalid JSON, a missing split, an item without ``image`` or with a non-integer ``label``,
            or labels outside ``classes`` (naming the datalist, the values found and those expected).
    """
    path = Path(path)
    content = _read_json(path)
    if split not in content or not isinstance(content[split], list):
        available = sorted(k for k, v in content.items() if isinstance(v, list))
        raise ValueError(f"{path}: no split '{split}' in the datalist, available splits: {available}")
    for index, raw in enumerate(content[split]):
        where = f"{path}: item {index} of '{split}'"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected an object with 'image' and 'label', got {raw!r}")
        if not isinstance(raw.get("image"), str):
            raise ValueError(f"{where}: 'image' must be a file path string, got {raw.get('image')!r}")
        label = raw.get("label")
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise ValueError(f"{where}: 'label' must be a non-negative integer, got {label!r}")
        if raw.get("label_map") is not None and not isinstance(raw["label_map"], str):
            raise ValueError(f"{where}: 'label_map' must be a file path string, got {raw['label_map']!r}")
    found = sorted({raw["label"] for raw in content[split]})
    expected = sorted({int(c) for c in classes})
    if not set(found) <= set(expected):
        raise ValueError(
            f"{path}: the '{split}' labels are {found}, expected class indices {expected} "
            f"(values {sorted(set(found) - set(expected))} are not classes of this task)"
        )
    base = Path(base_dir) if base_dir is not None else path.parent
    loaded = load_decathlon_datalist(path, is_segmentation=False, data_list_key=split, base_dir=base)
    items = []
    for index, (raw, item) in enumerate(zip(content[split], loaded)):
        item = {k: v for k, v in raw.items() if k != "label_map"} | {"image": item["image"]}
        if raw.get("label_map") is not None:
            item["label_map"] = os.path.normpath(os.path.join(base, raw["label_map"]))
        for key in ("image", "label_map"):
            if key in item and not os.path.isfile(item[key]):
                raise FileNotFoundError(f"{path}: item {index} of '{split}': {key} file not found: {item[key]}")
        items.append(item)
    return items


def expand_frames(items: Sequence[dict], image_key: str = "image", frame_key: str = "frame") -> list[dict]:
    """One item per frame: multi-frame DICOM items are repeated with ``frame`` 0..n-1, others get ``frame`` 0.

    Args:
        items: datalist items.
        image_key: key of the image path.
        frame_key: key that receives the frame index.

    Raises:
        FileNotFoundError / ValueError: when an image header cannot be read (see :func:`count_frames`).
    """
    expanded = []
    for item in items:
        for frame in range(count_frames(item[image_key])):
            expanded.append({**item, frame_key: frame})
    return expanded


def require_full_batch(items: Sequence[dict], batch_size: int, split: str, source: str | os.PathLike) -> None:
    """Refuse a split too small for one full batch (a loader that drops the last partial batch would run no
    iteration, and the epoch would pass silently).

    Raises:
        ValueError: naming ``source`` (the data set), the split and both counts.
    """
    if len(items) < batch_size:
        raise ValueError(
            f"{source}: the {split} split has {len(items)} items, fewer than one batch of {batch_size}; training "
            "would run no iteration (lower batch_size or add data)"
        )


def _budget_rank(seed: int, item: dict, image_key: str, frame_key: str, base_dir: str) -> tuple[str, str]:
    # the path inside the data set, not the absolute path: the same choice wherever the data set is stored
    path = str(item[image_key])
    relative = Path(os.path.relpath(os.path.abspath(path), base_dir)).as_posix()
    identity = json.dumps([int(seed), relative, int(item.get(frame_key, 0))])
    return hashlib.sha1(identity.encode()).hexdigest(), relative


def apply_mask_budget(
    items: Sequence[dict],
    fraction: float,
    seed: int,
    label_key: str = "label",
    has_mask_key: str = "has_mask",
    label_map_key: str = "label_map",
    image_key: str = "image",
    frame_key: str = "frame",
    base_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Keep lesion masks for a seeded fraction of the positives that have a label map.

    Of the ``n`` positive items (non-zero label) with a label map, exactly ``round(fraction * n)`` (at least 1
    when ``fraction > 0`` and ``n > 0``) keep their mask. They are the first in the order of
    ``sha1(seed, image path relative to base_dir, frame)``, so the choice is deterministic, independent of the
    item order and of where the data set is stored, and per-video folders of identically named frames
    (``video_1/frame_0001.png``, ``video_2/frame_0001.png`` …) get different frames chosen.

    Args:
        items: datalist items.
        fraction: fraction in [0, 1] of the eligible positives that keep their mask.
        seed: selection seed.
        label_key: key of the integer class label.
        has_mask_key: key that receives the True / False flag on every item (negatives: False).
        label_map_key: key of the label map path.
        image_key: key of the image path (part of the ranking hash).
        frame_key: key of the frame index (part of the ranking hash, 0 when absent).
        base_dir: root of the data set, e.g. the datalist's folder; default: the deepest folder that holds
            every eligible image.

    Returns:
        New item dicts with ``has_mask`` set.

    Raises:
        ValueError: when ``fraction`` is outside [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"mask budget fraction must be in [0, 1], got {fraction}")
    eligible = [i for i, item in enumerate(items) if item[label_key] != 0 and item.get(label_map_key) is not None]
    keep = round(fraction * len(eligible))
    if fraction > 0 and eligible:
        keep = max(1, keep)
    if base_dir is not None:
        base = os.path.abspath(base_dir)
    else:
        folders = [os.path.dirname(os.path.abspath(str(items[i][image_key]))) for i in eligible]
        base = os.path.commonpath(folders) if folders else ""
    ranked = sorted(eligible, key=lambda i: _budget_rank(seed, items[i], image_key, frame_key, base))
    chosen = set(ranked[:keep])
    return [{**item, has_mask_key: i in chosen} for i, item in enumerate(items)]


def scan_folder(
    input_dir: str | os.PathLike,
    extensions: Sequence[str] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom"),
    decode: bool = True,
) -> tuple[list[dict], list[dict]]:
    """List the image frames under a folder for inference, probing every file once.

    Args:
        input_dir: folder searched recursively.
        extensions: file suffixes to include (case-insensitive).
        decode: True: decode every frame, so a file whose pixels cannot be read is listed in ``errors``. False:
            read headers only (:func:`medgain.transforms.io.count_frames`: no pixel decoded, frames counted from
            the header), several times faster; a file with a readable header and corrupt pixels is then listed in
            ``items``, and its loader must refuse it (:class:`medgain.transforms.LoadFramed` with ``refused_key``).

    Returns:
        ``(items, errors)``: ``items`` are ``{"image": path, "frame": i}``, one per frame, in sorted path order;
        ``errors`` are ``{"file": path, "reason": message}`` for every file that cannot be read (its header, or
        with ``decode``, its pixels).

    Raises:
        NotADirectoryError: when ``input_dir`` is not a folder.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: input folder not found")
    suffixes = tuple(e.lower() for e in extensions)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    items: list[dict] = []
    errors: list[dict] = []
    for file in files:
        try:
            n_frames = sum(1 for _ in iter_frames(file)) if decode else count_frames(file)
        except (ValueError, OSError) as err:
            errors.append({"file": str(file), "reason": str(err)})
            continue
        items.extend({"image": str(file), "frame": frame} for frame in range(n_frames))
    return items, errors
