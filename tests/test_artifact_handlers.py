"""Artifact / output handlers driven through a real MONAI evaluator and a real SQLite MLflow store."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import mlflow
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
from medgain.handlers.attention_overlay import AttentionOverlaySaver
from medgain.handlers.best_checkpoint import BestModelSaver, load_model_weights, load_operating_point
from medgain.handlers.cam_inferer import GradCamInferer
from medgain.handlers.heatmap_writer import HeatmapWriter
from medgain.handlers.metrics_json import MetricsJSONWriter
from medgain.handlers.prediction_writer import PredictionCSVWriter
from medgain.handlers.roc_plot import ROCCurveSaver
from medgain.handlers.utils import attach_once
from medgain.metrics import operating_point, roc_curve, tpr_at_fpr
from medgain.metrics.scores import positive_probability
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
    """Probability of being ill and normalised cam of every sample, computed directly."""
    net.eval()
    logits, cam = grad_cam(net, torch.stack([s["image"] for s in samples]), LAYER)
    return positive_probability(logits), normalize_cam(cam.detach())


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
    for sample in saver.samples:  # compact CPU copies, not views into whole batches
        assert sample["image"].untyped_storage().nbytes() == 3 * 32 * 32 * 4
        assert 0.0 <= float(sample["cam"].min()) and float(sample["cam"].max()) <= 1.0
    for epoch in (1, 2):
        with Image.open(tmp_path / "out" / "attention" / f"epoch_{epoch:03d}.png") as png:
            assert png.size == (1100, 480)  # 5 columns of 2.2 in, 4.8 in high, 100 dpi
    assert _artifacts(tracking_uri, ml, "attention") == {"attention/epoch_001.png", "attention/epoch_002.png"}
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
    with Image.open(tmp_path / "roc" / "roc_epoch_004.png") as png:
        assert png.size == (1000, 450)
    with open(tmp_path / "roc" / "roc_epoch_004.csv") as f:
        rows = list(csv.DictReader(f))
    probability, _ = _expected(samples, net)
    fpr, tpr, thresholds = roc_curve(probability, torch.tensor(LABELS))
    np.testing.assert_allclose([float(r["fpr"]) for r in rows], fpr)
    np.testing.assert_allclose([float(r["tpr"]) for r in rows], tpr)
    np.testing.assert_allclose([float(r["threshold"]) for r in rows], thresholds, rtol=1e-6)
    assert rows[0]["threshold"] == "inf" and float(rows[-1]["tpr"]) == 1.0
    assert _artifacts(tracking_uri, ml, "roc") == {"roc/roc_epoch_004.png", "roc/roc_epoch_004.csv"}
    ml.close()


def test_roc_curve_saver_single_class_writes_a_note(tmp_path: Path) -> None:
    samples = _samples(tmp_path, labels=[0, 0, 0, 0])
    with pytest.warns(UserWarning, match="0 ill and 4 healthy"):
        _evaluator(samples, [ROCCurveSaver(str(tmp_path))]).run(global_epoch=2)
    assert "needs both" in (tmp_path / "roc_epoch_002.txt").read_text()
    assert not (tmp_path / "roc_epoch_002.png").exists()


def test_best_model_saver_keeps_the_best_round_and_registers_it(tmp_path: Path, tracking_uri: str) -> None:
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
    saver = BestModelSaver(
        str(tmp_path / "ckpt"), net, mlflow_handler=ml, registered_model_name="medgain-test-model"
    )
    evaluator = _evaluator(_samples(tmp_path)[:3], [ml, SetMetrics(metrics), saver], net)
    saved_epochs = []
    for epoch in schedule:
        with torch.no_grad():
            net.head[2].bias.fill_(float(epoch))  # identifies the weights of each round
        evaluator.run(global_epoch=epoch)
        saved_epochs.append(torch.load(saver.checkpoint_path, weights_only=True)["epoch"])
    assert saved_epochs == [1, 2, 3, 3, 3, 3]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.pt", "model_metrics.json"]  # no temp
    checkpoint = torch.load(saver.checkpoint_path, weights_only=True)
    assert torch.equal(checkpoint["model"]["head.2.bias"], torch.full((2,), 3.0))
    assert checkpoint["operating_point"] == {
        "threshold": 0.55, "max_fpr": 0.001, "metric": "val_tpr_at_fpr_0.001", "value": 0.5
    }
    assert checkpoint["metrics"] == metrics[3]
    summary = json.loads((tmp_path / "ckpt" / "model_metrics.json").read_text())
    assert summary["epoch"] == 3 and summary["operating_point"]["threshold"] == 0.55
    assert _artifacts(tracking_uri, ml, "checkpoint") == {f"checkpoint/epoch_00{e}" for e in (1, 2, 3)}
    assert _artifacts(tracking_uri, ml, "checkpoint/epoch_003") == {
        "checkpoint/epoch_003/model.pt", "checkpoint/epoch_003/model_metrics.json"
    }
    client = mlflow.MlflowClient(tracking_uri)
    versions = sorted(client.search_model_versions("name='medgain-test-model'"), key=lambda v: int(v.version))
    assert [v.tags["epoch"] for v in versions] == ["1", "2", "3"]
    assert versions[-1].run_id == ml.cur_run.info.run_id
    assert [v.source.rsplit("/checkpoint/", 1)[1] for v in versions] == [f"epoch_00{e}/model.pt" for e in (1, 2, 3)]
    assert versions[-1].tags["operating_point.threshold"] == "0.55"
    downloaded = client.download_artifacts(ml.cur_run.info.run_id, "checkpoint/epoch_003/model.pt", str(tmp_path / "dl"))
    fresh = _net()
    assert load_model_weights(fresh, downloaded)["epoch"] == 3
    assert torch.equal(fresh.head[2].bias, torch.full((2,), 3.0))
    assert load_operating_point(downloaded)["threshold"] == 0.55
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

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        saver(_engine({"val_tpr_at_fpr_0.001": 0.9, "val_tpr_at_fpr_0.001_threshold": 0.5}, epoch=2))
    assert saver.checkpoint_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model_metrics.json"]
    with pytest.raises(KeyError, match="val_tpr_at_fpr_0.001_threshold"):
        saver(_engine({"val_tpr_at_fpr_0.001": 0.9}, epoch=3))


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
    probability, _ = _expected(samples, net)
    threshold = float(probability.median())
    ml = _mlflow(tracking_uri, "predictions")
    by_value = PredictionCSVWriter(str(tmp_path / "a"), threshold=threshold, mlflow_handler=ml)
    BestModelSaver(str(tmp_path / "ckpt"), net, tie_breaker=None)(
        _engine({"val_tpr_at_fpr_0.001": 1.0, "val_tpr_at_fpr_0.001_threshold": threshold}, epoch=1)
    )
    by_ckpt = PredictionCSVWriter(str(tmp_path / "b"), "p.csv", checkpoint=str(tmp_path / "ckpt" / "model.pt"))
    _evaluator(samples, [ml, by_value, by_ckpt], net).run()
    with open(tmp_path / "a" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "frame", "probability", "decision", "label"]
    assert [(r["file"], int(r["frame"])) for r in rows] == [(s["image_path"], s["frame"]) for s in samples]
    np.testing.assert_allclose([float(r["probability"]) for r in rows], probability, atol=1e-6)
    decisions = [int(r["decision"]) for r in rows]
    assert decisions == [int(float(r["probability"]) >= threshold) for r in rows] and 0 < sum(decisions) < 8
    assert [int(r["label"]) for r in rows] == LABELS
    assert (tmp_path / "b" / "p.csv").read_text() == (tmp_path / "a" / "predictions.csv").read_text()
    assert "predictions.csv" in _artifacts(tracking_uri, ml)
    ml.close()

    unlabelled = PredictionCSVWriter(str(tmp_path / "c"), threshold=0.5)
    _evaluator(_samples(tmp_path, with_labels=False), [unlabelled], net).run()
    with open(tmp_path / "c" / "predictions.csv") as f:
        assert next(csv.reader(f)) == ["file", "frame", "probability", "decision"]
    with pytest.raises(ValueError, match="exactly one of threshold and checkpoint"):
        PredictionCSVWriter(str(tmp_path), threshold=0.5, checkpoint="model.pt")
    BestModelSaver(str(tmp_path / "nan"), net, tie_breaker=None)(
        _engine({"val_tpr_at_fpr_0.001": math.nan, "val_tpr_at_fpr_0.001_threshold": math.nan}, epoch=1)
    )
    with pytest.raises(ValueError, match="threshold is NaN"):
        PredictionCSVWriter(str(tmp_path), checkpoint=str(tmp_path / "nan" / "model.pt")).start()


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
        png = np.asarray(Image.open(folder / f"{name}.png"))
        assert png.shape == (32, 32, 3)
        assert np.abs(png.astype(int) - cam_overlay(sample["image"], cam).astype(int)).max() <= 1
    bad = _engine({}, epoch=1)
    bad.state.batch, bad.state.output = {"frame": torch.tensor([0])}, {"image": torch.rand(1, 3, 4, 4)}
    with pytest.raises(KeyError, match=r"HeatmapWriter: no \['image_path'\]"):
        writer(bad)
