"""Grad-CAM and the GAIN erasing primitives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TinyNet
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from medgain.attention import erase, grad_cam, mean_roi_color, normalize_cam, soft_mask, target_scores


def _oracle(model: torch.nn.Module, layer: torch.nn.Module, images: torch.Tensor, classes: list[int]) -> np.ndarray:
    with GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in classes])


@pytest.mark.parametrize("downsample", [False, True])
def test_grad_cam_matches_pytorch_grad_cam_per_sample(downsample: bool) -> None:
    torch.manual_seed(1)
    model = TinyNet(num_classes=3, downsample=downsample).eval()
    images = torch.rand(6, 3, 16, 16)
    classes = [0, 2, 1, 1, 0, 2]
    _, cam = grad_cam(model, images, "features.act2", torch.tensor(classes))
    raw = cam[:, 0].detach().numpy()
    lo, hi = raw.min(axis=(1, 2), keepdims=True), raw.max(axis=(1, 2), keepdims=True)
    ours = (raw - lo) / (hi - lo)  # pytorch-grad-cam's per-image min-max scaling
    expected = _oracle(model, model.features.act2, images, classes)
    # pytorch-grad-cam normalises before resizing (cv2); without resizing both must agree to float precision
    np.testing.assert_allclose(ours, expected, atol=1e-5 if not downsample else 0.05)
    if downsample:
        assert np.corrcoef(ours.ravel(), expected.ravel())[0, 1] > 0.99


def test_cam_of_a_sample_does_not_depend_on_batch_mates(tiny_net: TinyNet) -> None:
    tiny_net.eval()
    images = torch.rand(5, 3, 16, 16)
    classes = torch.tensor([2, 0, 1, 2, 1])
    _, batched = grad_cam(tiny_net, images, "features.conv2", classes)
    for i in range(5):
        _, alone = grad_cam(tiny_net, images[i : i + 1], "features.conv2", classes[i : i + 1])
        torch.testing.assert_close(batched[i], alone[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_grad_cam_has_no_side_effects(tiny_net: TinyNet, training: bool) -> None:
    tiny_net.train(training)
    logits, cam = grad_cam(tiny_net, torch.rand(3, 3, 16, 16), "features.conv2")
    assert tiny_net.training is training
    assert all(m.training is training for m in tiny_net.modules())
    assert all(p.grad is None for p in tiny_net.parameters())
    assert cam.shape == (3, 1, 16, 16) and (cam >= 0).all()
    assert len(tiny_net.features.conv2._forward_hooks) == 0


def test_default_target_is_argmax_and_single_logit_uses_the_logit(tiny_net: TinyNet) -> None:
    tiny_net.eval()
    images = torch.rand(4, 3, 16, 16)
    logits, cam = grad_cam(tiny_net, images, "features.conv2")
    _, explicit = grad_cam(tiny_net, images, "features.conv2", logits.argmax(1))
    torch.testing.assert_close(cam, explicit)
    single = torch.tensor([[0.3], [-1.2]])
    torch.testing.assert_close(target_scores(single), torch.tensor([0.3, -1.2]))
    torch.testing.assert_close(target_scores(single, torch.tensor([1, 0])), torch.tensor([0.3, 1.2]))


def test_grad_cam_works_under_no_grad_and_with_frozen_parameters(tiny_net: TinyNet) -> None:
    tiny_net.eval()
    for p in tiny_net.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        _, cam = grad_cam(tiny_net, torch.rand(2, 3, 16, 16), "features.conv2", 1)
    assert cam.abs().sum() > 0


def test_unknown_layer_lists_closest_names(tiny_net: TinyNet) -> None:
    with pytest.raises(ValueError, match="features.conv2"):
        grad_cam(tiny_net, torch.rand(1, 3, 16, 16), "features.conv3")


def test_cam_is_differentiable_and_create_graph_reaches_channel_weights() -> None:
    torch.manual_seed(0)
    model = TinyNet(num_classes=2, act=torch.nn.Softplus).double().eval()
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    weight = model.head[2].weight

    def cam_sum(create_graph: bool) -> torch.Tensor:
        return grad_cam(model, images, "features.conv2", torch.tensor([1, 0]), create_graph=create_graph)[1].sum()

    (g_full,) = torch.autograd.grad(cam_sum(True), weight)
    with torch.no_grad():  # finite differences of the whole cam w.r.t. the head weight
        numeric = torch.zeros_like(weight)
        for idx in np.ndindex(*weight.shape):
            old = weight[idx].item()
            weight[idx] = old + 1e-6
            plus = cam_sum(False).item()
            weight[idx] = old - 1e-6
            minus = cam_sum(False).item()
            weight[idx] = old
            numeric[idx] = (plus - minus) / 2e-6
    torch.testing.assert_close(g_full, numeric, rtol=1e-4, atol=1e-6)
    # without create_graph the channel weights are constants: the head weight gets no gradient at all
    assert not cam_sum(False).requires_grad or torch.autograd.grad(cam_sum(False), weight, allow_unused=True)[0] is None


def test_soft_mask_erase_and_normalisation() -> None:
    cam = torch.tensor([[[[0.0, 2.0], [4.0, 1.0]]]])
    n = normalize_cam(cam)
    torch.testing.assert_close(n, torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]]))
    t = soft_mask(n, sigma=0.5, omega=10.0)
    torch.testing.assert_close(t[0, 0, 0, 1], torch.tensor(0.5))
    images = torch.ones(1, 3, 2, 2)
    out = erase(images, t, fill=torch.tensor([0.2, 0.4, 0.6]))
    expected = images - t * images + t * torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(erase(images, torch.ones(1, 1, 2, 2), 0.0), torch.zeros(1, 3, 2, 2))


def test_mean_roi_color_over_samples_and_batches() -> None:
    image = torch.zeros(3, 4, 4)
    image[:, :2, :2] = torch.tensor([0.9, 0.1, 0.2]).view(3, 1, 1)
    mask = torch.zeros(1, 4, 4)
    mask[:, :2, :2] = 1
    samples = [{"image": image, "mask": mask}, {"image": image * 0.5, "mask": mask}]
    torch.testing.assert_close(mean_roi_color(samples), torch.tensor([0.675, 0.075, 0.15]))
    batched = [{"image": torch.stack([s["image"] for s in samples]), "mask": torch.stack([s["mask"] for s in samples])}]
    torch.testing.assert_close(mean_roi_color(batched), torch.tensor([0.675, 0.075, 0.15]))
    with pytest.raises(ValueError, match="no lesion pixel"):
        mean_roi_color([{"image": image, "mask": torch.zeros(1, 4, 4)}])


def test_under_no_grad_only_the_layers_after_the_target_are_recorded(tiny_net: TinyNet) -> None:
    tiny_net.eval()
    images = torch.rand(3, 3, 16, 16)
    classes = torch.tensor([0, 1, 2])
    _, with_grad = grad_cam(tiny_net, images, "features.conv2", classes)
    with torch.no_grad():
        logits, cam = grad_cam(tiny_net, images, "features.conv2", classes)
        assert not torch.is_grad_enabled()  # the caller's mode is restored
    torch.testing.assert_close(cam, with_grad.detach())
    assert logits.grad_fn is not None and logits.grad_fn.next_functions  # graph starts at the target layer
    assert all(p.grad is None for p in tiny_net.parameters())
