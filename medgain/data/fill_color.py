"""GAIN erase fill colour: the mean lesion colour of the training masks, computed once and cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Hashable, Sequence
from pathlib import Path

from monai.transforms import MapTransform

from medgain.attention import mean_roi_color
from medgain.transforms.io import LoadFramed, LoadLabelMapd
from medgain.transforms.label_map import LabelMapToMaskd, as_label_tuple

__all__ = ["cached_fill_color", "erase_fill"]


def _apply(transforms: Sequence[MapTransform], item: dict) -> dict[Hashable, object]:
    data: dict[Hashable, object] = dict(item)
    for transform in transforms:
        data = transform(data)
    return data


def _stamp(path: str | os.PathLike) -> list[int]:
    """Size and modification time of a file, so that rewritten files invalidate the cache."""
    try:
        stat = os.stat(path)
    except OSError as err:
        raise FileNotFoundError(f"{path}: file not found ({err})") from err
    return [stat.st_size, stat.st_mtime_ns]


def cached_fill_color(
    items: Sequence[dict],
    cache_dir: str | os.PathLike,
    lesion_labels: Sequence[int] | int = (1,),
    seed_key: str = "",
    ignore_labels: Sequence[int] = (),
) -> list[float]:
    """Mean lesion colour over the items with a label map, cached as JSON in ``cache_dir``.

    Items with a ``label_map`` and without ``has_mask`` False (see
    :func:`medgain.data.datalist.apply_mask_budget`; pass the items before the budget to use every label map)
    are loaded with :class:`LoadFramed`, :class:`LoadLabelMapd` and :class:`LabelMapToMaskd`, and averaged with
    :func:`medgain.attention.mean_roi_color`. The cache file is ``fill_color_<sha1>.json``, the hash covering the
    sorted (image, frame, label_map) triples with the files' sizes and modification times, the lesion labels and
    ``seed_key``; when it exists no image is read.

    Args:
        items: datalist items (``image``, optional ``frame``, ``label_map`` and ``has_mask``).
        cache_dir: cache folder, created when missing (e.g. ``<dataset_dir>/.medgain_cache``).
        lesion_labels: label values that count as lesion.
        ignore_labels: further label-map values counted as background (see :class:`LabelMapToMaskd`).
        seed_key: extra string mixed into the cache key, e.g. to separate runs that must not share a cache.

    Returns:
        Per-channel mean colour in [0, 1], e.g. ``[r, g, b]``.

    Raises:
        FileNotFoundError / ValueError: for an unreadable image or label map (naming the file).
        ValueError: when no item has a label map, no mask has a lesion pixel, or the cache file is unreadable.
    """
    labels = as_label_tuple(lesion_labels)
    selected = [item for item in items if item.get("label_map") is not None and item.get("has_mask", True)]
    if not selected:
        raise ValueError(f"cached_fill_color: none of the {len(items)} items has a label map (allowed a mask)")
    entries = sorted(
        (str(i["image"]), int(i.get("frame", 0)), str(i["label_map"]), _stamp(i["image"]), _stamp(i["label_map"]))
        for i in selected
    )
    digest = hashlib.sha1(json.dumps([entries, labels, seed_key]).encode()).hexdigest()
    cache_file = Path(cache_dir) / f"fill_color_{digest}.json"
    if cache_file.is_file():
        try:
            return [float(v) for v in json.loads(cache_file.read_text())["fill_color"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{cache_file}: unreadable fill-colour cache, delete it to recompute ({err})") from err
    # transforms are applied directly (not through Compose) so their errors naming the files surface unwrapped
    to_mask = LabelMapToMaskd(lesion_labels=labels, ignore_labels=ignore_labels)
    loaders = (LoadFramed(keys="image"), LoadLabelMapd(keys="label_map"), to_mask)
    color = mean_roi_color((_apply(loaders, item) for item in selected), image_key="image", mask_key="mask")
    fill_color = [float(v) for v in color]
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps({"fill_color": fill_color, "lesion_labels": list(labels), "n_items": len(selected)}))
    os.replace(partial, cache_file)
    return fill_color


def erase_fill(
    fill: str | float | Sequence[float],
    items: Sequence[dict],
    cache_dir: str | os.PathLike,
    lesion_labels: Sequence[int],
    ignore_labels: Sequence[int] = (),
) -> float | list[float]:
    """The GAIN erase fill a config asks for: ``"auto"`` is the cached mean lesion colour of ``items``
    (:func:`cached_fill_color`); a number or a per-channel colour is returned as given."""
    if isinstance(fill, str):
        if fill != "auto":
            raise ValueError(f"fill must be 'auto', a number or a colour [r, g, b], got {fill!r}")
        return cached_fill_color(items, cache_dir, lesion_labels, ignore_labels=ignore_labels)
    return fill
