"""Lesion-level FROC exactly as the official Camelyon16 evaluation script computes it, and slide-level AUC.

The official script (``Evaluation_FROC.py`` of the challenge) builds its evaluation regions on the tumour mask at
level 5 with a level-0 resolution of 0.243 µm, i.e. 7.776 µm per mask pixel. Here every threshold is in microns
and is turned into mask pixels with the slide's microns per pixel, in the same floating-point operations as the
official script: with a mask of 0.243 · 2^5 µm per pixel (``mpp=0.243``, ``mask_downsample=32``) the regions,
the isolated-tumour-cell list and the score are the official ones (given the same mask).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import binary_fill_holes, distance_transform_edt
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
        score: mean of ``sensitivities`` (the official "Avg Sensitivity").
        fp_rates: the false-positive rates (per slide) read.
        sensitivities: sensitivity at each rate, linearly interpolated on the curve (``np.interp`` of
            ``fps_per_slide``, ``sensitivity``), beyond the curve's last point its last sensitivity.
        fps_per_slide: (K + 1,) the curve's average FPs per slide, from threshold +inf down (non-decreasing).
        sensitivity: (K + 1,) matching sensitivities.
        thresholds: (K + 1,) matching score thresholds: +inf, then every distinct score (detections, and -inf
            for missed and ITC lesions) from the highest down, the lowest left out; a detection counts when its
            score is >= the threshold.
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
    """Camelyon16 evaluation regions of one slide's tumour mask, as the official script builds them.

    The tumour is expanded by ``dilation_um`` in the official sense: a pixel belongs to it when its Euclidean
    distance (pixel centres) to the nearest tumour pixel is below ``dilation_um / 2`` (37.5 µm; the official
    threshold is 75 / (2 · 7.776 µm) = 4.82 level-5 pixels). Holes of the result are filled (4-connected
    background) and its 8-connected components are the lesions. A lesion whose region has a major axis
    (``regionprops`` second-moment ellipse) below ``itc_um + dilation_um`` (275 µm) is an isolated tumour cell
    cluster (ITC).

    Args:
        tumour: (H, W) boolean tumour mask.
        pixel_um: microns per mask pixel.
        dilation_um: the official 75-µm expansion of the annotations (distance threshold ``dilation_um / 2``).
        itc_um: the ITC size; lesions whose region's major axis is below ``itc_um + dilation_um`` are ITCs.

    Returns:
        ``(regions, is_itc)``: (H, W) int32 region ids (0 = no lesion) and a boolean array indexed by id
        (entry 0 unused).
    """
    tumour = np.asarray(tumour, dtype=bool)
    if not tumour.any():
        return np.zeros(tumour.shape, dtype=np.int32), np.zeros(1, dtype=bool)
    near = distance_transform_edt(~tumour) < dilation_um / (pixel_um * 2)
    regions = label_components(binary_fill_holes(near), connectivity=2).astype(np.int32)
    itc_axis_px = (itc_um + dilation_um) / pixel_um
    is_itc = np.zeros(int(regions.max()) + 1, dtype=bool)
    for prop in regionprops(regions):
        is_itc[prop.label] = prop.axis_major_length < itc_axis_px
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
    """Camelyon16 lesion-level FROC over a set of slides, as the official evaluation script computes it.

    Each detection is a point with a score; it falls in the mask pixel ``floor(coordinate / downsample)``. A
    detection in a lesion's evaluation region (see :func:`lesion_regions`) is a hit for that lesion; a lesion
    counts once, with its best-scoring hit. A detection outside every region is a false positive, and so is
    every detection on a slide without tumour. Isolated tumour cells count neither as tumours to find nor as
    false positives when detected. Every lesion of a tumour slide, ITCs included, enters the list of tumour
    scores, a missed one or an ITC with score -inf (the official script's probability 0). The curve has one
    point per distinct score of all detections and lesions, save the lowest, plus (0, 0) at +inf: the
    average false positives per slide and the fraction of countable tumours with a score at or above it. When
    no lesion is missed and none is an ITC, the lowest score left out is a detection's (as in the official
    script: a lone hit and nothing else scores 0). The sensitivity at each rate is interpolated linearly on
    this curve and the score is their mean.

    With probabilities in (0, 1] as scores this is the official result, but for one corner: the official
    script stores hit probabilities as float32, which can split an exact tie between a hit and a false
    positive; here ties count together.

    Args:
        detections: per slide, (N, 3) rows of (x, y, score) with x, y in level-0 pixels (N may be 0).
        tumour_masks: per slide, the boolean tumour mask (None or all-zero for a slide without tumour).
        mpp: per slide, level-0 microns per pixel (may be None only for slides without tumour); the official
            script takes 0.243 for every slide.
        mask_downsample: level-0 pixels per mask pixel, per slide or one for all (official: 32, level 5).
        fp_rates: false positives per slide at which the sensitivity is read.
        dilation_um: the official 75-µm expansion of the tumours (see :func:`lesion_regions`).
        itc_um: the official 200-µm ITC size (see :func:`lesion_regions`).
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
    lesion_scores: list[float] = []
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
                f"froc: {names[i]} has tumours but no microns per pixel; FROC sizes the evaluation regions "
                f"({dilation_um} um expansion) and the ITCs ({itc_um} um) in microns"
            )
        pixel_um = float(mpp[i]) * downs[i]  # type: ignore[arg-type]
        regions, is_itc = lesion_regions(np.asarray(mask, dtype=bool), pixel_um, dilation_um, itc_um)
        n_tumours += int(np.count_nonzero(~is_itc[1:]))
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
        lesion_scores.extend(best[1:].tolist())  # missed lesions and ITCs: -inf
    if n_tumours == 0:
        raise ValueError("froc: no slide has a tumour that counts (all tumour-free or isolated tumour cells)")
    hits = np.sort(np.asarray(lesion_scores, dtype=np.float64))
    fps = np.sort(np.asarray(fp_scores, dtype=np.float64))
    thresholds = np.concatenate(([np.inf], np.unique(np.concatenate([hits, fps]))[:0:-1]))
    tp_count = hits.size - np.searchsorted(hits, thresholds, side="left")
    fp_count = fps.size - np.searchsorted(fps, thresholds, side="left")
    sensitivity = tp_count / float(n_tumours)
    fps_per_slide = fp_count / float(n)
    sens_at = np.interp(np.asarray(fp_rates, dtype=np.float64), fps_per_slide, sensitivity)
    return FROCResult(
        score=float(np.mean(sens_at)),
        fp_rates=tuple(float(r) for r in fp_rates),
        sensitivities=tuple(float(s) for s in sens_at),
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
