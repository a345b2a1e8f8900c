"""The redone shortcut study: the marker shared with the generator, the marker-reliance probe against a network
built to read the marker, the 2 x 2 report (penalty per method, shipped epochs, probe columns), and the Grad-CAM
slope that keeps gradients on a map positive at one location."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TinyNet, blob_batch, run_gain_iteration
from torch import nn

from medgain.attention import ActivationCapture, cam_from_activations, normalize_cam, target_scores
from medgain.demo import CAPSULE_BUNDLE
from medgain.handlers.gain import GAINHandler
from medgain.losses import extra_supervision_loss
from medgain.metrics import positive_score
from medgain.model_file import build_network, load_model, save_checkpoint, spec_from_config
from medgain.study import RunKey, load_study, write_report
from medgain.study.probe import PROBE_FILE, marker_attention, probe_frames
from medgain.study.report import bootstrap_paired_difference, load_runs, study_metrics
from medgain.synth.capsule import burn_marker, make_capsule_dataset, marker_mask
from medgain.transforms.io import read_frame

SIZE = 32


class MarkerReader(nn.Module):
    """A classifier that reads only the marker's pixels: ``features`` is the grey level, the lesion logit is
    ``gain`` times the mean grey level on the marker's pixels, the normal logit 0."""

    def __init__(self, region: torch.Tensor, gain: float) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 1, 1, bias=False)
        nn.init.constant_(self.features.weight, 1.0 / 3.0)
        self.register_buffer("region", region.float())
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = self.features(x)
        lesion = self.gain * (grey[:, 0] * self.region).sum((1, 2)) / self.region.sum()
        return torch.stack([torch.zeros_like(lesion), lesion], 1)


def test_the_marker_is_the_generators() -> None:
    black = np.zeros((SIZE, SIZE, 3), np.uint8)
    marked = burn_marker(black)
    region = marker_mask(SIZE)
    assert black.max() == 0 and region.any() and not region[SIZE // 2:, :].any()  # top corner, frame unchanged
    assert (marked.any(axis=2) == region).all()
    with pytest.raises(ValueError, match=r"burn_marker: needs a square \(H, W, 3\) uint8"):
        burn_marker(np.zeros((SIZE, SIZE), np.uint8))


def test_probe_measures_a_network_that_reads_the_marker() -> None:
    region = torch.from_numpy(marker_mask(SIZE))
    gain = 4.0
    model = MarkerReader(region, gain).eval()
    frames = np.zeros((4, SIZE, SIZE, 3), np.uint8)
    frames[2:, 12:20, 12:20] = 100  # two "lesion" frames: a grey square the network does not read
    values = probe_frames(model, frames, (SIZE, SIZE), "features", batch_size=3)
    # the marker's grey level on its own pixels, straight from the drawn frame
    grey = burn_marker(frames[0]).astype(np.float64).mean(axis=2) / 255.0
    expected_delta = gain * grey[region.numpy()].mean()
    np.testing.assert_allclose(values["score_clean"], 0.0, atol=1e-12)
    np.testing.assert_allclose(values["score_marked"] - values["score_clean"], expected_delta, rtol=1e-5)
    # Grad-CAM of this network is its grey level: all of it on the marker without a lesion, less with one
    np.testing.assert_allclose(values["marker_attention"][:2], 1.0, rtol=1e-6)
    lesion_share = grey[region.numpy()].sum() / (grey[region.numpy()].sum() + 64 * 100 / 255.0)
    np.testing.assert_allclose(values["marker_attention"][2:], lesion_share, rtol=1e-4)


def test_marker_attention_of_an_empty_map_is_zero() -> None:
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[0, 0] = True
    cam = torch.zeros(2, 1, 4, 4)
    cam[1, 0, 0, 0], cam[1, 0, 3, 3] = 3.0, 1.0
    assert marker_attention(cam, region).tolist() == [0.0, 0.75]
    own = torch.stack([region, region.flip(0)])  # one region per sample: the second's is the corner (3, 0)
    assert marker_attention(cam, own).tolist() == [0.0, 0.0]
    own[1, 3, 3] = True
    assert marker_attention(cam, own).tolist() == [0.0, 0.25]


def _shortcut_study(folder: Path) -> Path:
    spec = {
        "name": "probe", "bundle": str(CAPSULE_BUNDLE), "output_dir": "out",
        "data": {"synth": "capsule", "args": {"n_frames": 24, "size": SIZE, "prevalence": 0.4, "frames_per_study": 4,
                                              "split_fractions": [0.5, 0.17, 0.33], "shortcut_splits": ["training"]}},
        "data_variants": {"clean": {"shortcut_rate": 0.0}, "confounded": {"shortcut_rate": 1.0}},
        "marker_probe": True, "seeds": [0, 1], "reference": "plain",
        "configs": {"plain": {"am_weight": 0, "ex_weight": 0}, "ex": {"am_weight": 0, "ex_weight": 10}},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _fake_run(spec, key: RunKey, epoch: int, threshold: float, offset: float) -> None:
    """A finished run as the runner leaves it: a small_cnn model file and the evaluation's predictions."""
    folder = spec.run_dir(key)
    (folder / "models").mkdir(parents=True)
    torch.manual_seed(epoch)
    model_spec = spec_from_config("small_cnn", 2, SIZE, None, ["normal", "lesion"], None,
                                  bundle="capsule_endoscopy_gain", modality="ES")
    network = build_network(model_spec)
    save_checkpoint(folder / "models" / "model.pt", {
        "model": network.state_dict(), "model_spec": model_spec, "epoch": epoch,
        "operating_point": {"threshold": threshold, "max_fpr": 0.001}})
    dataset = spec.dataset_dir(key.data_seed, key.config)
    items = json.loads((dataset / "datalist.json").read_text())["test"]
    rng = np.random.default_rng(key.seed)
    rows = [{"file": str(dataset / i["image"]), "frame": 0, "score": offset * i["label"] + rng.normal(),
             "probability": 0.5, "decision": 0, "label": i["label"]} for i in items]
    evaluation = folder / "outputs" / "evaluation"
    evaluation.mkdir(parents=True)
    with open(evaluation / "predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "result.json").write_text(json.dumps({"predictions": "outputs/evaluation/predictions.csv",
                                                    "metrics": {"test_iou": 0.1, "test_attention_in_mask": 0.2}}))


def test_report_gives_the_penalty_per_method_the_probe_and_the_shipped_epochs(tmp_path: Path) -> None:
    spec = load_study(_shortcut_study(tmp_path))
    for folder, (data_seed, args) in spec.data_sets().items():
        make_capsule_dataset(folder, seed=data_seed, **args)
    epochs = {}
    for i, key in enumerate(spec.runs()):
        _, variant = spec.split_config(key.config)
        epochs[key] = i + 1
        _fake_run(spec, key, i + 1, threshold=0.0, offset=1.0 if variant == "clean" else 3.0)
    out = write_report(spec, tmp_path / "report", n_bootstrap=100)
    text = out.read_text()
    assert "## Shortcut penalty per method: variant minus `clean`" in text and "## Marker-reliance probe" in text
    assert "| `plain` | `confounded` | 2 |" in text and "| `ex` | `confounded` | 2 |" in text
    # validation and test carry no marker in either variant; training does in the confounded one
    confounded = json.loads((spec.dataset_dir(0, "plain@confounded") / "dataset.json").read_text())["splits"]
    assert confounded["training"]["shortcuts"] > 0 and confounded["validation"]["shortcuts"] == 0
    training = confounded["training"]
    assert f"| `confounded` | 0 | {training['shortcuts']} / {training['frames']} | 0 /" in text
    runs = load_runs(spec)
    metrics = {m.name: m for m in study_metrics(spec.split, (), marker_probe=True)}
    with open(tmp_path / "report" / "penalty.csv") as f:
        penalty = {(r["method"], r["metric"]): r for r in csv.DictReader(f)}
    for method in spec.methods:
        expected = bootstrap_paired_difference(runs[f"{method}@confounded"], runs[f"{method}@clean"], metrics["auc"],
                                               n_bootstrap=100)
        assert float(penalty[(method, "auc")]["penalty"]) == pytest.approx(expected[0])
        assert float(penalty[(method, "auc")]["penalty"]) > 0  # the confounded runs were given better scores
    with open(tmp_path / "report" / "runs.csv") as f:
        per_run = list(csv.DictReader(f))
    assert {(r["config"], int(r["seed"])): int(r["shipped_epoch"]) for r in per_run} == {
        (k.config, k.seed): e for k, e in epochs.items()}
    # the probe's figures are those of the model on the clean test frames, with and without the marker
    key = RunKey("ex@confounded", 0, 1)
    probe = json.loads((spec.run_dir(key) / PROBE_FILE).read_text())
    model = load_model(spec.run_dir(key) / "models" / "model.pt")
    dataset = spec.dataset_dir(0, key.config)
    frames = np.stack([np.rint(read_frame(str(dataset / i.split("#")[0]), 0) * 255).astype(np.uint8)
                       for i in probe["ids"]])
    with torch.no_grad():
        clean = positive_score(model(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0)).numpy()
        marked = positive_score(model(torch.from_numpy(np.stack([burn_marker(f) for f in frames]))
                                      .permute(0, 3, 1, 2).float() / 255.0)).numpy()
    np.testing.assert_allclose(probe["score_clean"], clean, rtol=1e-5, atol=1e-6)
    labels = np.array(probe["labels"])
    row = next(r for r in per_run if r["config"] == key.config and int(r["seed"]) == key.seed)
    assert float(row["dlogodds_normal"]) == pytest.approx((marked - clean)[labels == 0].mean(), rel=1e-4, abs=1e-6)
    assert float(row["false_alarms_marked"]) == pytest.approx((marked[labels == 0] >= 0.0).mean())
    assert probe["epoch"] == epochs[key] and probe["threshold"] == 0.0
    shipped = next(line for line in (tmp_path / "report" / "study.md").read_text().splitlines()
                   if line.startswith(f"| `{key.config}` | d0 s"))
    assert f"d0 s1: {epochs[key]}" in shipped  # each run named by its data seed and seed


def test_a_cam_positive_at_one_location_keeps_its_gradient_with_a_slope() -> None:
    # the weighted evidence of a 4 x 4 map: positive at one cell, negative elsewhere (lesion at the far corner)
    acts = -torch.ones(1, 1, 4, 4)
    acts[0, 0, 1, 1] = 2.0
    acts.requires_grad_(True)
    scores = acts.sum((1, 2, 3))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 12:, 12:] = 1.0
    grads = {}
    for slope in (0.0, 0.01):
        cam = normalize_cam(cam_from_activations(acts, scores, (16, 16), create_graph=False, negative_slope=slope))
        (grads[slope],) = torch.autograd.grad(extra_supervision_loss(cam, mask), acts)
    # Grad-CAM's ReLU: the map is the same blob whatever the evidence, and the loss cannot move it (what is left is
    # the normalisation's eps)
    assert grads[0.0].abs().max() < 1e-8
    assert torch.isfinite(grads[0.01]).all() and grads[0.01][0, 0, 3, 3] < -1e-5  # raise the lesion's evidence
    assert float(cam_from_activations(acts, scores, None, negative_slope=0.01).detach().min()) == pytest.approx(-0.01)


def test_gain_handler_takes_its_training_cam_with_the_slope() -> None:
    batch = blob_batch(8, seed=3)
    losses = {}
    for slope in (0.0, 0.3):
        torch.manual_seed(0)
        net = TinyNet(num_classes=2)
        reference = TinyNet(num_classes=2)
        reference.load_state_dict(net.state_dict())
        with ActivationCapture(reference.features.conv2) as capture:
            logits = reference(batch["image"])
            acts = capture.pop()
        cam = normalize_cam(cam_from_activations(acts, target_scores(logits, batch["label"]), (16, 16),
                                                 negative_slope=slope))
        keep = batch["has_mask"]
        expected = extra_supervision_loss(cam[keep], batch["mask"][keep])
        output = run_gain_iteration(net, batch, GAINHandler("features.conv2", am_weight=0.0, ex_weight=1.0,
                                                            cam_negative_slope=slope))
        losses[slope] = float(output["loss_ex"])
        assert losses[slope] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert losses[0.0] != pytest.approx(losses[0.3])
    with pytest.raises(ValueError, match=r"cam_negative_slope must be in \[0, 1\)"):
        GAINHandler("features.conv2", cam_negative_slope=1.0)
