"""Issue 20 §1: an operating point states what it is worth (the Clopper–Pearson bound of its false-alarm rate)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TinyNet
from ignite.engine import Engine
from scipy.stats import beta

from medgain.handlers import BestModelSaver, OperatingPointMetrics, TPRAtFPR, glimpse_metrics
from medgain.handlers.model_registration import describe_model
from medgain.metrics import format_percent_upper, fpr_upper_bound, negatives_needed, operating_point_words
from medgain.model_file import load_operating_point
from medgain.registry.review import _bound_check, model_card
from medgain.wsi.evaluate import slide_operating_point

SENTENCE_28 = (
    "chosen on 28 normal frames: its false-alarm rate is only known to be ≤ 10.2 %; the 0.1 % budget needs ≥ 2,995"
)


def test_clopper_pearson_bound_and_negatives_needed() -> None:
    assert fpr_upper_bound(0, 28) == pytest.approx(0.10147, abs=1e-5)
    assert format_percent_upper(fpr_upper_bound(0, 28)) == "10.2 %"  # rounded up: a bound is never understated
    assert fpr_upper_bound(0, 3000) == pytest.approx(0.000998, abs=1e-6)
    assert format_percent_upper(fpr_upper_bound(0, 3000)) == "0.10 %"
    assert negatives_needed(0.001) == 2995 and negatives_needed(0.0005) == 5990
    assert fpr_upper_bound(0, 2995) <= 0.001 < fpr_upper_bound(0, 2994)
    for k, n in [(1, 500), (5, 100), (3, 1_000_000), (40, 41)]:  # the exact beta quantile
        assert fpr_upper_bound(k, n) == pytest.approx(beta.ppf(0.95, k + 1, n - k), rel=1e-9)
    assert fpr_upper_bound(7, 7) == 1.0
    with pytest.raises(ValueError, match="0 <= false_alarms <= negatives"):
        fpr_upper_bound(3, 2)
    with pytest.raises(ValueError, match="max_fpr must be in"):
        negatives_needed(0.0)


def test_operating_point_words() -> None:
    point = {"threshold": 2.0, "max_fpr": 0.001, "negatives": 28, "false_alarms": 0, "unit": "normal frames"}
    assert operating_point_words(point) == SENTENCE_28
    backed = {**point, "negatives": 3000}
    assert operating_point_words(backed) == (
        "chosen on 3,000 normal frames with 0 false alarms: its false-alarm rate is ≤ 0.10 % (95 % confidence), "
        "within the 0.1 % budget"
    )
    assert "with 2 false alarms: its false-alarm rate is only known to be ≤ 1.3 %" in operating_point_words(
        {**point, "negatives": 500, "false_alarms": 2}
    )
    old = {"threshold": 2.0, "max_fpr": 0.001, "metric": "val_tpr_at_fpr_0.001", "value": 0.8}
    assert operating_point_words(old).startswith("the false-alarm rate of this operating point is unknown")
    assert operating_point_words({"threshold": None, "reason": "single class"}).startswith("no operating point")


def _validation_round(tmp_path: Path, negatives: int, unit: str = "normal frames") -> BestModelSaver:
    """One validation round through TPRAtFPR (all negatives below every positive) into a BestModelSaver."""
    margins = torch.cat([torch.linspace(-5.0, -1.0, negatives), torch.linspace(1.0, 5.0, 10)])
    labels = torch.tensor([0] * negatives + [1] * 10)
    batch = {"pred": torch.stack([torch.zeros_like(margins), margins], 1), "label": labels}
    engine = Engine(lambda e, b: b)
    TPRAtFPR(max_fpr=0.001).attach(engine, "val_tpr_at_fpr_0.001")
    engine.state.metrics = {}
    saver = BestModelSaver(str(tmp_path), TinyNet(), tie_breaker=None, unit=unit)
    saver.attach(engine)
    engine.run([batch], max_epochs=1)
    return saver


def test_best_model_file_carries_the_counts_and_the_bound(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="medgain.handlers.best_checkpoint"):
        saver = _validation_round(tmp_path, 28)
    point = load_operating_point(saver.checkpoint_path)
    assert (point["negatives"], point["positives"], point["false_alarms"]) == (28, 10, 0)
    assert point["fpr_upper"] == pytest.approx(0.10147, abs=1e-5) and point["confidence"] == 0.95
    assert point["statement"] == SENTENCE_28
    assert SENTENCE_28 in caplog.text  # a budget the validation split cannot back is said at training time
    card = describe_model(torch.load(saver.checkpoint_path, weights_only=True), "run")
    assert SENTENCE_28 in card  # the registered version's description


def test_older_model_file_still_loads_and_says_the_bound_is_unknown(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"model": {}, "operating_point": {"threshold": 0.0, "max_fpr": 0.001, "metric": "m", "value": 1.0}},
               path)
    point = load_operating_point(path)
    assert point["threshold"] == 0.0 and "unknown" in point["statement"]
    metrics = _evaluate(path, false_alarms=2, negatives=10)
    assert math.isnan(metrics["test_fpr_upper"]) and math.isnan(metrics["test_fpr_above_bound"])


def _evaluate(checkpoint: Path, false_alarms: int, negatives: int) -> dict[str, float]:
    """Test figures at the stored threshold (0) of ``checkpoint``: ``false_alarms`` negatives score above it."""
    margins = torch.tensor([1.0] * false_alarms + [-1.0] * (negatives - false_alarms) + [2.0] * 5)
    labels = torch.tensor([0] * negatives + [1] * 5)
    engine = Engine(lambda e, b: b)
    metric = OperatingPointMetrics("test", checkpoint=str(checkpoint))
    metric.attach(engine, metric.names[0])
    engine.run([{"pred": torch.stack([torch.zeros_like(margins), margins], 1), "label": labels}], max_epochs=1)
    return {**engine.state.metrics, "notes": getattr(engine.state, "metric_notes", {})}


def test_evaluation_flags_a_test_rate_above_the_stored_bound(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saver = _validation_round(tmp_path, 28)
    checkpoint = torch.load(saver.checkpoint_path, weights_only=True)
    checkpoint["operating_point"]["threshold"] = 0.0
    torch.save(checkpoint, saver.checkpoint_path)
    with caplog.at_level(logging.WARNING, logger="medgain.handlers.operating_point"):
        flagged = _evaluate(saver.checkpoint_path, false_alarms=200, negatives=1000)  # 20 % > 10.2 %
    assert flagged["test_fpr_upper"] == pytest.approx(0.10147, abs=1e-5)
    assert flagged["test_fpr_above_bound"] == 1.0 and flagged["test_specificity"] == pytest.approx(0.8)
    assert "200 of 1,000 (20.0 %), is above the bound" in flagged["notes"]["test_fpr_above_bound"]
    assert "is above the bound" in caplog.text
    assert flagged["notes"]["test_fpr_upper"] == f"stored operating point {SENTENCE_28}"
    held = _evaluate(saver.checkpoint_path, false_alarms=5, negatives=1000)
    assert held["test_fpr_above_bound"] == 0.0 and "test_fpr_above_bound" not in held["notes"]
    checkpoint["operating_point"].update(negatives=3000, fpr_upper=fpr_upper_bound(0, 3000), statement=None)
    torch.save(checkpoint, saver.checkpoint_path)
    backed = _evaluate(saver.checkpoint_path, false_alarms=0, negatives=1000)
    assert backed["test_fpr_upper"] <= 0.001 and backed["notes"] == {}  # a backed budget is no warning


def test_review_gate_value_and_model_card_state_the_bound(tmp_path: Path) -> None:
    saver = _validation_round(tmp_path, 28)
    checkpoint = torch.load(saver.checkpoint_path, weights_only=True)
    point = checkpoint["operating_point"]
    values, note = _bound_check(point, {"specificity": {"value": 0.8}}, "test")
    assert values["operating_point_fpr_upper"] == pytest.approx(0.10147, abs=1e-5)
    assert values["test_fpr_above_bound"] == 1.0 and "is above the bound" in note
    old_values, _ = _bound_check({"threshold": 1.0, "max_fpr": 0.001}, {"specificity": {"value": 0.8}}, "test")
    assert math.isnan(old_values["operating_point_fpr_upper"])  # unknown: a rule on it cannot pass
    run = SimpleNamespace(data=SimpleNamespace(tags={}, params={}), info=SimpleNamespace(run_name="r"))
    client = SimpleNamespace(get_run=lambda run_id: run)
    version = SimpleNamespace(name="m", version=1, run_id="x", tags={})
    layout = SimpleNamespace(local_params=set(), identity=lambda: "another data set")
    bundle = Path(__file__).resolve().parents[1] / "bundles" / "capsule_endoscopy_gain"
    card = model_card(client, version, checkpoint, bundle, layout)
    assert card["operating_point"].endswith(SENTENCE_28)
    assert card["operating_point_fpr_upper"] == pytest.approx(0.10147, abs=1e-5)


def test_slides_are_decided_at_the_stored_point_and_flagged_above_its_bound() -> None:
    point = {"threshold": 0.0, "max_fpr": 0.001, "negatives": 3000, "false_alarms": 0, "fpr_upper": 0.001}
    scores, labels = [2.0, -1.0, 0.5, -2.0, -3.0, 1.0], [1, 1, 0, 0, 0, 0]
    # normal slides of 100 patches may be flagged at most min(1, 100 * 0.001) = 10 % of the time; 2 of 4 were
    figures, note = slide_operating_point(scores, labels, [100] * 6, point)
    assert figures["slide_sensitivity"] == 0.5 and figures["slide_specificity"] == 0.5
    assert figures["slide_false_alarms"] == 2 and figures["slide_fpr_upper"] == pytest.approx(0.1)
    assert figures["slide_fpr_above_bound"] == 1.0 and "2 of 4 normal slides flagged" in note
    held, note = slide_operating_point(scores, labels, [1000] * 6, point)  # 1,000 patches: any rate is allowed
    assert held["slide_fpr_above_bound"] == 0.0 and note == ""
    unknown, _ = slide_operating_point(scores, labels, [100] * 6, {"threshold": 0.0, "max_fpr": 0.001})
    assert unknown["slide_false_alarms"] == 2 and math.isnan(unknown["slide_fpr_above_bound"])


def test_glimpse_evaluation_decides_at_the_stored_point(tmp_path: Path) -> None:
    saver = _validation_round(tmp_path, 28)
    key, metrics = glimpse_metrics("test", 2, "test_auc", checkpoint=str(saver.checkpoint_path))
    at_point = metrics["test_sensitivity"]
    assert isinstance(at_point, OperatingPointMetrics) and "test_fpr_above_bound" in at_point.names
    assert "test_accuracy" not in metrics  # the accuracy is the stored point's, not the one at p = 0.5
    assert "val_accuracy" in glimpse_metrics("val", 2)[1]
