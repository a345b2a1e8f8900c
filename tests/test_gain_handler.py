"""GAINHandler on a real MONAI SupervisedTrainer: loss terms, gradient paths, edge cases, DDP."""

from __future__ import annotations

import copy
import logging
import math
import socket
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, blob_batch, gain_trainer, run_gain_iteration
from torch.func import functional_call

from medgain.attention import ActivationCapture, cam_from_activations, erase, normalize_cam, soft_mask, target_scores
from medgain.handlers.gain import GAINHandler, _batchnorm_eval, gain_loss_terms
from medgain.losses import extra_supervision_loss


def _manual_paths(net: TinyNet, batch: dict[str, Any], fill: float = 0.0) -> dict[str, dict[str, torch.Tensor]]:
    """Gradients of CE, of L_am through the attention path only, and through the second forward only."""
    net.zero_grad()
    images, labels = batch["image"], batch["label"]
    with ActivationCapture(net.features.conv2) as cap:
        logits = net(images)
        acts = cap.pop()
    params = dict(net.named_parameters())
    cam = normalize_cam(cam_from_activations(acts, target_scores(logits, labels), images.shape[-2:]))
    pos = labels != 0
    t = soft_mask(cam[pos])
    erased = erase(images[pos], t, fill)
    with _batchnorm_eval(net, True):
        via_attention = functional_call(net, {k: p.detach() for k, p in params.items()}, (erased,))
        via_second = functional_call(net, params, (erased.detach(),))
    out = {}
    for name, value in {
        "cl": F.cross_entropy(logits, labels),
        "att": torch.softmax(via_attention, 1).gather(1, labels[pos][:, None]).mean(),
        "sec": torch.softmax(via_second, 1).gather(1, labels[pos][:, None]).mean(),
    }.items():
        grads = torch.autograd.grad(value, list(params.values()), retain_graph=True, allow_unused=True)
        out[name] = {k: (g if g is not None else torch.zeros_like(p)) for (k, p), g in zip(params.items(), grads)}
    return out


@pytest.mark.parametrize("m", [1.0, 2.0, 8.0, math.inf])
def test_grad_magnitude_split_is_exact(m: float) -> None:
    torch.manual_seed(0)
    net = TinyNet(num_classes=2)
    batch = blob_batch(8, seed=3)
    reference = _manual_paths(copy.deepcopy(net), batch)  # a copy: its forward updates BatchNorm statistics
    run_gain_iteration(net, batch, GAINHandler("features.conv2", am_weight=1.0, ex_weight=0.0, grad_magnitude=m))
    scale = 0.0 if math.isinf(m) else 1.0 / m
    for name, p in net.named_parameters():
        expected = reference["cl"][name] + reference["att"][name] + scale * reference["sec"][name]
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6, msg=f"{name}, m={m}")
    # the two paths really differ, so the comparison above distinguishes every m
    assert any((reference["att"][n] - reference["sec"][n]).abs().max() > 1e-6 for n in reference["att"])


def test_attention_mining_gradient_matches_finite_differences() -> None:
    """L_am reaches first-pass parameters through cam -> mask -> erased image (m = inf leaves only that path)."""
    torch.manual_seed(0)
    net = TinyNet(num_classes=2, act=torch.nn.Softplus).double()
    batch = blob_batch(4, size=8, seed=1, pos_rate=1.0)
    batch["image"] = batch["image"].double()
    frozen = {k: p.detach().clone() for k, p in net.named_parameters()}
    handler = GAINHandler("features.conv2", ex_weight=0.0, grad_magnitude=math.inf, cam_weights_grad=True)
    run_gain_iteration(net, batch, handler, loss=lambda p, t: p.sum() * 0.0)
    net.features.bn.momentum = 0.0  # re-running the first pass below must not move the running statistics

    def l_am() -> float:
        with torch.enable_grad():
            with ActivationCapture(net.features.conv2) as cap:
                logits = net(batch["image"])
                acts = cap.pop()
            cam = normalize_cam(cam_from_activations(acts, target_scores(logits, batch["label"]), (8, 8)))
            erased = erase(batch["image"], soft_mask(cam))
            with _batchnorm_eval(net, True):
                erased_logits = functional_call(net, frozen, (erased,))
        return torch.softmax(erased_logits, 1)[:, 1].mean().item()

    weight = net.features.conv1.weight
    with torch.no_grad():
        for idx in [(0, 0, 0, 0), (3, 1, 2, 1), (7, 2, 1, 1)]:
            old = weight[idx].item()
            weight[idx] = old + 1e-6
            plus = l_am()
            weight[idx] = old - 1e-6
            minus = l_am()
            weight[idx] = old
            numeric = (plus - minus) / 2e-6
            assert abs(weight.grad[idx].item() - numeric) < 1e-6 + 1e-4 * abs(numeric), idx
    assert weight.grad.abs().max() > 0


def test_loss_terms_added_and_reported(tiny_net: TinyNet) -> None:
    batch = blob_batch(8, seed=5)
    handler = GAINHandler("features.conv2", am_weight=2.0, ex_weight=3.0, area_weight=0.5, area_bounds=(0.0, 0.01))
    out = run_gain_iteration(tiny_net, batch, handler)
    terms = gain_loss_terms(out)
    assert set(terms) == {"loss", "loss_cl", "loss_am", "loss_ex", "loss_area"}
    assert terms["loss_am"] > 0 and terms["loss_ex"] > 0 and terms["loss_area"] > 0
    expected = terms["loss_cl"] + 2.0 * terms["loss_am"] + 3.0 * terms["loss_ex"] + 0.5 * terms["loss_area"]
    assert terms["loss"] == pytest.approx(expected, rel=1e-5)


def test_extra_supervision_uses_only_masked_positives(tiny_net: TinyNet) -> None:
    batch = blob_batch(6, seed=2, pos_rate=1.0)
    batch["has_mask"] = torch.tensor([True, False, True, False, False, False])
    out = run_gain_iteration(tiny_net, batch, GAINHandler("features.conv2", am_weight=0.0, ex_weight=1.0))
    tiny_net.eval()
    with ActivationCapture(tiny_net.features.conv2) as cap:
        tiny_net.train()
        logits = tiny_net(batch["image"])
        acts = cap.pop()
    cam = normalize_cam(cam_from_activations(acts, target_scores(logits, batch["label"]), (16, 16)))
    expected = extra_supervision_loss(cam, batch["mask"], batch["has_mask"])
    assert out["loss_ex"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_batch_with_exactly_one_positive_counts(tiny_net: TinyNet) -> None:
    batch = blob_batch(6, seed=4, pos_rate=0.0)
    batch["label"][2] = 1
    out = run_gain_iteration(tiny_net, batch, GAINHandler("features.conv2", ex_weight=0.0))
    assert out["loss_am"].item() > 0


def test_batch_without_positives_or_masks(tiny_net: TinyNet, caplog: pytest.LogCaptureFixture) -> None:
    batch = blob_batch(4, seed=4, pos_rate=0.0)
    del batch["mask"], batch["has_mask"]
    with caplog.at_level(logging.WARNING):
        out = run_gain_iteration(tiny_net, batch, GAINHandler("features.conv2"))
    assert out["loss_am"].item() == 0.0 and out["loss_ex"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["loss_cl"].item())
    assert "carry no 'mask'" in caplog.text
    # am_on_all mines the healthy class of negatives too
    out = run_gain_iteration(tiny_net, batch, GAINHandler("features.conv2", am_on_all=True))
    assert out["loss_am"].item() > 0


def test_masks_of_the_wrong_size_are_a_clear_error(tiny_net: TinyNet) -> None:
    batch = blob_batch(4, seed=1)
    batch["mask"] = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"'mask' has shape \(4, 1, 8, 8\) but the images are \(4, 3, 16, 16\)"):
        run_gain_iteration(tiny_net, batch, GAINHandler("features.conv2"))


def test_warm_up_epochs(tiny_net: TinyNet) -> None:
    batch = blob_batch(8, seed=6)
    seen: list[tuple[float, float]] = []
    trainer = gain_trainer(tiny_net, [batch], max_epochs=3)
    GAINHandler("features.conv2", am_start_epoch=1, ex_start_epoch=2).attach(trainer)
    from ignite.engine import Events

    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append((e.state.output["loss_am"].item(), e.state.output["loss_ex"].item()))
    )
    trainer.run()
    assert seen[0] == (0.0, 0.0)
    assert seen[1][0] > 0 and seen[1][1] == 0.0
    assert seen[2][0] > 0 and seen[2][1] > 0


def test_batchnorm_statistics_not_polluted_by_erased_images() -> None:
    torch.manual_seed(0)
    batch = blob_batch(8, seed=7)
    stats = {}
    for freeze in (True, False):
        torch.manual_seed(0)
        net = TinyNet(num_classes=2)
        run_gain_iteration(net, batch, GAINHandler("features.conv2", ex_weight=0.0, freeze_bn_on_erased=freeze))
        stats[freeze] = net.features.bn.running_mean.clone()
    torch.manual_seed(0)
    plain = TinyNet(num_classes=2)
    plain.train()(batch["image"])
    torch.testing.assert_close(stats[True], plain.features.bn.running_mean)
    assert not torch.allclose(stats[False], plain.features.bn.running_mean)


def _multilabel_batch() -> dict[str, torch.Tensor]:
    data = blob_batch(3, seed=8, pos_rate=1.0)
    data["label"] = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    return data


def test_multilabel_per_label_batched_equals_one_pair_at_a_time() -> None:
    torch.manual_seed(0)
    net = TinyNet(num_classes=3)
    net.features.bn = torch.nn.Identity()  # no batch coupling: batched and per-pair passes must agree exactly
    batch = _multilabel_batch()
    out = run_gain_iteration(net, batch, GAINHandler("features.conv2", ex_weight=0.0, multilabel_mode="per_label"), torch.nn.BCEWithLogitsLoss())
    probs = []
    for i, row in enumerate(batch["label"]):
        for c in torch.nonzero(row)[:, 0].tolist():
            with ActivationCapture(net.features.conv2) as cap:
                logits = net(batch["image"][i : i + 1])
                acts = cap.pop()
            cam = normalize_cam(cam_from_activations(acts, logits[:, c], (16, 16)))
            probs.append(torch.sigmoid(net(erase(batch["image"][i : i + 1], soft_mask(cam)))[0, c]).item())
    assert out["loss_am"].item() == pytest.approx(sum(probs) / len(probs), rel=1e-5)
    all_labels = run_gain_iteration(net, batch, GAINHandler("features.conv2", ex_weight=0.0, multilabel_mode="all_labels"), torch.nn.BCEWithLogitsLoss())
    assert 0 < all_labels["loss_am"].item() < 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_data_parallel_gives_the_same_gradients() -> None:
    import torch.distributed as dist

    torch.manual_seed(0)
    net = TinyNet(num_classes=2)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    batch = blob_batch(8, seed=9)
    handler_args = dict(target_layer="features.conv2", ex_weight=1.0, grad_magnitude=2.0)
    run_gain_iteration(net, batch, GAINHandler(**handler_args))
    expected = {n: p.grad.clone() for n, p in net.named_parameters()}

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        inner = TinyNet(num_classes=2)
        inner.load_state_dict(state)
        ddp = torch.nn.parallel.DistributedDataParallel(inner)
        run_gain_iteration(ddp, batch, GAINHandler(**handler_args))
        for n, p in inner.named_parameters():
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6, msg=n)
        # a further iteration raises if DDP's reducer was left waiting by the first one
        out = run_gain_iteration(ddp, batch, GAINHandler(**handler_args))
        assert out["loss_am"].item() > 0
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "bounds",
    [(-0.1, 0.5), (0.2, 1.5), (0.6, 0.4), (0.3,), (0.1, 0.2, 0.3), "0.1,0.2", (0.1, math.nan), ("a", 0.2), 0.5],
)
def test_invalid_area_bounds_fail_at_construction(bounds: Any) -> None:
    with pytest.raises(ValueError, match=r"area_bounds must be two numbers 0 <= lo <= hi <= 1"):
        GAINHandler("features.act2", area_weight=1.0, area_bounds=bounds, am_start_epoch=5)
    with pytest.raises(ValueError, match="area_bounds"):
        GAINHandler("features.act2", area_weight=0.0, area_bounds=bounds)


def test_valid_area_bounds_are_kept_as_floats() -> None:
    assert GAINHandler("features.act2", area_weight=1.0, area_bounds=[0, 1]).area_bounds == (0.0, 1.0)
    assert GAINHandler("features.act2", area_bounds=(0.05, 0.05)).area_bounds == (0.05, 0.05)
    assert GAINHandler("features.act2").area_bounds is None


@pytest.mark.parametrize(("options", "warns"), [
    ({"am_weight": 1.0, "grad_magnitude": 1.0}, True),  # the combination that stalled AM + EX
    ({"am_weight": 1.0, "grad_magnitude": math.inf}, False),  # the bundles' setting
    ({"am_weight": 1.0, "grad_magnitude": 1.0, "freeze_bn_on_erased": False}, False),
    ({"am_weight": 0.0, "grad_magnitude": 1.0}, False),  # no mining, no erased path
])
def test_mining_that_trains_the_frozen_batchnorm_path_is_warned(options: dict, warns: bool,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="medgain.handlers.gain"):
        GAINHandler("features.conv2", **options)
    assert ("stalled training" in caplog.text) is warns
