"""Library pieces of dermoscopy training: extra model inputs in Grad-CAM / GAIN, TTA inferer, focal loss, parameter
groups, model specs of fused models, cross-validation splits."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import blob_batch, gain_trainer, run_gain_iteration
from monai.engines import PrepareBatchExtraInput, SupervisedEvaluator
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from medgain.attention import grad_cam
from medgain.data import MetadataEncoder, TEST_FOLD, dermoscopy_cv_items, fold_items
from medgain.ensemble import search_ensemble_weights
from medgain.handlers import ChipAttentionInferer, GAINHandler, GradCamInferer, TTAGradCamInferer
from medgain.losses import LogOddsFocalLoss
from medgain.metrics import auc_score
from medgain.model_file import build_network, load_model_spec, spec_from_config
from medgain.networks import ChipNet, FusionClassifier, backbone_head_param_groups
from medgain.synth.dermoscopy import make_dermoscopy_dataset


class MetadataNet(nn.Module):
    """Image conv + a metadata term that shifts the logits: the output depends on which metadata rows it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)
        self.seen: list[torch.Tensor] = []

    def forward(self, image: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        self.seen.append(metadata.detach().clone())
        features = torch.relu(self.conv(image)).mean(dim=(2, 3))
        return self.head(features) + metadata


def test_grad_cam_passes_extra_inputs_and_explains_the_image_branch() -> None:
    torch.manual_seed(0)
    net = FusionClassifier("small_cnn", num_metadata=3).eval()
    images, metadata = torch.rand(4, 3, 32, 32), torch.rand(4, 3)
    logits, cam = grad_cam(net, images, net.target_layer, 1, forward_args=(metadata,))
    assert torch.allclose(logits, net(images, metadata)) and cam.shape == (4, 1, 32, 32)
    logits_kw, cam_kw = grad_cam(net, images, net.target_layer, 1, forward_kwargs={"metadata": metadata})
    assert torch.allclose(logits_kw, logits) and torch.allclose(cam_kw, cam)
    with pytest.raises(ValueError, match="expects metadata of 3 features"):
        grad_cam(net, images, net.target_layer, 1)


def test_gain_second_forward_gets_the_metadata_of_the_erased_rows() -> None:
    torch.manual_seed(0)
    net = MetadataNet()
    batch = blob_batch(6, size=16, seed=3)
    batch["label"] = torch.tensor([1, 0, 1, 0, 0, 1])
    batch["metadata"] = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    trainer = gain_trainer(net, [batch], prepare_batch=PrepareBatchExtraInput({"metadata": "metadata"}))
    GAINHandler("conv", am_weight=1.0, ex_weight=0.0).attach(trainer)
    trainer.run()
    first, second = net.seen
    assert torch.equal(first, batch["metadata"])
    assert torch.equal(second, batch["metadata"][[0, 2, 5]])  # the positives, erased
    assert float(trainer.state.output["loss_am"]) > 0


def test_gain_second_forward_of_an_image_only_model_gets_no_extra_inputs(tiny_net: nn.Module) -> None:
    output = run_gain_iteration(tiny_net, blob_batch(4, seed=1), GAINHandler("features.conv2", am_weight=1.0))
    assert torch.isfinite(output["loss"]) and float(output["loss_am"]) > 0  # forward(x) alone: no TypeError


def test_tta_inferer_averages_views_and_maps_cams_back() -> None:
    torch.manual_seed(0)
    net = FusionClassifier("small_cnn", num_metadata=2).eval()
    with torch.no_grad():  # image features raise the melanoma logit: its Grad-CAM is not all zero
        net.head[1].weight[1] = net.head[1].weight[1].abs()
    images, metadata = torch.rand(2, 3, 32, 32), torch.rand(2, 2)
    layer = net.target_layer
    with torch.no_grad():
        plain = GradCamInferer(layer, 1)(images, net, metadata=metadata)
        one = TTAGradCamInferer(layer, num_views=1, class_index=1)
        assert torch.allclose(one(images, net, metadata=metadata), plain)
        tta = TTAGradCamInferer(layer, num_views=2, class_index=1)
        mean = tta(images, net, metadata=metadata)
        flipped = GradCamInferer(layer, 1)
        flip_logits = flipped(torch.flip(images, dims=(-1,)), net, metadata=metadata)
    assert torch.allclose(mean, (plain + flip_logits) / 2, atol=1e-6)
    # the mean cam: each view's cam turned back onto the original grid
    _, cam = grad_cam(net, images, layer, 1, forward_args=(metadata,))
    _, cam_flipped = grad_cam(net, torch.flip(images, dims=(-1,)), layer, 1, forward_args=(metadata,))
    expected = (cam + torch.flip(cam_flipped, dims=(-1,))) / 2
    assert not torch.allclose(cam, expected) and torch.allclose(tta.last_cam, expected, atol=1e-6)
    with pytest.raises(ValueError, match="num_views must be 1 to 8"):
        TTAGradCamInferer(layer, num_views=9)
    with pytest.raises(ValueError, match="need square inputs"):
        TTAGradCamInferer(layer, num_views=5)(torch.rand(1, 3, 32, 48), net, metadata=metadata[:1])


def test_tta_inferer_in_an_evaluator_with_metadata() -> None:
    torch.manual_seed(0)
    net = FusionClassifier("small_cnn", num_metadata=2)
    batches = [{"image": torch.rand(3, 3, 32, 32), "label": torch.tensor([0, 1, 0]), "metadata": torch.rand(3, 2)}]
    inferer = TTAGradCamInferer(net.target_layer, num_views=8, class_index=1)
    evaluator = SupervisedEvaluator(
        torch.device("cpu"), batches, net, inferer=inferer, decollate=False,
        prepare_batch=PrepareBatchExtraInput({"metadata": "metadata"}), val_handlers=[inferer],
    )
    evaluator.run()
    assert evaluator.state.output["pred"].shape == (3, 2) and evaluator.state.output["cam"].shape == (3, 1, 32, 32)


def test_chip_attention_inferer_upsamples_the_softmax_grid_and_averages_views() -> None:
    torch.manual_seed(0)
    net = ChipNet("small_cnn", chip_size=8).eval()
    images = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        logits, grid = net.forward_with_attention(images)
        one = ChipAttentionInferer()
        assert torch.allclose(one(images, net), logits)
        flip_logits, flip_grid = net.forward_with_attention(torch.flip(images, dims=(-1,)))
        tta = ChipAttentionInferer(num_views=2)
        mean = tta(images, net)
    assert one.last_cam.shape == (2, 1, 16, 24) and torch.allclose(one.last_cam[:, :, ::8, ::8], grid)
    assert torch.allclose(one.last_cam.sum(dim=(1, 2, 3)), torch.full((2,), 64.0))  # a chip's weight on its pixels
    assert torch.allclose(mean, (logits + flip_logits) / 2, atol=1e-6)
    expected = (grid + torch.flip(flip_grid, dims=(-1,))) / 2
    assert torch.allclose(tta.last_cam[:, :, ::8, ::8], expected, atol=1e-6)
    with pytest.raises(ValueError, match="need square inputs"):
        ChipAttentionInferer(num_views=5)(images, net)
    with pytest.raises(TypeError, match="takes the image only"):
        one(images, net, metadata=torch.rand(2, 2))
    with pytest.raises(TypeError, match="needs a ChipNet"):
        one(images, FusionClassifier("small_cnn", num_metadata=2))


def test_log_odds_focal_loss_is_the_sigmoid_focal_loss_of_the_log_odds() -> None:
    logits = torch.tensor([[0.2, 1.0], [2.0, -1.0], [0.0, 0.0]])
    labels = torch.tensor([1, 0, 1])
    z = logits[:, 1] - logits[:, 0]
    expected = sigmoid_focal_loss(z, labels.float(), alpha=0.25, gamma=2.0, reduction="mean")
    assert torch.allclose(LogOddsFocalLoss(0.25, 2.0)(logits, labels), expected)
    assert torch.allclose(LogOddsFocalLoss(0.25, 2.0)(z[:, None], labels[:, None]), expected)
    ce = nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(LogOddsFocalLoss(alpha=-1, gamma=0.0)(logits, labels), ce)  # gamma 0, no alpha: CE
    with pytest.raises(ValueError, match="1 or 2 logits"):
        LogOddsFocalLoss()(torch.zeros(2, 3), torch.zeros(2))


def test_param_groups_split_backbone_and_heads() -> None:
    net = FusionClassifier("small_cnn", num_metadata=4)
    groups = backbone_head_param_groups(net, 1e-4, 1e-3)
    backbone = {id(p) for p in net.image_branch.parameters()}
    assert {id(p) for p in groups[0]["params"]} == backbone and groups[0]["lr"] == 1e-4
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(net.parameters()))
    optimizer = torch.optim.Adam(groups, lr=1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 1e-3]
    with pytest.raises(ValueError, match="both groups need parameters"):
        backbone_head_param_groups(nn.Linear(2, 2), 1e-4, 1e-3)


def test_fused_model_spec_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    items = [{"clinical": {"sex": s, "age": a}, "label": y} for s, a, y in
             [("m", 30, 0), ("f", 50, 1), ("f", 60, 0), ("m", 40, 1), (None, None, 0)]]
    encoder = MetadataEncoder(["sex", "age"], ["age"]).fit(items)
    spec = spec_from_config("small_cnn", 2, 32, architecture="fusion", metadata_encoder=encoder.state())
    assert spec["target_layer"] == "image_branch.features.3" and spec["architecture"] == "fusion"
    assert "architecture" not in spec_from_config("small_cnn", 2, 32)  # plain specs keep their form
    net = build_network(spec)
    torch.save({"model": net.state_dict(), "model_spec": spec}, tmp_path / "m.pt")
    loaded = load_model_spec(tmp_path / "m.pt")
    rebuilt = MetadataEncoder.from_state(loaded.metadata_encoder)
    assert rebuilt.feature_names == encoder.feature_names and isinstance(build_network(loaded), FusionClassifier)
    with pytest.raises(ValueError, match="needs metadata_encoder"):
        spec_from_config("small_cnn", 2, 32, architecture="fusion")
    with pytest.raises(ValueError, match="positive chip_size"):
        spec_from_config("small_cnn", 2, 32, architecture="chipnet")


@pytest.fixture(scope="module")
def derm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("derm") / "data"
    make_dermoscopy_dataset(out, 36, seed=2, prevalence=0.34, images_per_patient=3, min_size=48, max_size=96)
    return out


def test_cv_items_hold_out_patients_and_reuse_the_fold_table(derm: Path, tmp_path: Path) -> None:
    splits = dermoscopy_cv_items(derm / "train.csv", derm / "images", tmp_path, mask_dir=derm / "masks", n_folds=2)
    cv, test = splits["cv"], splits["test"]
    assert len(cv) + len(test) == 36 and test and all(i["fold"] == TEST_FOLD for i in test)
    folds_of = {}
    for item in cv + test:
        assert folds_of.setdefault(item["patient"], item["fold"]) == item["fold"]  # a patient in one fold
    assert {i["fold"] for i in cv} == {0, 1} and all(any(i["label"] for i in cv if i["fold"] == k) for k in (0, 1))
    with (tmp_path / "folds.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 36 and {int(r["fold"]) for r in rows} == {-1, 0, 1}
    train, val = fold_items(cv, 0, "training"), fold_items(cv, 0, "validation")
    assert {i["fold"] for i in train} == {1} and {i["fold"] for i in val} == {0}
    again = dermoscopy_cv_items(derm / "train.csv", derm / "images", tmp_path / "other", n_folds=2,
                                folds_source=tmp_path / "folds.csv", seed=7)
    assert [i["fold"] for i in again["cv"] + again["test"]] == [i["fold"] for i in cv + test]
    with pytest.raises(ValueError, match="holds folds \\[0, 1\\], but n_folds is 3"):
        dermoscopy_cv_items(derm / "train.csv", derm / "images", tmp_path, n_folds=3)


def test_a_test_csv_sharing_a_patient_with_training_is_refused(derm: Path, tmp_path: Path) -> None:
    with (derm / "train.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    fields = list(rows[0])
    for name, subset in (("train", rows[3:]), ("test", rows[:4])):
        with (tmp_path / f"{name}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(subset)
    shared = rows[3]["patient_id"]
    assert rows[2]["patient_id"] == shared or rows[4]["patient_id"] == shared
    with pytest.raises(ValueError, match=f"patient '{shared}' also has .* in the test"):
        dermoscopy_cv_items(tmp_path / "train.csv", derm / "images", tmp_path / "o", n_folds=2,
                            test_csv=tmp_path / "test.csv")


def test_ensemble_weights_on_the_fold_mean_auc_ignore_scale_shifts_between_fold_models() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    folds = np.repeat([0, 1], 200)
    signal = np.where(y == 1, 1.0, -1.0)
    sharp = signal + rng.normal(0, 0.8, 400) + np.where(folds == 1, 6.0, 0.0)  # fold 1's model: shifted log-odds
    blunt = signal + rng.normal(0, 2.0, 400)
    pooled = search_ensemble_weights({"sharp": sharp, "blunt": blunt}, y, step=0.25)
    per_fold = search_ensemble_weights({"sharp": sharp, "blunt": blunt}, y, step=0.25, groups=folds)
    assert pooled.model_auc["sharp"] < pooled.model_auc["blunt"]  # the shift ruins the pooled ranking
    assert per_fold.model_auc["sharp"] > per_fold.model_auc["blunt"] and per_fold.weights["sharp"] == 1.0
    expected = np.mean([auc_score(sharp[folds == k], y[folds == k]) for k in (0, 1)])
    assert per_fold.auc == pytest.approx(expected)
    with pytest.raises(ValueError, match="3 groups for 400 labels"):
        search_ensemble_weights({"sharp": sharp}, y, groups=[0, 1, 1])
