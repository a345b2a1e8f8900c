"""Slide-level AUC and lesion-level FROC of the outputs of :func:`medgain.wsi.run_inference`."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medgain.metrics import CAMELYON_FP_RATES, froc, lesion_regions, slide_auc
from medgain.metrics.confidence import format_percent_upper
from medgain.wsi.annotations import read_annotations, tumour_mask
from medgain.wsi.inference import output_id

__all__ = ["evaluate_inference", "read_slide_labels", "slide_operating_point"]

logger = logging.getLogger(__name__)


def read_slide_labels(path: str | os.PathLike, annotation_column: str = "annotation_xml") -> list[dict[str, Any]]:
    """Slides of a label CSV (columns slide, label, image and ``annotation_column``, as ``medgain synth wsi``
    writes): ``{"slide", "label", "image", "annotation"}`` with paths resolved against the CSV's folder and
    ``annotation`` "" where there is none.

    Raises:
        ValueError: naming the file for missing columns or a label that is not 0 / 1.
    """
    path = Path(path)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("slide", "label", "image", annotation_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: slide label table lacks columns {missing} (has {reader.fieldnames})")
        rows = []
        for line, raw in enumerate(reader, start=2):
            if raw["label"] not in ("0", "1"):
                raise ValueError(f"{path}, line {line}: label must be 0 or 1, got {raw['label']!r}")
            ann = raw[annotation_column] or ""
            rows.append(
                {
                    "slide": raw["slide"],
                    "label": int(raw["label"]),
                    "image": str(path.parent / raw["image"]),
                    "annotation": str(path.parent / ann) if ann else "",
                }
            )
    return rows


def slide_operating_point(
    scores: Sequence[float], labels: Sequence[int], n_patches: Sequence[int], point: Mapping[str, Any]
) -> tuple[dict[str, float], str]:
    """Slide decisions at the model's stored (patch) operating point, and whether its false-alarm bound holds.

    A slide is called ill when its score (log-odds of its highest patches) reaches the stored threshold, which
    needs at least one patch at or above it: a normal slide of ``n`` patches is then flagged with a probability
    of at most ``min(1, n * fpr_upper)`` (union bound over its patches, no independence assumed), ``fpr_upper``
    being the point's bound of the patch false-alarm rate. ``slide_fpr_upper`` is the mean of that over the
    normal slides, the slide false-alarm rate the stored point allows; ``slide_fpr_above_bound`` is 1.0 when the
    normal slides flagged exceed it.

    Args:
        scores: slide scores (log-odds).
        labels: slide labels, 1 = tumour.
        n_patches: patches scored per slide.
        point: the model file's operating point (:func:`medgain.model_file.load_operating_point`).

    Returns:
        ``({"slide_sensitivity", "slide_specificity", "slide_false_alarms", "slide_fpr_upper",
        "slide_fpr_above_bound"}, note)``: NaN figures without a threshold (or, for the bound, without
        ``fpr_upper``); the note says why the bound does not hold, "" when it does or is unknown.
    """
    nan = {name: math.nan for name in ("slide_sensitivity", "slide_specificity", "slide_false_alarms",
                                       "slide_fpr_upper", "slide_fpr_above_bound")}
    threshold = point.get("threshold")
    if threshold is None or not math.isfinite(float(threshold)):
        return nan, ""
    score, label, n = np.asarray(scores, float), np.asarray(labels, int), np.asarray(n_patches, float)
    ill, normal = score >= float(threshold), label == 0
    flagged = int((ill & normal).sum())
    result = {
        **nan,
        "slide_sensitivity": float(ill[~normal].mean()) if (~normal).any() else math.nan,
        "slide_specificity": float(1.0 - ill[normal].mean()) if normal.any() else math.nan,
        "slide_false_alarms": float(flagged),
    }
    upper = point.get("fpr_upper")
    if upper is None or not normal.any():
        return result, ""
    allowed = float(np.minimum(1.0, n[normal] * float(upper)).mean())
    rate = flagged / int(normal.sum())
    result.update({"slide_fpr_upper": allowed, "slide_fpr_above_bound": float(rate > allowed)})
    if rate <= allowed:
        return result, ""
    return result, (
        f"{flagged} of {int(normal.sum())} normal slides flagged at the stored threshold ({100.0 * rate:.1f} %), "
        f"above the ≤ {format_percent_upper(allowed)} its patch false-alarm bound (≤ "
        f"{format_percent_upper(float(upper))} per patch) allows: the threshold does not hold on these slides"
    )


def evaluate_inference(
    out_dir: str | os.PathLike,
    slides: Sequence[Mapping[str, Any]],
    mask_downsample: float = 16.0,
    fp_rates: Sequence[float] = CAMELYON_FP_RATES,
    dilation_um: float = 75.0,
    itc_um: float = 200.0,
) -> dict[str, float]:
    """Slide AUC (slide scores against slide labels) and Camelyon16 FROC (detected lesions against the
    annotations) of the slides that have outputs in ``out_dir``.

    Slides without outputs (failed, see ``errors.csv``) are left out and counted; tumour slides without an
    annotation count for the AUC but not for the FROC.

    Args:
        out_dir: the folder of :func:`~medgain.wsi.run_inference`.
        slides: rows with ``slide`` (id), ``label`` (0/1) and ``annotation`` (path or ""); with ``image`` (the slide
            file) the outputs are found by its file name, which need not be the slide id.
        mask_downsample: level-0 pixels per pixel of the rasterised tumour masks.
        fp_rates, dilation_um, itc_um: see :func:`medgain.metrics.froc`.

    Returns:
        ``slide_auc``, ``froc``, ``froc_sensitivity_at_<rate>`` for each rate, ``n_slides``, ``n_missing``,
        ``n_tumours`` (countable lesions), ``n_froc_slides``; FROC entries NaN when no slide has an annotated
        tumour that counts (all tumour-free or isolated tumour cells).

    Raises:
        ValueError: when an annotated tumour slide has no microns per pixel (FROC needs it).
    """
    out = Path(out_dir)
    scores, labels, dets, masks, mpps, names = [], [], [], [], [], []
    missing = 0
    for row in slides:
        folder = out / (output_id(row["image"]) if row.get("image") else str(row["slide"]))
        record_path = folder / "slide.json"
        if not record_path.is_file():
            missing += 1
            continue
        record = json.loads(record_path.read_text())
        scores.append(float(record["score"]))
        labels.append(int(row["label"]))
        annotation = row.get("annotation") or ""
        if int(row["label"]) == 1 and not annotation:
            continue
        with (folder / "lesions.csv").open(newline="") as fh:
            dets.append(
                np.array([[float(r["x"]), float(r["y"]), float(r["log_odds"])] for r in csv.DictReader(fh)]).reshape(
                    -1, 3
                )
            )
        h, w = record["slide_shape"]
        mask = None
        if annotation:
            shape = (math.ceil(h / mask_downsample), math.ceil(w / mask_downsample))
            mask = tumour_mask(read_annotations(annotation, (h, w)), shape, mask_downsample)
            if mask.any() and not record.get("mpp"):
                raise ValueError(
                    f"{record['path']}: no resolution tags (microns per pixel), which FROC needs to dilate tumours "
                    f"by {dilation_um} um and to size ITCs"
                )
        masks.append(mask)
        mpps.append(record.get("mpp"))
        names.append(str(row["slide"]))
    if missing:
        logger.warning("%d of %d slides have no inference outputs in %s and are left out", missing, len(slides), out)
    result: dict[str, float] = {
        "slide_auc": slide_auc(scores, labels) if scores else math.nan,
        "n_slides": float(len(scores)),
        "n_missing": float(missing),
        "n_froc_slides": float(len(dets)),
    }
    nan_froc = {"froc": math.nan, "n_tumours": 0.0, **{f"froc_sensitivity_at_{r:g}": math.nan for r in fp_rates}}
    countable = any(
        m is not None and m.any() and not lesion_regions(m, mpp * mask_downsample, dilation_um, itc_um)[1][1:].all()
        for m, mpp in zip(masks, mpps)
    )
    if not countable:  # no tumour slide, or only isolated tumour cells
        return {**result, **nan_froc}
    res = froc(
        dets, masks, mpps, mask_downsample, fp_rates=fp_rates, dilation_um=dilation_um, itc_um=itc_um, slide_ids=names
    )
    result.update({"froc": res.score, "n_tumours": float(res.n_tumours)})
    result.update({f"froc_sensitivity_at_{r:g}": s for r, s in zip(res.fp_rates, res.sensitivities)})
    return result
