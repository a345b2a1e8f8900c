"""Loss terms and the classifier registry."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from medgain.attention import grad_cam
from medgain.losses import (
    BinaryFocalLoss,
    attention_area_loss,
    attention_mining_loss,
    extra_supervision_loss,
    target_probability,
)
from medgain.networks import TARGET_LAYERS, build_classifier


def test_target_probability_softmax_sigmoid_and_single_logit() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    idx = torch.tensor([0, 2])
    torch.testing.assert_close(target_probability(logits, idx), torch.softmax(logits, 1)[[0, 1], [0, 2]])
    torch.testing.assert_close(target_probability(logits, idx, multilabel=True), torch.sigmoid(logits)[[0, 1], [0, 2]])
    single = torch.tensor([[0.5], [0.5]])
    p = torch.sigmoid(torch.tensor(0.5))
    torch.testing.assert_close(target_probability(single, torch.tensor([1, 0])), torch.stack([p, 1 - p]))


def test_attention_mining_mean_and_empty() -> None:
    logits = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert attention_mining_loss(logits, torch.tensor([1, 1])).item() == pytest.approx(
        (torch.softmax(logits, 1)[:, 1]).mean().item()
    )
    assert attention_mining_loss(logits[:0], torch.tensor([], dtype=torch.long)).item() == 0.0


def test_extra_supervision_masked_samples_and_shape_error() -> None:
    cam = torch.zeros(3, 1, 4, 4)
    mask = torch.ones(3, 1, 4, 4)
    cam[1] = 1.0
    assert extra_supervision_loss(cam, mask).item() == pytest.approx(2 / 3)
    assert extra_supervision_loss(cam, mask, torch.tensor([False, True, False])).item() == 0.0
    assert extra_supervision_loss(cam, mask[:, 0], torch.tensor([True, False, False])).item() == 1.0
    assert extra_supervision_loss(cam, mask, torch.zeros(3, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match=r"\(3, 1, 8, 8\) does not match the attention map \(3, 1, 4, 4\)"):
        extra_supervision_loss(cam, torch.ones(3, 1, 8, 8))


def test_area_bound() -> None:
    mask = torch.zeros(2, 1, 10, 10)
    mask[0, :, :5] = 1.0  # area 0.5
    mask[1, :, :1] = 1.0  # area 0.1
    assert attention_area_loss(mask, (0.2, 0.4)).item() == pytest.approx((0.1 + 0.1) / 2)
    assert attention_area_loss(mask, (0.0, 1.0)).item() == 0.0
    with pytest.raises(ValueError, match="lo <= hi"):
        attention_area_loss(mask, (0.5, 0.2))


def test_binary_focal_loss_accepts_class_index_labels() -> None:
    logits = torch.tensor([[1.5], [-0.3], [0.2]])
    labels = torch.tensor([1, 0, 1])
    expected = sigmoid_focal_loss(logits, labels.float()[:, None], alpha=0.25, gamma=2.0, reduction="mean")
    torch.testing.assert_close(BinaryFocalLoss()(logits, labels), expected)
    # gamma 0 and no alpha is plain binary cross-entropy
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float()[:, None])
    torch.testing.assert_close(BinaryFocalLoss(alpha=-1, gamma=0.0)(logits, labels), bce)


@pytest.mark.parametrize("name", sorted(TARGET_LAYERS))
def test_registry_builds_every_network_with_a_working_cam_layer(name: str) -> None:
    torch.manual_seed(0)
    net = build_classifier(name, num_classes=2, in_channels=1).train()  # eval-mode BN at init can zero features
    images = torch.rand(4, 1, 64, 64)
    logits, cam1 = grad_cam(net, images, TARGET_LAYERS[name], 1)
    _, cam0 = grad_cam(net, images, TARGET_LAYERS[name], 0)
    assert logits.shape == (4, 2) and cam1.shape == (4, 1, 64, 64)
    assert (cam0 + cam1).sum() > 0  # the ReLU can zero one class's map at random init, not both


def test_pretrained_weights_load_locally_and_fail_clearly(tmp_path) -> None:
    src = build_classifier("resnet18", num_classes=1000)
    path = tmp_path / "imagenet.pt"
    torch.save(src.state_dict(), path)
    net = build_classifier("resnet18", num_classes=2, pretrained_path=path)
    torch.testing.assert_close(net.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert net.fc.weight.shape == (2, 512)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_classifier("resnet18", num_classes=2, pretrained_path=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="do not fit"):
        build_classifier("mobilenet_v2", num_classes=2, pretrained_path=path)
    with pytest.raises(ValueError, match="unknown network"):
        build_classifier("vgg", num_classes=2)
