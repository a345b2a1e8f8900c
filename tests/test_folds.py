"""Patient-grouped stratified folds, folds.csv, out-of-fold AUC with a bootstrap interval, ensemble weights."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medgain.data import (
    assign_folds,
    check_patient_splits,
    grouped_stratified_folds,
    read_folds_csv,
    write_folds_csv,
)
from medgain.ensemble import ensemble_scores, search_ensemble_weights
from medgain.metrics import auc_score, bootstrap_auc, oof_auc_summary


def _many_images_per_patient(tmp_path: Path, seed: int = 0) -> list[dict]:
    """An ISIC-like CSV: 80 patients with 1-40 images each, melanomas clustered in a few high-risk patients."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(80):
        n = int(rng.integers(1, 41))
        risk = 0.25 if p % 8 == 0 else 0.01
        for i in range(n):
            target = int(rng.random() < risk)
            rows.append({"image_name": f"IMG_{p:03d}_{i:02d}", "patient_id": f"P{p:03d}", "target": target})
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_name", "patient_id", "target"])
        writer.writeheader()
        writer.writerows(rows)
    with path.open(newline="") as f:
        return [
            {"image": r["image_name"], "patient": r["patient_id"], "label": int(r["target"])} for r in csv.DictReader(f)
        ]


def test_folds_are_grouped_by_patient_and_stratified(tmp_path: Path) -> None:
    items = _many_images_per_patient(tmp_path)
    labels = np.array([i["label"] for i in items])
    assert len(items) > 1000 and labels.sum() >= 10
    with_fold, path = write_folds_csv(items, tmp_path / "out", n_folds=5, seed=3)
    assert path == tmp_path / "out" / "folds.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "patient", "label", "fold"] and len(rows) == len(items)
    patient_folds: dict[str, set[int]] = defaultdict(set)
    for row in rows:
        patient_folds[row["patient"]].add(int(row["fold"]))
    assert all(len(f) == 1 for f in patient_folds.values())  # no patient in two folds, ever
    folds = np.array([int(r["fold"]) for r in rows])
    assert [i["fold"] for i in with_fold] == folds.tolist()
    # stratified: every fold holds positives, positives and images spread evenly (patients are indivisible)
    pos_per_fold = np.bincount(folds, weights=labels, minlength=5)
    size_per_fold = np.bincount(folds, minlength=5)
    biggest_patient_pos = max(sum(i["label"] for i in items if i["patient"] == p) for p in patient_folds)
    assert pos_per_fold.min() >= 1
    assert pos_per_fold.max() - pos_per_fold.min() <= biggest_patient_pos
    assert size_per_fold.max() - size_per_fold.min() <= 40 + biggest_patient_pos
    # the table reads back with the same assignment, and derived items (crops) get their patient's fold
    assert read_folds_csv(path) == {r["image"]: int(r["fold"]) for r in rows}
    crops = [{**i, "image": f"crops/{i['image']}.png"} for i in items]
    assert [i["fold"] for i in assign_folds(crops, path)] == folds.tolist()
    with pytest.raises(ValueError, match=r"item 0 \(x.png\): patient 'P999' is not in the fold table"):
        assign_folds([{"image": "x.png", "patient": "P999"}], path)


def test_folds_are_deterministic_and_seeded(tmp_path: Path) -> None:
    items = _many_images_per_patient(tmp_path)
    labels, groups = [i["label"] for i in items], [i["patient"] for i in items]
    a = grouped_stratified_folds(labels, groups, 4, seed=0)
    assert np.array_equal(a, grouped_stratified_folds(labels, groups, 4, seed=0))
    assert not np.array_equal(a, grouped_stratified_folds(labels, groups, 4, seed=1))


def test_folds_refuse_too_few_positive_patients() -> None:
    labels = [1, 1, 0, 0, 0, 0]
    groups = ["a", "a", "b", "c", "d", "e"]
    with pytest.raises(ValueError, match="only 1 patients have a positive"):
        grouped_stratified_folds(labels, groups, 2)
    with pytest.raises(ValueError, match="n_folds"):
        grouped_stratified_folds(labels, groups, 1)


def test_folds_csv_errors_name_the_row(tmp_path: Path) -> None:
    path = tmp_path / "folds.csv"
    path.write_text("image,patient,label,fold\na.jpg,P1,0,0\nb.jpg,P2,1,1\nc.jpg,P1,0,1\n")
    with pytest.raises(ValueError, match=r"row 4: patient 'P1' is in fold 1 but row 2"):
        read_folds_csv(path)
    path.write_text("image,patient,fold\na.jpg,P1,0\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['label'\]"):
        read_folds_csv(path)
    with pytest.raises(KeyError, match="item 0"):
        write_folds_csv([{"image": "a.jpg", "label": 0}], tmp_path, 2)


def test_patient_in_test_split_and_training_is_refused() -> None:
    train = [{"image": "a.jpg", "patient": "P1"}, {"image": "b.jpg", "patient": "P2"}]
    test = [{"image": "c.jpg", "patient": "P2"}]
    with pytest.raises(ValueError, match=r"training item 1 \(b.jpg\): patient 'P2' also has c.jpg in the test"):
        check_patient_splits(train, test)
    check_patient_splits(train[:1], test)


def test_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(y, 1.0), 1)  # many ties
    assert auc_score(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(auc_score([0.1, 0.2], [1, 1]))


def test_bootstrap_interval_and_oof_summary() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    s = rng.normal(y, 1.0)
    auc, low, high = bootstrap_auc(s, y, n_bootstrap=500, seed=0)
    assert low < auc < high and high - low < 0.15
    assert bootstrap_auc(s, y, n_bootstrap=500, seed=0) == (auc, low, high)
    groups = np.repeat(np.arange(40), 10)
    cluster = bootstrap_auc(s, y, groups=groups, n_bootstrap=500, seed=0)
    assert cluster[0] == auc and cluster[1] < auc < cluster[2]
    small = bootstrap_auc(s[:60], y[:60], n_bootstrap=500, seed=0)
    assert small[2] - small[1] > high - low  # fewer samples, wider interval
    folds = np.arange(400) % 4
    summary = oof_auc_summary(s, y, folds, groups=groups, n_bootstrap=300)
    assert set(summary["per_fold"]) == {0, 1, 2, 3}
    for k, value in summary["per_fold"].items():
        assert value == pytest.approx(roc_auc_score(y[folds == k], s[folds == k]))
    assert summary["pooled"] == pytest.approx(roc_auc_score(y, s))
    assert summary["ci_low"] < summary["pooled"] < summary["ci_high"] and summary["n_positive"] == y.sum()
    with pytest.raises(ValueError, match="both classes"):
        bootstrap_auc([0.1, 0.2, 0.3], [0, 0, 0])


def test_ensemble_weights_chosen_on_oof_predictions_beat_each_model() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 600)
    signal = np.where(y == 1, 1.0, -1.0)
    full = signal + rng.normal(0, 1.5, 600)  # two models with independent errors
    crop = signal + rng.normal(0, 1.5, 600)
    noise = rng.normal(0, 1.0, 600)  # a useless third model
    result = search_ensemble_weights({"full": full, "crop": crop, "noise": noise}, y, step=0.1)
    assert sum(result.weights.values()) == pytest.approx(1.0)
    assert result.weights["full"] > 0.2 and result.weights["crop"] > 0.2 and result.weights["noise"] < 0.2
    assert result.auc > max(result.model_auc["full"], result.model_auc["crop"])
    combined = ensemble_scores({"full": full, "crop": crop, "noise": noise}, result.weights)
    assert auc_score(combined, y) == pytest.approx(result.auc)
    same = search_ensemble_weights({"a": full, "b": full.copy()}, y, step=0.25)
    assert same.weights == {"a": 0.5, "b": 0.5}  # ties resolved towards uniform weights
    with pytest.raises(ValueError, match="1 / step"):
        search_ensemble_weights({"a": full}, y, step=0.3)
    with pytest.raises(KeyError, match="'other'"):
        ensemble_scores({"a": full}, {"a": 0.5, "other": 0.5})
