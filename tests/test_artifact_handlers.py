"""Artifact / output handlers driven through a real MONAI evaluator and a real SQLite MLflow store."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TinyNet
from ignite.engine import Engine, Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.handlers import MLFlowHandler
from PIL import Image
from sklearn.metrics import roc_curve as sk_roc_curve

from medgain.attention import grad_cam, normalize_cam
from medgain.data.phi import frame_ref
from medgain.handlers.attention_overlay import AttentionOverlaySaver
from medgain.handlers.best_checkpoint import BestModelSaver
from medgain.handlers.model_registration import ModelRegistration
from medgain.handlers.cam_inferer import GradCamInferer
from medgain.handlers.heatmap_writer import HeatmapWriter
from medgain.handlers.metrics_json import MetricsJSONWriter
from medgain.handlers.prediction_writer import PredictionCSVWriter
from medgain.handlers.roc_plot import ROCCurveSaver
from medgain.handlers.utils import attach_once
from medgain.metrics import operating_point, operating_point_words, roc_curve, tpr_at_fpr
from medgain.metrics.scores import positive_score
from medgain.model_file import load_model_weights, load_operating_point
from medgain.visualize import cam_overlay, colorize, to_display_rgb

LAYER = "features.act2"
LABELS = [0, 1, 0, 1, 1, 0, 1, 0]
HAS_MASK = [False, True, False, False, True, False, True, False]


def _samples(root: Path, labels: list[int] = LABELS, with_labels: bool = True) -> list[dict[str, Any]]:
    """32x32 frames; ill ones carry a bright blob, some with its mask. Samples 0 and 1 share a stem."""
    g = torch.Generator().manual_seed(0)
    paths = [root / "a" / "frame.png", root / "b" / "frame.png"] + [root / "clip.dcm"] * 3 + [
        root / f"img{i}.png" for i in range(5, len(labels))
    ]
    frames = [0, 0, 0, 1, 2] + [0] * (len(labels) - 5)
    out = []
    for i, label in enumerate(labels):
        image = torch.rand(3, 32, 32, generator=g) * 0.5
        mask = torch.zeros(1, 32, 32)
        if label:
            r, c = torch.randint(0, 24, (2,), generator=g).tolist()
            image[0, r : r + 8, c : c + 8] += 0.5
            mask[:, r : r + 8, c : c + 8] = 1.0 if HAS_MASK[i] else 0.0
        sample = {"image": image, "mask": mask, "has_mask": HAS_MASK[i] and bool(label)}
        sample.update(image_path=str(paths[i]), frame=frames[i])
        if with_labels:
            sample["label"] = label
        out.append(sample)
    return out


def _net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(num_classes=2)


class SetMetrics:
    """Writes a given dict of metrics into ``engine.state.metrics`` at the end of each round, by epoch."""

    def __init__(self, by_epoch: dict[int, dict[str, float]]) -> None:
        self.by_epoch = by_epoch

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        engine.state.metrics = dict(self.by_epoch[engine.state.epoch])


def _evaluator(
    samples: list[dict[str, Any]], handlers: list[Any], net: torch.nn.Module | None = None
) -> SupervisedEvaluator:
    inferer = GradCamInferer(LAYER)
    return SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(samples, batch_size=3, shuffle=False, num_workers=0),
        network=net if net is not None else _net(),
        inferer=inferer,
        decollate=False,
        val_handlers=[inferer, *handlers],
    )


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def _mlflow(uri: str, run_name: str) -> MLFlowHandler:
    return MLFlowHandler(
        tracking_uri=uri, experiment_name="artifact-handlers", run_name=run_name, iteration_log=False, epoch_log=False
    )


def _artifacts(uri: str, handler: MLFlowHandler, path: str | None = None) -> set[str]:
    return {f.path for f in mlflow.MlflowClient(uri).list_artifacts(handler.cur_run.info.run_id, path)}


def _expected(samples: list[dict[str, Any]], net: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-odds of being ill and normalised cam of every sample, computed directly."""
    net.eval()
    logits, cam = grad_cam(net, torch.stack([s["image"] for s in samples]), LAYER)
    return positive_score(logits), normalize_cam(cam.detach())


def _engine(metrics: dict[str, Any], epoch: int) -> Engine:
    engine = Engine(lambda e, b: None)
    engine.state.metrics, engine.state.epoch = metrics, epoch
    return engine


def test_visualize_overlay_blends_image_and_jet_colour() -> None:
    image = torch.rand(3, 8, 8)
    cam = torch.linspace(0, 1, 64).reshape(1, 8, 8)
    np.testing.assert_array_equal(cam_overlay(image, cam, alpha=0.0), np.round(image.permute(1, 2, 0).numpy() * 255))
    jet = colorize(cam)
    assert jet.shape == (8, 8, 3) and np.allclose(jet[0, 0], [0, 0, 0.5], atol=0.01)  # jet starts dark blue
    assert np.allclose(jet[-1, -1], [0.5, 0, 0], atol=0.01)  # and ends dark red
    np.testing.assert_array_equal(cam_overlay(image, cam, alpha=1.0), np.round(jet * 255))
    grey = to_display_rgb(torch.tensor([[[-2.0, 2.0]]]))  # out of [0, 1]: min-max scaled, grey -> RGB
    np.testing.assert_allclose(grey, [[[0, 0, 0], [1, 1, 1]]])
    with pytest.raises(ValueError, match="size"):
        cam_overlay(image, torch.rand(1, 4, 4))


def test_attention_overlay_keeps_a_fixed_sample_set_and_logs_each_round(tmp_path: Path, tracking_uri: str) -> None:
    samples = _samples(tmp_path)
    ml = _mlflow(tracking_uri, "overlay")
    saver = AttentionOverlaySaver(str(tmp_path / "out"), num_positives=2, num_negatives=3, mlflow_handler=ml)
    evaluator = _evaluator(samples, [ml, saver])
    chosen = []
    for epoch in (1, 2):
        evaluator.run(global_epoch=epoch)
        kept = saver.samples
        chosen.append([next(i for i, s in enumerate(samples) if torch.equal(s["image"], k["image"])) for k in kept])
    assert chosen[0] == chosen[1] == [0, 1, 2, 3, 5]  # first 2 ill (1, 3) and first 3 healthy (0, 2, 5)
    by_index = dict(zip(chosen[0], saver.samples))
    assert by_index[1]["mask"] is not None and by_index[3]["mask"] is None  # sample 3 has no real mask
    assert [by_index[i]["ill"] for i in (0, 1)] == [False, True]
    net = evaluator.network.eval()
    _, raw = grad_cam(net, torch.stack([samples[i]["image"] for i in chosen[0]]), LAYER)
    for sample, cam in zip(saver.samples, raw):  # compact CPU copies, not views into whole batches
        assert sample["image"].untyped_storage().nbytes() == 3 * 32 * 32 * 4
        torch.testing.assert_close(sample["cam"], cam[0].detach())  # raw: one common scale, not per-frame maxima
    ids = [(s["image_path"], s["frame"]) for s in samples]
    assert [s["id"] for s in saver.samples] == [frame_ref(*ids[i]) for i in chosen[0]]  # pseudonyms, no file names
    for epoch in (1, 2):
        with Image.open(tmp_path / "out" / "attention" / f"validation_epoch_{epoch:03d}.png") as png:
            assert png.size == (1280, 1310)  # a grid of 4 columns of 2.9 in + a colour bar, 2 rows of 6.1 in, 100 dpi
    assert _artifacts(tracking_uri, ml, "attention") == {
        "attention/validation_epoch_001.png", "attention/validation_epoch_002.png"
    }
    ml.close()


def test_roc_curve_is_the_exact_step_function() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) * 0.5 + 0.3 * labels, 2)  # many ties
    fpr, tpr, thresholds = roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_array_equal(thresholds, sk_thr)
    for max_fpr in (0.0, 0.01, 0.2):
        p_fpr, p_tpr, p_thr = operating_point(fpr, tpr, thresholds, max_fpr)
        predicted = scores >= p_thr
        assert p_fpr <= max_fpr and p_fpr == predicted[labels == 0].mean() and p_tpr == predicted[labels == 1].mean()
        assert p_tpr == sk_tpr[sk_fpr <= max_fpr].max()
        assert tpr_at_fpr(scores, labels, max_fpr) == (p_tpr, p_thr)
    with pytest.raises(ValueError, match="both classes"):
        roc_curve(scores[labels == 1], labels[labels == 1])
    with pytest.raises(ValueError, match=r"roc_curve: labels must be 0 or 1, found \[2\]"):
        roc_curve(np.array([0.2, 0.7]), np.array([0, 2]))
    with pytest.raises(ValueError, match="roc_curve: 1 scores are NaN or infinite"):
        roc_curve(np.array([0.2, np.inf]), np.array([0, 1]))
    with pytest.raises(ValueError, match="roc_curve: 3 scores but 2 labels"):
        roc_curve(np.array([0.2, 0.3, 0.4]), np.array([0, 1]))


def test_attach_once_adds_each_handler_once() -> None:
    calls: list[Engine] = []
    engine = Engine(lambda e, batch: batch)
    for _ in range(2):  # a fresh bound method each time, as with a handler's self.write
        attach_once(engine, [(Events.ITERATION_COMPLETED, calls.append), (Events.COMPLETED, calls.append)])
    engine.run([1, 2, 3], max_epochs=1)
    assert len(calls) == 4


def test_roc_curve_saver_writes_plot_and_table(tmp_path: Path, tracking_uri: str) -> None:
    samples, net = _samples(tmp_path), _net()
    ml = _mlflow(tracking_uri, "roc")
    _evaluator(samples, [ml, ROCCurveSaver(str(tmp_path / "roc"), mlflow_handler=ml)], net).run(global_epoch=4)
    with Image.open(tmp_path / "roc" / "roc_validation_epoch_004.png") as png:
        assert png.size == (1000, 560)  # the legend under the two plots
    with open(tmp_path / "roc" / "roc_validation_epoch_004.csv") as f:
        rows = list(csv.DictReader(f))
    score, _ = _expected(samples, net)
    fpr, tpr, thresholds = roc_curve(score, torch.tensor(LABELS))
    np.testing.assert_allclose([float(r["fpr"]) for r in rows], fpr)
    np.testing.assert_allclose([float(r["tpr"]) for r in rows], tpr)
    np.testing.assert_allclose([float(r["threshold"]) for r in rows], thresholds, rtol=1e-12)
    np.testing.assert_allclose([float(r["probability"]) for r in rows], 1 / (1 + np.exp(-thresholds)), rtol=1e-12)
    assert rows[0]["threshold"] == "inf" and float(rows[-1]["tpr"]) == 1.0
    assert _artifacts(tracking_uri, ml, "roc") == {
        "roc/roc_validation_epoch_004.png", "roc/roc_validation_epoch_004.csv"
    }
    ml.close()


def test_roc_curve_saver_single_class_writes_a_note(tmp_path: Path) -> None:
    samples = _samples(tmp_path, labels=[0, 0, 0, 0])
    with pytest.warns(UserWarning, match="0 ill and 4 healthy"):
        _evaluator(samples, [ROCCurveSaver(str(tmp_path))]).run(global_epoch=2)
    assert "needs both" in (tmp_path / "roc_validation_epoch_002.txt").read_text()
    assert not (tmp_path / "roc_validation_epoch_002.png").exists()


SPEC = {"network": "small_cnn", "num_classes": 2, "image_size": 32, "class_names": ["normal", "lesion"]}


def test_best_model_saver_keeps_the_best_round_and_registration_adds_one_version(
    tmp_path: Path, tracking_uri: str
) -> None:
    nan = math.nan
    schedule = {  # epoch: (tpr, auc, threshold)
        1: (nan, nan, nan),  # first round always saved
        2: (0.5, 0.7, 0.6),  # a number beats NaN
        3: (0.5, 0.8, 0.55),  # equal TPR, better AUC
        4: (0.4, 0.9, 0.3),  # worse TPR
        5: (nan, 0.99, 0.2),  # NaN never better
        6: (0.5, 0.8, 0.1),  # exactly equal: not better
    }
    metrics = {
        e: {"val_tpr_at_fpr_0.001": t, "val_auc": a, "val_tpr_at_fpr_0.001_threshold": thr}
        for e, (t, a, thr) in schedule.items()
    }
    net = _net()
    ml = _mlflow(tracking_uri, "best")
    saver = BestModelSaver(str(tmp_path / "ckpt"), net, mlflow_handler=ml, model_spec=SPEC)
    evaluator = _evaluator(_samples(tmp_path)[:3], [ml, SetMetrics(metrics), saver], net)
    saved = []
    for epoch in schedule:
        with torch.no_grad():
            net.head[2].bias.fill_(float(epoch))  # identifies the weights of each round
        evaluator.run(global_epoch=epoch)
        saved.append(torch.load(saver.checkpoint_path, weights_only=True))
    assert [c["epoch"] for c in saved] == [1, 2, 3, 3, 3, 3]
    assert saved[0]["operating_point"]["threshold"] is None  # never a NaN / infinite threshold
    assert "single class" in saved[0]["operating_point"]["reason"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.pt", "model_metrics.json"]  # no temp
    checkpoint = saved[-1]
    assert torch.equal(checkpoint["model"]["head.2.bias"], torch.full((2,), 3.0))
    assert checkpoint["operating_point"] == {
        "threshold": 0.55,
        "probability": pytest.approx(1 / (1 + math.exp(-0.55))),
        "max_fpr": 0.001,
        "metric": "val_tpr_at_fpr_0.001",
        "value": 0.5,
        "unit": "healthy validation samples",
        "statement": operating_point_words({"threshold": 0.55, "max_fpr": 0.001}),  # no counts in these metrics
    }
    assert checkpoint["metrics"] == metrics[3]
    assert checkpoint["model_spec"]["image_size"] == [32, 32] and checkpoint["model_spec"]["target_layer"] == "features.3"
    summary = json.loads((tmp_path / "ckpt" / "model_metrics.json").read_text())
    assert summary["epoch"] == 3 and summary["operating_point"]["threshold"] == 0.55
    assert _artifacts(tracking_uri, ml, "checkpoint") == {"checkpoint/model.pt", "checkpoint/model_metrics.json"}
    client = mlflow.MlflowClient(tracking_uri)
    assert client.search_model_versions("name='medgain-test-model'") == []  # nothing registered per round

    trainer = _engine({}, epoch=6)
    registration = ModelRegistration(saver, ml, "medgain-test-model", tags={"bundle": "test"})
    registration(trainer)
    registration(trainer)  # the same run completing again (resumed, or the record sent twice): still one version
    versions = sorted(client.search_model_versions("name='medgain-test-model'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1"] and versions[-1].run_id == ml.cur_run.info.run_id
    aliases = client.get_registered_model("medgain-test-model").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"candidate": "1"}
    assert versions[-1].tags["operating_point.threshold"] == "0.55" and versions[-1].tags["bundle"] == "test"
    assert "epoch 3" in versions[-1].description and "p >= 0.634" in versions[-1].description
    run = client.get_run(ml.cur_run.info.run_id)
    assert run.data.metrics["best_epoch"] == 3 and run.data.metrics["best_val_auc"] == 0.8
    assert run.data.tags["registered_model"] == "medgain-test-model v1"
    assert versions[-1].source.endswith(f"{ml.cur_run.info.run_id}/artifacts/model")
    local = client.download_artifacts(ml.cur_run.info.run_id, "model", str(tmp_path / "dl"))
    assert (Path(local) / "data" / "model.pt2").is_file() and not (Path(local) / "data" / "model.pth").exists()
    loaded = mlflow.pytorch.load_model(local)  # torch.export's graph format: nothing is unpickled
    assert torch.equal(loaded.get_parameter("head.2.bias"), torch.full((2,), 3.0))
    info = mlflow.models.Model.load(local)
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 32, 32]
    assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 2]
    assert torch.load(saver.checkpoint_path, weights_only=True)["provenance"] == {
        "run_id": ml.cur_run.info.run_id, "model_name": "medgain-test-model", "model_version": "1"
    }
    fresh = _net()
    assert load_model_weights(fresh, saver.checkpoint_path)["epoch"] == 3
    assert torch.equal(fresh.head[2].bias, torch.full((2,), 3.0))
    assert load_operating_point(saver.checkpoint_path)["threshold"] == 0.55
    ml.close()


def test_a_model_without_operating_point_is_registered_as_such_and_takes_no_decisions(
    tmp_path: Path, tracking_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    net = _net()
    ml = _mlflow(tracking_uri, "no-point")
    saver = BestModelSaver(str(tmp_path / "ckpt"), net, tie_breaker=None, mlflow_handler=ml, model_spec=SPEC)
    # TPR 0 at the budget: the TPR handler leaves the (infinite) threshold out of the metrics
    evaluator = _evaluator(_samples(tmp_path)[:3], [ml, SetMetrics({1: {"val_tpr_at_fpr_0.001": 0.0}}), saver], net)
    evaluator.run()
    point = load_operating_point(saver.checkpoint_path)
    assert point["threshold"] is None and "TPR > 0" in point["reason"]
    ModelRegistration(saver, ml, "medgain-no-point")(_engine({}, epoch=1))
    (version,) = mlflow.MlflowClient(tracking_uri).search_model_versions("name='medgain-no-point'")
    assert version.tags["operating_point"].startswith("none: no finite threshold")
    assert "NO OPERATING POINT" in version.description
    writer = PredictionCSVWriter(str(tmp_path / "pred"), checkpoint=str(saver.checkpoint_path))
    with caplog.at_level("ERROR"):
        _evaluator(_samples(tmp_path), [writer], net).run()
    assert "has no operating point" in caplog.text
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(r["decision"] == "" and r["probability"] for r in rows)
    ml.close()


def test_best_model_saver_failed_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = _net()
    saver = BestModelSaver(str(tmp_path), torch.nn.parallel.DataParallel(net), tie_breaker=None)
    saver(_engine({"val_tpr_at_fpr_0.001": 0.2, "val_tpr_at_fpr_0.001_threshold": 0.9}, epoch=1))
    assert all(not k.startswith("module.") for k in torch.load(saver.checkpoint_path, weights_only=True)["model"])
    before = saver.checkpoint_path.read_bytes()

    def broken_save(obj: Any, f: Any) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", broken_save)
        with pytest.raises(OSError, match="disk full"):
            saver(_engine({"val_tpr_at_fpr_0.001": 0.9, "val_tpr_at_fpr_0.001_threshold": 0.5}, epoch=2))
    assert saver.checkpoint_path.read_bytes() == before and saver.best_epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model_metrics.json"]
    with pytest.raises(KeyError, match=r"no \['val_tpr_at_fpr_0.001'\]"):
        saver(_engine({"val_auc": 0.9}, epoch=3))


def test_loaders_accept_state_dicts_and_name_the_file_on_errors(tmp_path: Path) -> None:
    net = _net()
    plain = tmp_path / "plain.pt"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, plain)  # saved from a DDP model
    fresh = TinyNet(num_classes=2)
    assert set(load_model_weights(fresh, plain)) == {"model"}
    assert torch.equal(fresh.head[2].weight, net.head[2].weight)
    with pytest.raises(ValueError, match=r"plain\.pt: holds no operating point"):
        load_operating_point(plain)
    with pytest.raises(ValueError, match=r"(?s)plain\.pt: weights do not match TinyNet.*mismatch for head\.2\.weight"):
        load_model_weights(TinyNet(num_classes=3), plain)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt: checkpoint file not found"):
        load_model_weights(net, tmp_path / "missing.pt")
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.pt: not a PyTorch checkpoint"):
        load_operating_point(tmp_path / "notes.pt")
    torch.save({"epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: neither a BestModelSaver checkpoint"):
        load_model_weights(net, tmp_path / "other.pt")


def test_metrics_json_writer(tmp_path: Path, tracking_uri: str) -> None:
    ml = _mlflow(tracking_uri, "metrics-json")
    metrics = {"val_b": 0.5, "val_a": math.nan, "val_c": torch.tensor(0.25)}
    writer = MetricsJSONWriter(str(tmp_path / "eval" / "metrics.json"), mlflow_handler=ml, prefix="test_")
    _evaluator(_samples(tmp_path)[:3], [ml, SetMetrics({7: metrics}), writer]).run(global_epoch=7)
    text = (tmp_path / "eval" / "metrics.json").read_text()
    assert json.loads(text) == {"val_a": None, "val_b": 0.5, "val_c": 0.25}
    assert text.index("val_a") < text.index("val_b") < text.index("val_c")
    client = mlflow.MlflowClient(tracking_uri)
    run_id = ml.cur_run.info.run_id
    assert [(m.value, m.step) for m in client.get_metric_history(run_id, "test_val_b")] == [(0.5, 7)]
    assert client.get_metric_history(run_id, "test_val_a") == []
    assert "val_b" not in client.get_run(run_id).data.metrics
    assert "metrics.json" in _artifacts(tracking_uri, ml)
    ml.close()


def test_prediction_csv_writer_with_threshold_and_checkpoint(tmp_path: Path, tracking_uri: str) -> None:
    samples, net = _samples(tmp_path), _net()
    score, _ = _expected(samples, net)
    threshold = float(score.median())
    ml = _mlflow(tracking_uri, "predictions")
    by_value = PredictionCSVWriter(str(tmp_path / "a"), threshold=threshold, mlflow_handler=ml)
    BestModelSaver(str(tmp_path / "ckpt"), net, tie_breaker=None)(
        _engine({"val_tpr_at_fpr_0.001": 1.0, "val_tpr_at_fpr_0.001_threshold": threshold}, epoch=1)
    )
    by_ckpt = PredictionCSVWriter(str(tmp_path / "b"), "p.csv", checkpoint=str(tmp_path / "ckpt" / "model.pt"))
    _evaluator(samples, [ml, by_value, by_ckpt], net).run()
    with open(tmp_path / "a" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "frame", "score", "probability", "decision", "label"]
    assert [(r["file"], int(r["frame"])) for r in rows] == [(s["image_path"], s["frame"]) for s in samples]
    np.testing.assert_allclose([float(r["score"]) for r in rows], score, rtol=1e-12)  # float64, exact
    np.testing.assert_allclose([float(r["probability"]) for r in rows], torch.sigmoid(score), rtol=1e-5)
    decisions = [int(r["decision"]) for r in rows]
    assert decisions == [int(float(r["score"]) >= threshold) for r in rows] and 0 < sum(decisions) < 8
    assert [int(r["label"]) for r in rows] == LABELS
    assert (tmp_path / "b" / "p.csv").read_text() == (tmp_path / "a" / "predictions.csv").read_text()
    assert "predictions.csv" in _artifacts(tracking_uri, ml)
    logged = mlflow.MlflowClient(tracking_uri).download_artifacts(ml.cur_run.info.run_id, "predictions.csv", str(tmp_path))
    with open(logged) as f:
        logged_rows = list(csv.DictReader(f))
    assert [r["ref"] for r in logged_rows] == [frame_ref(s["image_path"], s["frame"]) for s in samples]
    assert "file" not in logged_rows[0] and all(str(tmp_path) not in r["ref"] for r in logged_rows)
    ml.close()

    unlabelled = PredictionCSVWriter(str(tmp_path / "c"), threshold=0.5)
    _evaluator(_samples(tmp_path, with_labels=False), [unlabelled], net).run()
    with open(tmp_path / "c" / "predictions.csv") as f:
        assert next(csv.reader(f)) == ["file", "frame", "score", "probability", "decision"]
    with pytest.raises(ValueError, match="exactly one of threshold and checkpoint"):
        PredictionCSVWriter(str(tmp_path), threshold=0.5, checkpoint="model.pt")
    with pytest.raises(ValueError, match="threshold must be finite"):
        PredictionCSVWriter(str(tmp_path), threshold=math.inf)


def test_heatmap_writer_writes_png_and_nifti_per_frame(tmp_path: Path) -> None:
    samples, net = _samples(tmp_path), _net()
    _, cams = _expected(samples, net)
    writer = HeatmapWriter(str(tmp_path / "out"))
    _evaluator(samples, [writer], net).run()
    folder = tmp_path / "out" / "heatmaps"
    b_stem = writer.file_stem(str(tmp_path / "b" / "frame.png"))
    assert b_stem.startswith("frame-") and len(b_stem) == len("frame-") + 8
    names = ["frame_f0", f"{b_stem}_f0", "clip_f0", "clip_f1", "clip_f2", "img5_f0", "img6_f0", "img7_f0"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(n + s for n in names for s in (".png", ".nii.gz"))
    for name, sample, cam in zip(names, samples, cams):
        volume = nib.load(folder / f"{name}.nii.gz")
        data = np.asarray(volume.dataobj)
        assert data.dtype == np.float32 and data.shape == (32, 32)
        assert data.min() >= 0.0 and data.max() <= 1.0
        np.testing.assert_allclose(data, cam[0].numpy(), atol=1e-5)
        np.testing.assert_array_equal(volume.affine, np.eye(4))
        png = np.asarray(Image.open(folder / f"{name}.png"))  # the overlay x8, a colour bar and a caption
        assert png.shape[0] > 256 and png.shape[1] > 256 and png.shape[2] == 3
        shown = png[:256:8, :256:8]  # no cam_scale: each frame on its own scale, which the caption says
        assert np.abs(shown.astype(int) - cam_overlay(sample["image"], cam).astype(int)).max() <= 1
    bad = _engine({}, epoch=1)
    bad.state.batch, bad.state.output = {"frame": torch.tensor([0])}, {"image": torch.rand(1, 3, 4, 4)}
    with pytest.raises(KeyError, match=r"HeatmapWriter: no \['image_path'\]"):
        writer(bad)


def test_roc_plot_draws_fpr_zero_at_zero_with_distinct_budget_markers_and_the_shipped_point(tmp_path: Path) -> None:
    labels = np.array([0] * 50 + [1] * 10)
    scores = np.concatenate([np.linspace(-3, 1, 50), np.linspace(0.5, 4, 10)])
    fpr, tpr, thresholds = roc_curve(scores, labels)
    BestModelSaver(str(tmp_path), _net(), tie_breaker=None)(
        _engine({"val_tpr_at_fpr_0.001": 0.5, "val_tpr_at_fpr_0.001_threshold": 2.0}, epoch=1)
    )
    saver = ROCCurveSaver(str(tmp_path), split="test", per_round=False, checkpoint=str(tmp_path / "model.pt"))
    fig = saver._plot(fpr, tpr, thresholds, 1, 10, 50)
    linear, log = fig.axes
    assert log.get_xscale() == "symlog" and log.get_xlim()[0] == 0.0  # FPR = 0 is drawn at 0
    assert "test split" in fig._suptitle.get_text()
    points = {line.get_label(): line for line in log.get_lines() if line.get_linestyle() == "None"}
    budgets = [line for label, line in points.items() if label.startswith("FPR <=")]
    assert len(budgets) == 2 and len({line.get_marker() for line in budgets}) == 2
    (shipped,) = [line for label, line in points.items() if label.startswith("stored operating point")]
    k = int(np.count_nonzero(thresholds >= 2.0)) - 1
    assert (shipped.get_xdata()[0], shipped.get_ydata()[0]) == (fpr[k], tpr[k])
