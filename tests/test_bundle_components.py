"""Components the bundles wire: failure handling, resumable best checkpoint, study-split check, config strings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import TinyNet, blob_batch, run_gain_iteration
from ignite.engine import Engine
from monai.handlers import MLFlowHandler

from medgain.data.capsule import check_study_splits
from medgain.data.phi import frame_ref
from medgain.handlers import BestModelSaver, GAINHandler, TrainingFailureHandler


def test_failure_handler_saves_checkpoint_and_marks_run_failed_with_root_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDGAIN_PHI_SALT", "failure-salt")
    net = TinyNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow_handler = MLFlowHandler(tracking_uri=uri, experiment_name="t", run_name="r", iteration_log=False)

    def step(engine: Engine, batch: int) -> None:
        if engine.state.iteration == 3:
            try:
                raise ValueError("frames/a.png: cannot decode image")
            except ValueError as err:
                raise RuntimeError("applying transform <LoadFramed>") from err

    engine = Engine(step)
    TrainingFailureHandler(mlflow_handler, tmp_path / "models", {"model": net, "optimizer": opt}).attach(engine)
    mlflow_handler.attach(engine)
    with pytest.raises(RuntimeError, match="applying transform"):
        engine.run(range(5), max_epochs=1)
    saved = torch.load(tmp_path / "models" / "checkpoint_last.pt", weights_only=False)
    assert set(saved) == {"model", "optimizer", "trainer"} and saved["trainer"]["iteration"] == 3
    run = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("t").experiment_id])[0]
    # the root cause, its file named by pseudonym (the local log keeps the path)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == f"ValueError: {frame_ref('frames/a.png')}: cannot decode image"


def _round(epoch: int, tpr: float, auc: float) -> Engine:
    engine = Engine(lambda e, b: None)
    engine.state.epoch = epoch
    engine.state.metrics = {"val_tpr_at_fpr_0.001": tpr, "val_auc": auc, "val_tpr_at_fpr_0.001_threshold": 0.7}
    return engine


def _evaluator_round(saver: BestModelSaver, epoch: int, tpr: float, auc: float) -> None:
    saver(_round(epoch, tpr, auc))


def test_best_checkpoint_survives_a_resume(tmp_path: Path) -> None:
    net = TinyNet()
    first = BestModelSaver(str(tmp_path), net)
    _evaluator_round(first, 1, 0.5, 0.9)
    resumed = BestModelSaver(str(tmp_path), net, resume=True)
    _evaluator_round(resumed, 2, 0.4, 0.95)  # worse: the saved best of the first run stays
    assert torch.load(tmp_path / "model.pt", weights_only=True)["epoch"] == 1
    _evaluator_round(resumed, 3, 0.5, 0.96)  # equal TPR, better AUC: replaces it
    assert torch.load(tmp_path / "model.pt", weights_only=True)["epoch"] == 3
    fresh = BestModelSaver(str(tmp_path), net)  # without resume a new run starts its own record
    _evaluator_round(fresh, 1, 0.1, 0.5)
    assert torch.load(tmp_path / "model.pt", weights_only=True)["epoch"] == 1


def test_study_spanning_two_splits_is_rejected(tmp_path: Path) -> None:
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"study": "s1"}, {"study": "s2"}], "test": [{"study": "s2"}]}))
    with pytest.raises(ValueError, match="study 's2' appears in both 'training' and 'test'"):
        check_study_splits(datalist)
    datalist.write_text(json.dumps({"training": [{"study": "s1"}], "test": [{"study": "s2"}, {}]}))
    check_study_splits(datalist)


def test_gain_options_from_a_command_line_and_empty_masks_skipped() -> None:
    assert math.isinf(GAINHandler("features.act2", grad_magnitude="inf").grad_magnitude)
    batch = blob_batch(4, seed=2, pos_rate=1.0)
    batch["mask"][:] = 0.0  # positives flagged as masked but with empty masks contribute no extra supervision
    out = run_gain_iteration(TinyNet(num_classes=2), batch, GAINHandler("features.act2", am_weight=0.0))
    assert out["loss_ex"].item() == 0.0


def test_classification_metric_set_names_validation_and_at_the_stored_operating_point(tmp_path: Path) -> None:
    from medgain.handlers import ClassificationMetrics

    val = ClassificationMetrics("val")
    assert set(val.names) == {
        "val_tpr_at_fpr_0.001", "val_tpr_at_fpr_0.0005", "val_auc", "val_iou", "val_attention_in_mask", "val_accuracy"
    }
    BestModelSaver(str(tmp_path), TinyNet(), tie_breaker=None)(_round(1, 0.5, 0.9))
    test = ClassificationMetrics("test", checkpoint=str(tmp_path / "model.pt"))
    assert set(test.names) == {  # re-tuned TPRs under their own names; the headline at the shipped threshold
        "test_retuned_tpr_at_fpr_0.001", "test_retuned_tpr_at_fpr_0.0005", "test_auc", "test_iou",
        "test_attention_in_mask", "test_sensitivity", "test_specificity", "test_false_alarms",
        "test_false_alarms_per_1000", "test_accuracy", "test_fpr_upper", "test_fpr_above_bound",
    }


def test_erase_fill_passes_explicit_colours_and_rejects_unknown_words(tmp_path: Path) -> None:
    from medgain.data import erase_fill

    assert erase_fill([0.1, 0.2, 0.3], [], tmp_path, [1]) == [0.1, 0.2, 0.3]
    assert erase_fill(0.0, [], tmp_path, [1]) == 0.0
    with pytest.raises(ValueError, match="fill must be 'auto'"):
        erase_fill("mean", [], tmp_path, [1])
