"""Lesion-level FROC as in Camelyon16, and slide-level AUC."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from skimage.measure import label as label_components
from skimage.measure import regionprops

from medgain.metrics.roc import roc_curve

__all__ = ["CAMELYON_FP_RATES", "FROCResult", "froc", "lesion_regions", "slide_auc"]

#: average false positives per slide at which Camelyon16 reads the sensitivity.
CAMELYON_FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class FROCResult:
    """Outcome of :func:`froc`.

    Attributes:
        score: mean sensitivity at ``fp_rates``.
        fp_rates: the false-positive rates (per slide) read.
        sensitivities: sensitivity at each rate: the highest reached with at most that many FPs per slide.
        fps_per_slide: (K + 1,) the curve's average FPs per slide, from threshold +inf down.
        sensitivity: (K + 1,) matching sensitivities.
        thresholds: (K + 1,) matching detection-score thresholds (+inf first); a detection counts when
            its score is >= the threshold.
        n_tumours: tumours that count (isolated tumour cells excluded).
        n_slides: slides evaluated.
    """

    score: float
    fp_rates: tuple[float, ...]
    sensitivities: tuple[float, ...]
    fps_per_slide: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    n_tumours: int
    n_slides: int


def lesion_regions(
    tumour: np.ndarray, pixel_um: float, dilation_um: float = 75.0, itc_um: float = 200.0
) -> tuple[np.ndarray, np.ndarray]:
    """Camelyon16 evaluation regions of one slide's tumour mask.

    Tumours are dilated by ``dilation_um``; each connected region of the dilated mask is one lesion. A
    lesion whose tumour pixels span less than ``itc_um`` (maximum Feret diameter) is an isolated tumour cell
    cluster (ITC).

    Args:
        tumour: (H, W) boolean tumour mask.
        pixel_um: microns per mask pixel.
        dilation_um: dilation radius in microns.
        itc_um: lesions smaller than this are ITCs.

    Returns:
        ``(regions, is_itc)``: (H, W) int32 region ids (0 = no lesion) and a boolean array indexed by id
        (entry 0 unused).
    """
    tumour = np.asarray(tumour, dtype=bool)
    if not tumour.any():
        return np.zeros(tumour.shape, dtype=np.int32), np.zeros(1, dtype=bool)
    dilated = distance_transform_edt(~tumour, sampling=pixel_um) <= dilation_um
    regions = label_components(dilated, connectivity=2).astype(np.int32)
    is_itc = np.zeros(int(regions.max()) + 1, dtype=bool)
    for prop in regionprops(np.where(tumour, regions, 0)):
        extent = (float(prop.feret_diameter_max) + 1.0) * pixel_um  # pixel centres -> outer edges
        is_itc[prop.label] = extent < itc_um
    return regions, is_itc


def froc(
    detections: Sequence[np.ndarray | Sequence[Sequence[float]]],
    tumour_masks: Sequence[np.ndarray | None],
    mpp: Sequence[float | None],
    mask_downsample: Sequence[float] | float = 1.0,
    *,
    fp_rates: Sequence[float] = CAMELYON_FP_RATES,
    dilation_um: float = 75.0,
    itc_um: float = 200.0,
    slide_ids: Sequence[str] | None = None,
) -> FROCResult:
    """Camelyon16 lesion-level FROC over a set of slides.

    Each detection is a point with a score. A detection inside a (dilated) tumour is a hit for that tumour;
    a tumour counts once, with its best-scoring hit, however many detections fall in it. A detection outside
    every tumour is a false positive. Isolated tumour cells (lesions under ``itc_um``) count neither as
    tumours to find nor as false positives when detected. The sensitivity at an average of ``r`` false
    positives per slide is the highest one reached with at most ``r``; the score is their mean.

    Args:
        detections: per slide, (N, 3) rows of (x, y, score) with x, y in level-0 pixels (N may be 0).
        tumour_masks: per slide, the boolean tumour mask (None or all-zero for a slide without tumour).
        mpp: per slide, level-0 microns per pixel (may be None only for slides without tumour).
        mask_downsample: level-0 pixels per mask pixel, per slide or one for all.
        fp_rates: false positives per slide at which the sensitivity is read.
        dilation_um: tumours are dilated by this many microns.
        itc_um: lesions smaller than this are isolated tumour cells.
        slide_ids: names for error messages.

    Raises:
        ValueError: when the lists differ in length, a tumour slide has no microns per pixel, a detection is
            malformed or off its mask, a score is not finite, or no slide has a countable tumour.
    """
    n = len(detections)
    if len(tumour_masks) != n or len(mpp) != n:
        raise ValueError(f"froc: {n} detection lists, {len(tumour_masks)} masks and {len(mpp)} mpp values")
    if n == 0:
        raise ValueError("froc: no slides")
    if np.isscalar(mask_downsample):
        downs = [float(mask_downsample)] * n  # type: ignore[arg-type]
    else:
        downs = [float(d) for d in mask_downsample]  # type: ignore[union-attr]
    if len(downs) != n:
        raise ValueError(f"froc: {len(downs)} mask downsamples for {n} slides")
    names = list(slide_ids) if slide_ids is not None else [f"slide {i}" for i in range(n)]
    hit_scores: list[float] = []
    fp_scores: list[float] = []
    n_tumours = 0
    for i in range(n):
        dets = np.asarray(detections[i], dtype=np.float64).reshape(-1, 3) if len(detections[i]) else np.zeros((0, 3))
        if not np.isfinite(dets).all():
            raise ValueError(f"froc: {names[i]} has non-finite detection coordinates or scores")
        mask = tumour_masks[i]
        if mask is None or not np.any(mask):
            fp_scores.extend(dets[:, 2].tolist())
            continue
        if mpp[i] is None or not (mpp[i] > 0):  # type: ignore[operator]
            raise ValueError(
                f"froc: {names[i]} has tumours but no microns per pixel; FROC dilates tumours by {dilation_um} um "
                "and excludes ITCs by size"
            )
        pixel_um = float(mpp[i]) * downs[i]  # type: ignore[arg-type]
        regions, is_itc = lesion_regions(np.asarray(mask, dtype=bool), pixel_um, dilation_um, itc_um)
        countable = np.flatnonzero(~is_itc[1:]) + 1
        n_tumours += countable.size
        best = np.full(is_itc.size, -np.inf)
        rows = np.floor(dets[:, 1] / downs[i]).astype(np.int64)
        cols = np.floor(dets[:, 0] / downs[i]).astype(np.int64)
        off = (rows < 0) | (cols < 0) | (rows >= regions.shape[0]) | (cols >= regions.shape[1])
        if off.any():
            x, y = dets[int(np.argmax(off)), :2]
            raise ValueError(
                f"froc: {names[i]} has a detection at ({x:.0f}, {y:.0f}) outside its tumour mask {regions.shape} "
                f"(downsample {downs[i]})"
            )
        region = regions[rows, cols]
        for r, s in zip(region, dets[:, 2]):
            if r == 0:
                fp_scores.append(float(s))
            elif not is_itc[r]:
                best[r] = max(best[r], s)
        hit_scores.extend(best[countable][np.isfinite(best[countable])].tolist())
    if n_tumours == 0:
        raise ValueError("froc: no slide has a tumour that counts (all tumour-free or isolated tumour cells)")
    hits = np.asarray(hit_scores, dtype=np.float64)
    fps = np.asarray(fp_scores, dtype=np.float64)
    thresholds = np.concatenate(([np.inf], np.unique(np.concatenate([hits, fps]))[::-1]))
    tp_count = np.searchsorted(np.sort(-hits), -thresholds, side="right")
    fp_count = np.searchsorted(np.sort(-fps), -thresholds, side="right")
    sensitivity = tp_count / n_tumours
    fps_per_slide = fp_count / n
    sens_at = tuple(float(sensitivity[fps_per_slide <= r].max()) for r in fp_rates)
    return FROCResult(
        score=float(np.mean(sens_at)),
        fp_rates=tuple(float(r) for r in fp_rates),
        sensitivities=sens_at,
        fps_per_slide=fps_per_slide,
        sensitivity=sensitivity,
        thresholds=thresholds,
        n_tumours=n_tumours,
        n_slides=n,
    )


def slide_auc(
    scores: np.ndarray | torch.Tensor | Sequence[float], labels: np.ndarray | torch.Tensor | Sequence[int]
) -> float:
    """Area under the exact ROC step function of slide scores (ties count one half), float64.

    Args:
        scores: (N,) finite slide scores, higher meaning tumour (e.g. the slide's log-odds).
        labels: (N,) 1 = tumour slide, 0 = normal.

    Returns:
        the AUC; NaN when only one class is present.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.size and (y.min() == y.max()):
        return math.nan
    fpr, tpr, _ = roc_curve(s, y)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
