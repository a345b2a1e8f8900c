"""Per-image prediction tables of the cropping and glimpse benchmarks and the paired bootstrap intervals of the
differences between methods (benchmarks/common.py, attention_crop.py, glimpse_pattern2.py)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from medgain.ensemble import ensemble_scores
from medgain.metrics import auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks import their shared module as ``common``


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _load("common")
attention_crop = _load("attention_crop")
glimpse = _load("glimpse_pattern2")


def _synthetic(n: int = 400, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels and three methods: ``weak``, ``strong`` (clearly better) and ``twin`` (``weak`` plus tiny noise)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    weak = y * 0.5 + rng.normal(0.0, 1.0, n)
    return y, {"weak": weak, "strong": y * 2.5 + rng.normal(0.0, 1.0, n), "twin": weak + rng.normal(0.0, 1e-3, n)}


def test_paired_intervals_separate_a_real_difference_from_none() -> None:
    y, scores = _synthetic()
    rows = common.paired_bootstrap_differences(
        y, scores, "weak", metrics=("auc", "accuracy"), threshold=0.5, n_bootstrap=500, seed=1
    )
    by = {(r["method"], r["metric"]): r for r in rows}
    assert set(by) == {("strong", "auc"), ("strong", "accuracy"), ("twin", "auc"), ("twin", "accuracy")}
    strong = by[("strong", "auc")]
    assert strong["value"] == pytest.approx(auc_score(scores["strong"], y))
    assert strong["difference"] == pytest.approx(auc_score(scores["strong"], y) - auc_score(scores["weak"], y))
    assert 0.0 < strong["ci_low"] < strong["difference"] < strong["ci_high"]
    accuracy = by[("strong", "accuracy")]
    expected = np.mean((scores["strong"] >= 0.5) == y) - np.mean((scores["weak"] >= 0.5) == y)
    assert accuracy["difference"] == pytest.approx(expected) and accuracy["ci_low"] > 0.0
    twin = by[("twin", "auc")]
    # pairing: the same resampled images score both, so a near-copy has a near-zero interval
    assert twin["ci_low"] <= 0.0 <= twin["ci_high"] and twin["ci_high"] - twin["ci_low"] < 0.01
    again = common.paired_bootstrap_differences(y, scores, "weak", n_bootstrap=500, seed=1)
    assert [r["ci_low"] for r in again] == [by[(r["method"], "auc")]["ci_low"] for r in again]


def test_cluster_bootstrap_is_wider_for_correlated_groups() -> None:
    y, scores = _synthetic(200, seed=3)
    # each group repeats one image five times: resampling groups is resampling 40 images, not 200
    y5 = np.repeat(y[:40], 5)
    s5 = {k: np.repeat(v[:40], 5) for k, v in scores.items()}
    groups = np.repeat(np.arange(40), 5)
    flat = common.paired_bootstrap_differences(y5, s5, "weak", n_bootstrap=400, seed=0)[0]
    grouped = common.paired_bootstrap_differences(y5, s5, "weak", groups=groups, n_bootstrap=400, seed=0)[0]
    assert grouped["ci_high"] - grouped["ci_low"] > 1.5 * (flat["ci_high"] - flat["ci_low"])


def test_paired_bootstrap_bad_input() -> None:
    y, scores = _synthetic(50)
    with pytest.raises(ValueError, match="unknown metric"):
        common.paired_bootstrap_differences(y, scores, "weak", metrics=("f1",))
    with pytest.raises(ValueError, match="reference 'none'"):
        common.paired_bootstrap_differences(y, scores, "none")
    with pytest.raises(ValueError, match="both classes"):
        common.paired_bootstrap_differences(np.zeros(50), scores, "weak")
    with pytest.raises(ValueError, match=r"\(strong\).*NaN"):
        common.paired_bootstrap_differences(y, {**scores, "strong": np.full(50, np.nan)}, "weak")


def test_prediction_tables_round_trip_join_and_errors(tmp_path: Path) -> None:
    y, scores = _synthetic(20)
    ids = [f"test{k:05d}" for k in range(20)]
    common.write_prediction_table(tmp_path / "a.csv", ids, y, {"weak": scores["weak"]})
    order = np.arange(20)[::-1]  # a second table in another row order joins on the id
    common.write_prediction_table(
        tmp_path / "b.csv", [ids[k] for k in order], y[order], {"strong": scores["strong"][order]}
    )
    got_ids, labels, got = common.read_prediction_tables([tmp_path / "a.csv", tmp_path / "b.csv"])
    assert got_ids == ids and labels.tolist() == y.tolist()
    np.testing.assert_allclose(got["strong"], scores["strong"], rtol=1e-5)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    common.write_prediction_table(tmp_path / "e.csv", ids, y, {"weak": scores["weak"]})
    with pytest.raises(ValueError, match="e.csv: method 'weak' is already"):
        common.read_prediction_tables([tmp_path / "a.csv", tmp_path / "e.csv"])
    flipped = y.copy()
    flipped[0] = 1 - flipped[0]
    common.write_prediction_table(tmp_path / "c.csv", ids, flipped, {"other": scores["weak"]})
    with pytest.raises(ValueError, match="c.csv: labels differ"):
        common.read_prediction_tables([tmp_path / "a.csv", tmp_path / "c.csv"])
    with pytest.raises(ValueError, match="clash"):
        common.write_prediction_table(tmp_path / "d.csv", ids, y, {"label": scores["weak"]})


def _fake_pipeline(root: Path) -> tuple[Path, dict]:
    """A finished attention-crop pipeline folder: 3 folds of 4 images, 4 test images, two members."""
    rng = np.random.default_rng(0)
    pipeline = root / "seed0" / "pipeline"
    images = [f"ISIC_{k:07d}" for k in range(16)]
    folds = [k % 3 for k in range(12)] + [-1] * 4
    labels = [k % 2 for k in range(16)]
    patients = [f"IP_{k // 2:07d}" for k in range(16)]
    (pipeline / "ensemble").mkdir(parents=True)
    weights = {"full": 0.25, "crop": 0.75}
    (pipeline / "ensemble" / "summary.json").write_text(json.dumps({"weights": weights}))
    with (pipeline / "folds.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "patient", "label", "fold"])
        writer.writerows(
            [f"/data/{i}.jpg", p, y, k] for i, p, y, k in zip(images, patients, labels, folds)
        )
    truth: dict[str, np.ndarray] = {}
    for model, stage in (("full", "full"), ("crop", "cropnet")):
        scores = np.zeros(16)
        for fold in range(3):
            oof = pipeline / stage / "outputs" / "oof" / f"fold{fold}.csv"
            oof.parent.mkdir(parents=True, exist_ok=True)
            rows = [k for k in range(12) if folds[k] == fold]
            scores[rows] = rng.normal(size=len(rows)) + np.asarray(labels)[rows]
            oof.write_text("file,score,label\n" + "".join(f"{images[k]}.jpg,{scores[k]},{labels[k]}\n" for k in rows))
            test = pipeline / stage / "outputs" / f"fold{fold}" / "evaluation" / "predictions.csv"
            test.parent.mkdir(parents=True)
            per_model = rng.normal(size=4)
            scores[12:] += per_model / 3.0
            test.write_text("file,score\n" + "".join(f"{images[12 + k]}.jpg,{per_model[k]}\n" for k in range(4)))
        truth[model] = scores
    truth["ensemble"] = ensemble_scores(truth, weights)
    return pipeline, {"labels": labels, "patients": patients, "scores": truth}


def test_attention_crop_per_image_table_and_differences(tmp_path: Path) -> None:
    pipeline, truth = _fake_pipeline(tmp_path)
    table = attention_crop.per_image_predictions(pipeline)
    assert table["ids"] == [f"img{k:04d}" for k in range(16)]
    assert table["splits"] == ["oof"] * 12 + ["test"] * 4
    assert table["labels"].tolist() == truth["labels"]
    assert table["groups"][:4] == ["pat0000", "pat0000", "pat0001", "pat0001"]
    for model in ("full", "crop", "ensemble"):
        np.testing.assert_allclose(table["scores"][model], truth["scores"][model])
    rows = attention_crop.seed_differences(pipeline.parent, n_bootstrap=200, seed=0)
    assert {(r["where"], r["method"], r["metric"]) for r in rows} == {
        (f"seed 0, {split}", m, metric)
        for split in ("oof", "test") for m in ("crop", "ensemble") for metric in ("auc", "accuracy")
    }
    text = (pipeline.parent / "per_image.csv").read_text()
    assert text.splitlines()[0] == "id,label,group,split,full,crop,ensemble"
    assert "ISIC" not in text and "IP_" not in text and "/data" not in text  # no file names or patient ids
    (pipeline / "cropnet" / "outputs" / "fold1" / "evaluation" / "predictions.csv").unlink()
    with pytest.raises(ValueError, match="2 of 3 fold models predicted test image ISIC_0000012"):
        attention_crop.per_image_predictions(pipeline)


def test_glimpse_benchmark_writes_predictions_and_compares(tmp_path: Path) -> None:
    tiny = ["--size", "32", "--n-train", "8", "--n-val", "4", "--n-test", "8", "--epochs", "1", "--batch-size", "4",
            "--hidden-size", "16", "--context-size", "16", "--num-glimpses", "2", "--glimpse-size", "8"]
    glimpse.main([*tiny, "--out", str(tmp_path / "base.json")])
    glimpse.main([*tiny, "--location-weight", "0", "--out", str(tmp_path / "none.json")])
    summary = json.loads((tmp_path / "base.json").read_text())
    with (tmp_path / "base.predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [f"32rgb-{k:05d}" for k in range(8)]
    assert [int(r["label"]) for r in rows] == [k % 2 for k in range(8)]
    probs = np.asarray([float(r["base"]) for r in rows])
    assert ((probs >= 0) & (probs <= 1)).all()
    assert summary["best"]["accuracy"] == pytest.approx(np.mean((probs >= 0.5) == np.arange(8) % 2))
    glimpse.main(["--compare", str(tmp_path / "base.predictions.csv"), str(tmp_path / "none.predictions.csv"),
                  "--reference", "base", "--n-bootstrap", "100", "--out", str(tmp_path / "compare.json")])
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["tables"] == ["base.predictions.csv", "none.predictions.csv"]
    assert {(r["method"], r["metric"]) for r in result["differences"]} == {
        (m, metric) for m in ("base@final", "none", "none@final") for metric in ("auc", "accuracy")
    }
    with pytest.raises(SystemExit):
        glimpse.main(["--compare", str(tmp_path / "base.predictions.csv"), "--out", str(tmp_path / "x.json")])
    # a run on other test images (grey) does not join
    glimpse.main([*tiny, "--grey", "--out", str(tmp_path / "grey.json")])
    with pytest.raises(ValueError, match="grey.predictions.csv: lists other images"):
        glimpse.main(["--compare", str(tmp_path / "base.predictions.csv"), str(tmp_path / "grey.predictions.csv"),
                      "--reference", "base", "--out", str(tmp_path / "x.json")])
