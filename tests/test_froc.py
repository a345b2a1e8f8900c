"""Camelyon16 FROC on hand-built tumour masks and detections with known answers, and slide-level AUC."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medgain.metrics import CAMELYON_FP_RATES, froc, lesion_regions, slide_auc

# 100 x 100 mask pixels of 10 um: tumour A 400 um, tumour B 300 um, C a 20-um isolated tumour cell cluster
PIXEL_UM = 10.0


def _mask() -> np.ndarray:
    mask = np.zeros((100, 100), dtype=bool)
    mask[10:50, 10:50] = True  # A
    mask[65:95, 65:95] = True  # B
    mask[10:12, 80:82] = True  # C (ITC)
    return mask


def _is_hit(x: float, y: float, mask: np.ndarray, mpp: float, downsample: float = 1.0) -> bool:
    """Whether a lone detection at (x, y) hits the one tumour of ``mask``.

    A second, normal slide holds a false positive at 0.01: the lowest score, which the official curve leaves
    out, so that the detection at 0.9 makes the curve's only point, (0, 1) for a hit and (1/2, 0) otherwise.
    """
    result = froc([np.array([[x, y, 0.9]]), np.array([[0, 0, 0.01]])], [mask, None], [mpp, None], [downsample, 1.0])
    assert result.n_tumours == 1 and result.score in (0.0, 1.0)
    return result.score == 1.0


def test_lesion_regions_margin_and_itcs():
    regions, is_itc = lesion_regions(_mask(), PIXEL_UM)
    a, b, c = regions[30, 30], regions[80, 80], regions[10, 80]
    assert len({a, b, c}) == 3 and 0 not in (a, b, c)
    assert not is_itc[a] and not is_itc[b] and is_itc[c]
    assert regions[30, 52] == a  # 3 px = 30 um from A: closer than 75 / 2 um
    assert regions[30, 53] == 0  # 40 um away: outside (the old 75-um dilation took it in)
    pair = np.zeros((40, 100), dtype=bool)
    pair[10:30, 10:30] = pair[10:30, 36:56] = True  # a 60-um gap: each gap pixel within 30 um of one, they join
    pair[10:30, 64:84] = True  # an 80-um gap from the second: its middle pixels are 40 um from both, separate
    joined, _ = lesion_regions(pair, PIXEL_UM)
    assert joined[20, 20] == joined[20, 45] != joined[20, 70]


def test_distance_threshold_is_half_of_75_um_and_strict():
    # 7.5-um pixels: the official threshold 75 / (2 * 7.5) is exactly 5 px, and a pixel at 5 px is outside
    mask = np.zeros((100, 100), dtype=bool)
    mask[30:70, 30:70] = True  # 300 um
    assert _is_hit(69 + 4, 50, mask, 7.5)  # 4 px = 30 um from the edge
    assert not _is_hit(69 + 5, 50, mask, 7.5)  # 5 px = 37.5 um: a false positive
    # a detection 50 um outside a tumour (5 px of 10 um) is a miss; the old 75-um dilation made it a hit
    mask = np.zeros((100, 100), dtype=bool)
    mask[40:60, 40:60] = True  # 200 um at 10 um / px
    assert _is_hit(59 + 3, 50, mask, PIXEL_UM)  # 3 px = 30 um right of the tumour edge
    assert not _is_hit(59 + 5, 50, mask, PIXEL_UM)  # 5 px = 50 um: a false positive
    # the same geometry with level-0 pixels of 5 um and the mask at downsample 2
    assert _is_hit((59 + 3) * 2, 100, mask, PIXEL_UM / 2, downsample=2.0)
    assert not _is_hit((59 + 5) * 2, 100, mask, PIXEL_UM / 2, downsample=2.0)


def test_hole_of_a_ring_shaped_tumour_is_filled():
    mask = np.zeros((100, 100), dtype=bool)
    mask[20:80, 20:80] = True
    mask[35:65, 35:65] = False  # a 300-um hole: its centre is 150 um from the tumour, beyond any margin
    regions, _ = lesion_regions(mask, PIXEL_UM)
    assert regions[50, 50] == regions[25, 25] != 0
    assert _is_hit(50, 50, mask, PIXEL_UM)  # a detection in the hole


@pytest.mark.parametrize("axis_um, itc", [(270.0, True), (280.0, False)])
def test_itc_is_an_evaluation_region_with_major_axis_under_275_um(axis_um, itc):
    # a 1 x 6 px line; with pixels over 37.5 um the region is the line itself (threshold under 1 px). Its
    # major axis is 4 * sqrt(var) with var = (6^2 - 1) / 12 of the column centres: 6.8313 px
    line = np.zeros((9, 16), dtype=bool)
    line[4, 5:11] = True
    pixel_um = axis_um / (4.0 * math.sqrt(35.0 / 12.0))  # 39.52 or 40.99 um
    big = np.zeros((40, 40), dtype=bool)
    big[5:35, 5:35] = True  # a 1.2-mm tumour on a second slide, so that some tumour counts
    dets = [np.array([[7 * pixel_um, 4 * pixel_um, 0.9]]), np.array([[20, 20, 0.5]]), np.array([[0, 0, 0.01]])]
    result = froc(dets, [line, big, None], [1.0, 40.0, None], mask_downsample=[pixel_um, 1.0, 1.0])
    # an ITC: one tumour (the big one) and the detection on the ITC neither hit nor false positive (no point
    # of the curve at 0.9); else two tumours, both hit
    assert result.n_tumours == (1 if itc else 2) and result.score == 1.0
    assert (0.9 in result.thresholds) is not itc


def test_cluster_of_192_um_is_an_itc():
    # a round cluster 25 px = 192 um across at 7.68 um / px (0.24 um, level 5): its region (the 37.5-um
    # margin all round) has a 260-um major axis, under 275 um. The old rule read a Feret diameter of 25.3 px
    # plus a pixel (202 um) and counted it as a tumour.
    yy, xx = np.mgrid[:60, :60]
    cluster = (yy - 30) ** 2 + (xx - 30) ** 2 <= 144
    regions, is_itc = lesion_regions(cluster, 0.24 * 32)
    assert is_itc[regions[30, 30]]
    with pytest.raises(ValueError, match="no slide has a tumour that counts"):
        froc([np.array([[30 * 32, 30 * 32, 0.9]])], [cluster], [0.24], mask_downsample=32.0)


def _two_tumours(missed: bool) -> np.ndarray:
    mask = np.zeros((100, 100), dtype=bool)
    mask[10:50, 10:50] = True  # A
    mask[60:95, 60:95] = True  # B
    if missed:
        mask[60:90, 10:40] = True  # C, never detected
    return mask


def test_sensitivity_is_interpolated_on_the_official_curve():
    # slide 1: A hit at 0.9, B hit at 0.6, false positives at 0.6 and 0.6; slide 2 (normal): false positives
    # at 0.8 and 0.1. Scores {0.1, 0.6, 0.8, 0.9}; the lowest (0.1) is left out as in the official script:
    #   +inf: 0 FP, 0 tumours -> (0, 0)     0.9: (0, 1/2)     0.8: (1/2, 1/2)     0.6: 3 FP -> (3/2, 1)
    # interpolated at 1/4, 1/2, 1, 2, 4, 8 FPs per slide: 1/2, 1/2, 1/2 + (1 - 1/2) / (3/2 - 1/2) * 1/2 = 3/4,
    # then 1, 1, 1 (past the curve's end): score (1/2 + 1/2 + 3/4 + 3) / 6 = 19/24. The step reading gave
    # 1/2 at 1 FP (and 3/4 in all).
    slide1 = np.array([[30, 30, 0.9], [80, 80, 0.6], [5, 95, 0.6], [95, 5, 0.6]])
    slide2 = np.array([[50, 50, 0.8], [10, 10, 0.1]])
    result = froc([slide1, slide2], [_two_tumours(missed=False), None], [PIXEL_UM, None])
    np.testing.assert_allclose(result.thresholds, [np.inf, 0.9, 0.8, 0.6])
    np.testing.assert_allclose(result.fps_per_slide, [0, 0, 0.5, 1.5])
    np.testing.assert_allclose(result.sensitivity, [0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(result.sensitivities, [0.5, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert result.score == pytest.approx(19 / 24)


def test_missed_lesions_enter_the_curve_with_the_lowest_score():
    # as above with a third tumour C never detected: it enters the tumour list with score -inf (the official
    # probability 0), so -inf is the lowest score left out and the false positive at 0.1 now makes a point:
    #   +inf (0, 0)   0.9 (0, 1/3)   0.8 (1/2, 1/3)   0.6 (3/2, 2/3)   0.1 (2, 2/3)
    # at 1/4, 1/2, 1, 2, 4, 8: 1/3, 1/3, 1/3 + (1/2) * 1/3 = 1/2, 2/3, 2/3, 2/3: score (19/6) / 6 = 19/36
    slide1 = np.array([[30, 30, 0.9], [80, 80, 0.6], [5, 95, 0.6], [95, 5, 0.6]])
    slide2 = np.array([[50, 50, 0.8], [10, 10, 0.1]])
    result = froc([slide1, slide2], [_two_tumours(missed=True), None], [PIXEL_UM, None])
    assert result.n_tumours == 3
    np.testing.assert_allclose(result.thresholds, [np.inf, 0.9, 0.8, 0.6, 0.1])
    np.testing.assert_allclose(result.fps_per_slide, [0, 0, 0.5, 1.5, 2.0])
    np.testing.assert_allclose(result.sensitivity, [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(result.sensitivities, [1 / 3, 1 / 3, 0.5, 2 / 3, 2 / 3, 2 / 3])
    assert result.score == pytest.approx(19 / 36)


def test_froc_hits_misses_itcs_and_repeated_detections():
    # (x, y, score), x = column, y = row, level-0 pixels (= mask pixels here)
    slide1 = [
        (30, 30, 0.9),  # A
        (40, 20, 0.4),  # A again: A counts once, with 0.9
        (52, 30, 0.3),  # A's margin (30 um): a hit, not a false positive
        (81, 10, 0.95),  # the ITC: neither hit nor false positive
        (20, 80, 0.8),  # false positive
        (5, 95, 0.6),  # false positive
        (80, 80, 0.5),  # B
    ]
    slide2 = [(50, 50, 0.7), (10, 10, 0.2)]  # a slide without tumour: both false positives
    result = froc([np.array(slide1), np.array(slide2)], [_mask(), None], [PIXEL_UM, None])
    assert result.n_tumours == 2 and result.n_slides == 2
    # the ITC enters the tumour list at -inf, the lowest score left out, so 0.2 makes a point.
    # curve: threshold 0.9 -> 1 tumour, 0 FP; 0.8 -> 1 FP; 0.7 -> 2; 0.6 -> 3; 0.5 -> both tumours, 3 FP; 0.2 -> 4
    np.testing.assert_allclose(result.thresholds, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.2])
    np.testing.assert_allclose(result.fps_per_slide, [0, 0, 0.5, 1.0, 1.5, 1.5, 2.0])
    np.testing.assert_allclose(result.sensitivity, [0, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0])
    assert result.fp_rates == CAMELYON_FP_RATES
    # interpolated: 1/4 and 1/2 -> 1/2; 1 -> 1/2 (the point (1, 1/2)); 2, 4, 8 -> 1 (at and past the end)
    np.testing.assert_allclose(result.sensitivities, (0.5, 0.5, 0.5, 1.0, 1.0, 1.0))
    assert result.score == pytest.approx(0.75)


def _official_froc(slides: list[tuple[np.ndarray, np.ndarray | None]]) -> tuple[list[float], float]:
    """The official script's steps, restated loop by loop (level-5 masks at 0.243 um, probabilities)."""
    from scipy import ndimage
    from skimage import measure

    fp_probs, tp_probs, n_tumours = [], [], 0
    for dets, mask in slides:
        if mask is None:
            fp_probs += [p for _, _, p in dets]
            continue
        near = ndimage.distance_transform_edt(~mask) < 75 / (0.243 * 2**5 * 2)
        labels = measure.label(ndimage.binary_fill_holes(near), connectivity=2)
        props = measure.regionprops(labels)
        itcs = [k + 1 for k in range(labels.max()) if props[k].axis_major_length < 275 / (0.243 * 2**5)]
        best = [0.0] * labels.max()
        for x, y, p in dets:
            hit = labels[int(y / 2**5), int(x / 2**5)]
            if hit == 0:
                fp_probs.append(p)
            elif hit not in itcs and p > best[hit - 1]:
                best[hit - 1] = p
        tp_probs += best
        n_tumours += labels.max() - len(itcs)
    fps, sens = [], []
    for t in sorted(set(fp_probs + tp_probs))[1:]:
        fps.append(sum(p >= t for p in fp_probs) / len(slides))
        sens.append(sum(p >= t for p in tp_probs) / n_tumours)
    fps.append(0.0)
    sens.append(0.0)
    at = np.interp(list(CAMELYON_FP_RATES), fps[::-1], sens[::-1])
    return at.tolist(), float(np.mean(at))


def test_froc_equals_the_official_steps_at_level_5():
    rng = np.random.default_rng(3)
    slides = []
    for k in range(6):
        mask = None
        if k < 4:
            yy, xx = np.mgrid[:120, :120]
            mask = np.zeros((120, 120), dtype=bool)
            for _ in range(5):  # discs of 1 to 25 px radius (8 to 190 um), some touching, some ITCs
                cy, cx, r = rng.integers(10, 110), rng.integers(10, 110), rng.uniform(0.5, 25)
                mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        dets = np.column_stack([rng.uniform(0, 120 * 32, 12), rng.uniform(0, 120 * 32, 12), rng.uniform(0.01, 1, 12)])
        if mask is not None:  # some detections on the tumour
            ys, xs = np.nonzero(mask)
            pick = rng.integers(0, ys.size, 4)
            dets[:4, :2] = np.column_stack([xs[pick], ys[pick]]) * 32 + 16
        slides.append((dets, mask))
    expected_at, expected = _official_froc(slides)
    result = froc([d for d, _ in slides], [m for _, m in slides], [0.243] * 6, mask_downsample=32.0)
    assert result.sensitivities == tuple(expected_at) and result.score == expected
    assert 0.0 < result.score < 1.0


def test_froc_errors():
    mask = _mask()
    with pytest.raises(ValueError, match="slide 0 has tumours but no microns per pixel"):
        froc([np.zeros((0, 3))], [mask], [None])
    with pytest.raises(ValueError, match="no slide has a tumour that counts"):
        froc([np.array([[1, 1, 0.5]])], [None], [None])
    with pytest.raises(ValueError, match="b has a detection at \\(500, 5\\) outside its tumour mask"):
        froc([np.array([[500, 5, 0.5]])], [mask], [PIXEL_UM], slide_ids=["b"])
    with pytest.raises(ValueError, match="2 masks"):
        froc([np.zeros((0, 3))], [mask, mask], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        froc([np.array([[1, 1, np.nan]])], [mask], [PIXEL_UM])


def test_slide_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes ties
    assert slide_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert slide_auc([3.0, 2.0, 1.0], [1, 1, 0]) == 1.0
    assert math.isnan(slide_auc([0.1, 0.2], [1, 1]))
