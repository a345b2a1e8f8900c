"""Tests of medgain.metrics (TPR at FPR, localisation) and their ignite handlers in a MONAI evaluator."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, decollate_batch
from monai.engines import SupervisedEvaluator
from monai.metrics import compute_roc_auc
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from medgain.handlers.attention_in_mask import AttentionInMask
from medgain.handlers.attention_iou import AttentionIoU
from medgain.handlers.auc import AUC
from medgain.handlers.cam_inferer import GradCamInferer
from medgain.handlers.tpr_at_fpr import TPRAtFPR
from medgain.metrics import (
    AttentionInMaskMetric,
    AttentionIoUMetric,
    TPRAtFPRMetric,
    attention_in_mask,
    attention_inputs,
    attention_iou,
    binary_labels,
    positive_score,
    scores_and_labels,
    tpr_at_fpr,
)


def sklearn_tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, max_fpr: float) -> tuple[float, float]:
    """Reference: the highest TPR with FPR <= max_fpr on sklearn's full ROC, and the largest threshold reaching it."""
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    last = np.nonzero(fpr <= max_fpr)[0][-1]
    first = np.nonzero(tpr == tpr[last])[0][0]
    return float(tpr[last]), float(thresholds[first])


def random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    kind = seed % 3
    if kind == 0:  # heavy ties
        n = int(rng.integers(50, 400))
        labels = (rng.random(n) < 0.4).astype(int)
        scores = np.round(rng.random(n) * 0.6 + 0.4 * labels, 1)
    elif kind == 1:  # rare positives
        n = 5000
        labels = np.zeros(n, dtype=int)
        labels[rng.choice(n, 3, replace=False)] = 1
        scores = rng.normal(size=n) + 2.5 * labels
    else:  # continuous scores, moderate prevalence
        n = int(rng.integers(2000, 6000))
        labels = (rng.random(n) < 0.2).astype(int)
        scores = rng.normal(size=n) + 1.5 * labels
    return scores, labels


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("max_fpr", [0.0005, 0.001, 0.1])
def test_tpr_at_fpr_matches_sklearn_step_function(seed: int, max_fpr: float) -> None:
    scores, labels = random_case(seed)
    expected = sklearn_tpr_at_fpr(scores, labels, max_fpr)
    assert tpr_at_fpr(scores, labels, max_fpr) == expected
    assert tpr_at_fpr(torch.from_numpy(scores), torch.from_numpy(labels), max_fpr) == expected
    tpr, threshold = expected
    predicted = scores >= threshold
    assert predicted[labels == 1].mean() == pytest.approx(tpr)
    assert predicted[labels == 0].mean() <= max_fpr


def test_tpr_at_fpr_edges() -> None:
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.1])
    labels = np.array([1, 0, 1, 1, 0])
    # the tie at 0.8 is one threshold: taking it costs a false alarm, so FPR 0 stops at 0.9
    assert tpr_at_fpr(scores, labels, 0.0) == (pytest.approx(1 / 3), 0.9)
    assert tpr_at_fpr(scores, labels, 0.5) == (1.0, 0.7)
    assert tpr_at_fpr(scores, labels, 1.0) == (1.0, 0.7)
    # a negative scored highest: TPR 0 at FPR 0 is the (0, 0) point at +inf
    assert tpr_at_fpr(np.array([0.9, 0.5, 0.1]), np.array([0, 1, 0]), 0.0) == (0.0, math.inf)


def test_tpr_at_fpr_single_class_and_bad_input() -> None:
    with pytest.warns(UserWarning, match="both classes"):
        tpr, threshold = tpr_at_fpr(np.array([0.2, 0.7]), np.array([0, 0]), 0.001)
    assert math.isnan(tpr) and math.isnan(threshold)
    with pytest.raises(ValueError, match=r"labels must be 0 or 1, found \[2\]"):
        tpr_at_fpr(np.array([0.2, 0.7]), np.array([0, 2]), 0.001)
    with pytest.raises(ValueError, match="NaN or infinite"):
        tpr_at_fpr(np.array([0.2, np.nan]), np.array([0, 1]), 0.001)
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        tpr_at_fpr(np.array([0.2, 0.3, 0.4]), np.array([0, 1]), 0.001)
    with pytest.raises(ValueError, match="max_fpr"):
        TPRAtFPRMetric(1.5)


def test_tpr_at_fpr_metric_accumulates() -> None:
    scores, labels = random_case(2)
    metric = TPRAtFPRMetric(0.1)
    for chunk in np.array_split(np.arange(scores.size), 7):
        metric(torch.from_numpy(scores[chunk])[:, None], torch.from_numpy(labels[chunk]))
    tpr, threshold = sklearn_tpr_at_fpr(scores, labels, 0.1)  # accumulated in float64, never rounded
    assert metric.aggregate() == tpr
    assert metric.threshold == threshold
    metric.reset()
    assert math.isnan(metric.threshold)
    with pytest.raises(ValueError, match="one score and one label per sample"):
        metric(torch.zeros(4, 2), torch.zeros(4))


def hand_made_maps() -> tuple[torch.Tensor, torch.Tensor]:
    """Three 4x4 samples: partial overlap, an all-zero cam, an empty mask with an all-zero cam."""
    cam = torch.zeros(3, 1, 4, 4)
    cam[0, 0, 0, :] = 2.0  # normalised 1: attended
    cam[0, 0, 1, 0] = 1.5  # normalised 0.75: attended
    cam[0, 0, 3, 3] = 0.5  # normalised 0.25: not attended
    mask = torch.zeros(3, 1, 4, 4)
    mask[:2, 0, :2, :2] = 1.0
    return cam, mask


def test_attention_iou_and_in_mask_exact_values() -> None:
    cam, mask = hand_made_maps()
    # sample 0: attended = row 0 + (1, 0) = 5 px, lesion 4 px, overlap 3 px -> 3 / 6
    assert attention_iou(cam, mask).tolist() == [0.5, 0.0, 1.0]
    # a higher threshold leaves row 0 only: overlap 2, union 6
    assert attention_iou(cam, mask, threshold=0.9)[0].item() == pytest.approx(2 / 6)
    # energy inside: 2 + 2 + 1.5 of 2 * 4 + 1.5 + 0.5
    assert attention_in_mask(cam, mask).tolist() == pytest.approx([5.5 / 10.0, 0.0, 0.0])


def test_localization_shape_and_sign_errors() -> None:
    cam, mask = hand_made_maps()
    with pytest.raises(ValueError, match=r"cam \(3, 1, 4, 4\) and mask \(3, 1, 8, 8\)"):
        attention_iou(cam, torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match=r"cam \(3, 1, 4, 4\) and mask \(3, 4, 4\)"):
        attention_in_mask(cam, mask[:, 0])
    with pytest.raises(ValueError, match="non-negative"):
        attention_in_mask(-cam, mask)


def test_localization_metrics_average_included_samples() -> None:
    cam, mask = hand_made_maps()
    iou, in_mask = AttentionIoUMetric(), AttentionInMaskMetric()
    iou(cam, mask, include=torch.tensor([True, False, True]))
    iou(list(cam[:2]), list(mask[:2]))  # default: samples whose mask has a foreground pixel
    assert iou.aggregate() == pytest.approx((0.5 + 1.0 + 0.5 + 0.0) / 4)
    in_mask(cam, mask)
    assert in_mask.aggregate() == pytest.approx(0.55 / 2)
    empty = AttentionInMaskMetric()
    empty(cam, mask, include=torch.zeros(3, dtype=torch.bool))
    with pytest.warns(UserWarning, match="no ill sample with a lesion mask"):
        assert math.isnan(empty.aggregate())


def test_output_transforms_on_batched_and_decollated_output() -> None:
    cam, mask = hand_made_maps()
    output = {
        "pred": torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
        "label": torch.tensor([[1], [2], [0]]),
        "cam": cam,
        "mask": mask,
        "has_mask": torch.tensor([False, True, True]),
    }
    for out in (output, decollate_batch(output)):
        scores, labels = scores_and_labels(out)
        assert labels.tolist() == [1, 1, 0]
        p_ill = 1 - torch.softmax(output["pred"].double(), 1)[:, 0]
        assert scores.dtype == torch.float64
        assert scores.tolist() == pytest.approx(torch.logit(p_ill).tolist())  # the log-odds of being ill
        got_cam, got_mask, include = attention_inputs(out)
        assert torch.equal(got_cam, cam) and torch.equal(got_mask, mask)
        assert include.tolist() == [False, True, False]  # has_mask and ill
    no_flags = {k: v for k, v in output.items() if k != "has_mask"}
    assert attention_inputs(no_flags)[2].tolist() == [True, True, False]  # ill and a foreground pixel
    no_masks = {k: v for k, v in no_flags.items() if k != "mask"}
    assert attention_inputs(no_masks)[2].tolist() == [False, False, False]
    with pytest.raises(KeyError, match="GradCamInferer"):
        attention_inputs({"pred": output["pred"], "label": output["label"]})


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 4, 3, padding=1),
            act=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(4, 2),
        )
    )


def samples(labels: list[int]) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    items = []
    for i, label in enumerate(labels):
        mask = torch.zeros(1, 16, 16)
        if label:
            mask[0, 2 + i : 8 + i, 3:9] = 1.0
        items.append(
            {
                "image": torch.rand(3, 16, 16, generator=gen),
                "label": torch.tensor(label),
                "mask": mask,
                "has_mask": torch.tensor(bool(label) and i % 3 != 0),
            }
        )
    return items


def run_evaluator(labels: list[int]) -> tuple[SupervisedEvaluator, dict[str, torch.Tensor]]:
    inferer = GradCamInferer("conv", class_index=1)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(samples(labels), batch_size=3, shuffle=False),
        network=tiny_model(),
        inferer=inferer,
        decollate=False,
        key_val_metric={"val_tpr_at_fpr_0.001": TPRAtFPR(0.001)},
        additional_metrics={
            "val_auc": AUC(),
            "val_tpr_at_fpr_0.0005": TPRAtFPR(max_fpr=0.0005),
            "val_iou": AttentionIoU(),
            "val_attention_in_mask": AttentionInMask(),
        },
    )
    inferer.attach(evaluator)
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in ("pred", "label", "cam", "mask", "has_mask")}

    @evaluator.on(Events.ITERATION_COMPLETED)
    def collect(engine: SupervisedEvaluator) -> None:
        for key, values in seen.items():
            values.append(torch.as_tensor(engine.state.output[key]).detach().clone())

    evaluator.run()
    return evaluator, {k: torch.cat(v) for k, v in seen.items()}


def test_handlers_in_supervised_evaluator() -> None:
    labels = [0, 1, 0, 2, 1, 0, 0, 1]
    evaluator, out = run_evaluator(labels)
    metrics = evaluator.state.metrics
    scores, ill = positive_score(out["pred"]), binary_labels(out["label"])
    assert ill.tolist() == [int(v != 0) for v in labels]
    for name, max_fpr in (("val_tpr_at_fpr_0.001", 0.001), ("val_tpr_at_fpr_0.0005", 0.0005)):
        tpr, threshold = tpr_at_fpr(scores, ill, max_fpr)
        assert metrics[name] == tpr
        assert metrics.get(f"{name}_threshold", math.inf) == threshold  # an infinite threshold is left out
    assert metrics["val_auc"] == compute_roc_auc(scores, ill)
    assert metrics["val_auc"] == pytest.approx(roc_auc_score(ill.numpy(), scores.numpy()))
    include = ill.bool() & out["has_mask"].bool()
    assert include.sum() == 3
    assert metrics["val_iou"] == pytest.approx(attention_iou(out["cam"], out["mask"])[include].mean().item())
    in_mask = attention_in_mask(out["cam"], out["mask"])[include].mean().item()
    assert metrics["val_attention_in_mask"] == pytest.approx(in_mask)
    assert 0.0 < in_mask < 1.0
    assert set(evaluator.state.metric_details) == {"val_tpr_at_fpr_0.001", "val_tpr_at_fpr_0.0005"}


def test_handlers_single_class_give_nan_with_warnings() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluator, _ = run_evaluator([0, 0, 0, 0])
    messages = " | ".join(str(w.message) for w in caught)
    assert "TPR at FPR needs both classes" in messages
    assert "skip AUC computation" in messages
    assert "AttentionIoUMetric: no ill sample" in messages
    assert "AttentionInMaskMetric: no ill sample" in messages
    names = ["val_tpr_at_fpr_0.001", "val_tpr_at_fpr_0.0005", "val_auc"]
    for name in [*names, "val_iou", "val_attention_in_mask"]:
        assert math.isnan(evaluator.state.metrics[name]), name
    assert "val_tpr_at_fpr_0.001_threshold" not in evaluator.state.metrics  # NaN thresholds are never written
