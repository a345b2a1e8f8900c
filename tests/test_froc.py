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


def test_lesion_regions_dilate_and_flag_itcs():
    regions, is_itc = lesion_regions(_mask(), PIXEL_UM)
    a, b, c = regions[30, 30], regions[80, 80], regions[10, 80]
    assert len({a, b, c}) == 3 and 0 not in (a, b, c)
    assert not is_itc[a] and not is_itc[b] and is_itc[c]
    assert regions[30, 56] == a  # 6 px = 60 um from A: inside the 75-um dilation
    assert regions[30, 59] == 0  # 90 um away: outside
    pair = np.zeros((40, 100), dtype=bool)
    pair[10:30, 10:30] = pair[10:30, 40:60] = True  # 100 um apart: the two 75-um dilations join
    pair[10:30, 80:100] = True  # 200 um from the second: separate
    joined, _ = lesion_regions(pair, PIXEL_UM)
    assert joined[20, 20] == joined[20, 50] != joined[20, 90]


def test_froc_hits_misses_itcs_and_repeated_detections():
    # (x, y, score), x = column, y = row, level-0 pixels (= mask pixels here)
    slide1 = [
        (30, 30, 0.9),  # A
        (40, 20, 0.4),  # A again: A counts once, with 0.9
        (54, 30, 0.3),  # A's dilated border: a hit, not a false positive
        (81, 10, 0.95),  # the ITC: neither hit nor false positive
        (20, 80, 0.8),  # false positive
        (5, 95, 0.6),  # false positive
        (80, 80, 0.5),  # B
    ]
    slide2 = [(50, 50, 0.7), (10, 10, 0.2)]  # a slide without tumour: both false positives
    result = froc([np.array(slide1), np.array(slide2)], [_mask(), None], [PIXEL_UM, None])
    assert result.n_tumours == 2 and result.n_slides == 2
    # curve: threshold 0.9 -> 1 tumour, 0 FP; 0.8 -> 1 FP; 0.7 -> 2; 0.6 -> 3; 0.5 -> both tumours, 3 FP; 0.2 -> 4
    np.testing.assert_allclose(result.thresholds, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.2])
    np.testing.assert_allclose(result.fps_per_slide, [0, 0, 0.5, 1.0, 1.5, 1.5, 2.0])
    np.testing.assert_allclose(result.sensitivity, [0, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0])
    assert result.fp_rates == CAMELYON_FP_RATES
    assert result.sensitivities == (0.5, 0.5, 0.5, 1.0, 1.0, 1.0)
    assert result.score == pytest.approx(0.75)


def test_froc_mask_downsample_and_dilation_distance():
    mask = np.zeros((100, 100), dtype=bool)
    mask[40:60, 40:60] = True  # 200 um at 10 um / px
    near = np.array([[65 + 1.0, 50, 0.9]])  # 6.5 px = 65 um right of the tumour edge: within 75 um
    far = np.array([[69 + 1.0, 50, 0.9]])  # 10 px = 100 um: a false positive
    assert froc([near], [mask], [PIXEL_UM]).score == 1.0
    miss = froc([far], [mask], [PIXEL_UM])
    assert miss.score == 0.0 and miss.fps_per_slide[-1] == 1.0
    # the same geometry with level-0 pixels of 5 um and the mask at downsample 2
    level0 = np.array([[x * 2, y * 2, s] for x, y, s in near])
    assert froc([level0], [mask], [PIXEL_UM / 2], mask_downsample=2.0).score == 1.0


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
