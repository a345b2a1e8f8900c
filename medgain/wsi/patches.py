"""Patch tables: a grid over the tissue of a slide, labelled from the tumour annotations, as CSV.

A table row is one patch: ``slide`` (the slide's path), ``x``, ``y`` (its top-left corner in level-0 pixels),
``level`` (the pyramid level it is read at), ``label`` (1 = tumour) and ``coverage`` (the fraction of the patch
inside the annotated tumour). The patch size is a property of the table, not of a row. Users may bring their own
coordinates in the same format.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medgain.wsi.annotations import read_annotations, tumour_mask
from medgain.wsi.slide import Slide
from medgain.wsi.tissue import area_fraction, slide_tissue_mask

__all__ = [
    "PATCH_COLUMNS",
    "balance_patches",
    "grid_locations",
    "patch_items",
    "patch_table",
    "read_patch_table",
    "slides_patch_table",
    "write_patch_table",
]

PATCH_COLUMNS = ("slide", "x", "y", "level", "label", "coverage")

logger = logging.getLogger(__name__)


def grid_locations(
    slide: Slide,
    level: int,
    patch_size: int,
    stride: int | None = None,
    tissue: tuple[np.ndarray, int] | None = None,
    min_tissue: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-left corners (level-0 pixels) of the grid patches that hold enough tissue.

    The grid starts at (0, 0) and steps by ``stride`` pixels of ``level``; only patches lying wholly inside the
    level are taken.

    Args:
        slide: an open slide.
        level: pyramid level the patches are read at.
        patch_size: patch side in pixels of ``level``.
        stride: grid step in pixels of ``level`` (default ``patch_size``).
        tissue: ``(mask, mask_level)`` from :func:`~medgain.wsi.tissue.slide_tissue_mask` (computed when None).
        min_tissue: least tissue fraction of a patch that is kept.

    Returns:
        ``(xs, ys, tissue_fraction)`` of the kept patches, each (N,), row-major order.
    """
    stride = stride or patch_size
    if patch_size < 1 or stride < 1:
        raise ValueError(f"patch_size and stride must be positive, got {patch_size} and {stride}")
    mask, mask_level = tissue if tissue is not None else slide_tissue_mask(slide)
    d = slide.downsamples[level]
    h, w = slide.level_shapes[level]
    rows = np.arange(0, h - patch_size + 1, stride)
    cols = np.arange(0, w - patch_size + 1, stride)
    gy, gx = np.meshgrid(rows, cols, indexing="ij")
    xs = np.rint(gx.ravel() * d).astype(np.int64)
    ys = np.rint(gy.ravel() * d).astype(np.int64)
    frac = area_fraction(mask, slide.downsamples[mask_level], xs, ys, patch_size * d)
    keep = frac >= min_tissue
    return xs[keep], ys[keep], frac[keep]


def patch_table(
    slide_path: str | os.PathLike,
    annotation: str | os.PathLike | None,
    level: int,
    patch_size: int,
    *,
    stride: int | None = None,
    min_coverage: float = 0.5,
    min_tissue: float = 0.5,
    drop_ambiguous: bool = True,
    coverage_samples: int = 16,
    backend: str = "tifffile",
    default_mpp: float | None = None,
) -> list[dict[str, Any]]:
    """Patch rows (see the module docstring) for one slide.

    Args:
        slide_path: the slide.
        annotation: its ASAP XML / GeoJSON tumour annotation; None for a slide without tumour.
        level: pyramid level of the patches.
        patch_size: patch side in pixels of ``level``.
        stride: grid step (default ``patch_size``).
        min_coverage: a patch is tumour (label 1) when at least this fraction of it is annotated tumour.
        min_tissue: least tissue fraction of a patch.
        drop_ambiguous: leave out patches that touch tumour but cover less than ``min_coverage`` of it, so
            that no normal patch shows tumour.
        coverage_samples: the tumour mask is rasterised at ``coverage_samples`` pixels per patch side.
        backend: WSI backend.
        default_mpp: microns per pixel to assume when the slide has no resolution tags.

    Raises:
        SlideError / AnnotationError: for an unusable slide or annotation (message names the file).
    """
    if not 0.0 < min_coverage <= 1.0:
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
    with Slide(slide_path, backend=backend, default_mpp=default_mpp) as slide:
        xs, ys, _ = grid_locations(slide, level, patch_size, stride, min_tissue=min_tissue)
        size0 = patch_size * slide.downsamples[level]
        coverage = np.zeros(xs.shape, dtype=np.float64)
        if annotation is not None and xs.size:
            polygons = read_annotations(annotation, slide.shape)
            cov_d = size0 / coverage_samples
            h, w = slide.shape
            tumour = tumour_mask(polygons, (int(np.ceil(h / cov_d)), int(np.ceil(w / cov_d))), cov_d)
            coverage = area_fraction(tumour, cov_d, xs, ys, size0)
        labels = (coverage >= min_coverage).astype(int)
        keep = ~(drop_ambiguous & (coverage > 0) & (labels == 0))
    return [
        {
            "slide": str(slide_path),
            "x": int(x),
            "y": int(y),
            "level": int(level),
            "label": int(lab),
            "coverage": round(float(c), 4),
        }
        for x, y, lab, c in zip(xs[keep], ys[keep], labels[keep], coverage[keep])
    ]


def slides_patch_table(
    slides: Sequence[Mapping[str, Any]], level: int, patch_size: int, **kwargs: Any
) -> list[dict[str, Any]]:
    """Patch rows of many slides (see :func:`patch_table`, whose keyword arguments ``kwargs`` are passed on).

    Args:
        slides: rows with ``image`` (slide path), ``label`` (0/1) and ``annotation`` (path or ""), e.g. from
            :func:`~medgain.wsi.read_slide_labels`. Tumour slides without an annotation are left out (their
            patches cannot be labelled), with a warning.
        level: pyramid level of the patches.
        patch_size: patch side in pixels of ``level``.
    """
    rows: list[dict[str, Any]] = []
    for slide in slides:
        annotation = slide.get("annotation") or None
        if int(slide["label"]) == 1 and annotation is None:
            logger.warning("%s: tumour slide without annotation, left out of the patch table", slide["image"])
            continue
        rows.extend(patch_table(slide["image"], annotation, level, patch_size, **kwargs))
    return rows


def balance_patches(
    rows: Sequence[dict[str, Any]], max_per_class: int | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """Equal numbers of tumour and normal rows, drawn without replacement (order of ``rows`` kept).

    Args:
        rows: patch rows with a 0/1 ``label``.
        max_per_class: cap per class; by default the size of the smaller class.
        seed: random seed.

    Raises:
        ValueError: when one class has no rows.
    """
    labels = np.array([int(r["label"]) for r in rows])
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if not pos.size or not neg.size:
        raise ValueError(
            f"balance_patches: needs tumour and normal patches, got {pos.size} tumour and {neg.size} normal"
        )
    n = min(pos.size, neg.size, max_per_class or pos.size + neg.size)
    rng = np.random.default_rng(seed)
    chosen = np.sort(np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]))
    return [dict(rows[i]) for i in chosen]


def write_patch_table(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows as CSV with :data:`PATCH_COLUMNS` (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=PATCH_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def read_patch_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a patch table CSV, typed (``x``, ``y``, ``level``, ``label`` int; ``coverage`` float).

    ``coverage`` may be missing (user coordinates); it is then NaN.

    Raises:
        ValueError: naming the file and line for missing columns or values that are not numbers.
    """
    path = Path(path)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in PATCH_COLUMNS if c != "coverage" and c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: patch table lacks columns {missing} (has {reader.fieldnames})")
        rows = []
        for line, raw in enumerate(reader, start=2):
            try:
                row = {
                    "slide": raw["slide"],
                    "x": int(raw["x"]),
                    "y": int(raw["y"]),
                    "level": int(raw["level"]),
                    "label": int(raw["label"]),
                    "coverage": float(raw["coverage"]) if raw.get("coverage") not in (None, "") else float("nan"),
                }
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}, line {line}: {err}") from None
            if row["label"] not in (0, 1) or row["level"] < 0:
                raise ValueError(f"{path}, line {line}: label must be 0 or 1 and level >= 0, got {raw}")
            rows.append(row)
    return rows


def patch_items(
    rows: Sequence[dict[str, Any]], annotations: Mapping[str, str] | None = None, patch_size: int | None = None
) -> list[dict[str, Any]]:
    """A MONAI ``PatchWSIDataset`` datalist from patch rows.

    Each item has ``image`` (the slide), ``location`` ((top, left) = (y, x) in level-0 pixels, MONAI's order),
    ``level``, ``label``, ``annotation`` (the slide's annotation file from ``annotations``, "" when it has none:
    read it with ``additional_meta_keys=["annotation"]`` for :class:`~medgain.wsi.LesionPatchMaskd`) and, given
    ``patch_size``, ``size``.

    Args:
        rows: patch rows (see the module docstring).
        annotations: slide path -> annotation file.
        patch_size: patch side at the row's level.
    """
    annotations = annotations or {}
    items = []
    for r in rows:
        item = {
            "image": r["slide"],
            "location": [int(r["y"]), int(r["x"])],
            "level": int(r["level"]),
            "label": int(r["label"]),
            "annotation": annotations.get(r["slide"], ""),
        }
        if patch_size is not None:
            item["size"] = [int(patch_size), int(patch_size)]
        items.append(item)
    return items
