"""The fused image + metadata classifier, ChipNet and the DrawHair augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.engines import PrepareBatchExtraInput, SupervisedTrainer

from medgain.attention import ActivationCapture, cam_from_activations, resolve_layer, target_scores
from medgain.crop import attention_box
from medgain.handlers import GAINHandler, gain_loss_terms
from medgain.networks import ChipNet, FusionClassifier, backbone_features
from medgain.transforms import DrawHair, DrawHaird


@pytest.mark.parametrize("name, width", [("small_cnn", 128), ("resnet18", 512)])
def test_backbone_features_drop_the_final_linear_layer(name: str, width: int) -> None:
    net, features = backbone_features(name)
    assert features == width
    assert net.eval()(torch.rand(2, 3, 32, 32)).shape == (2, width)


def test_fusion_uses_metadata_and_refuses_wrong_shapes() -> None:
    torch.manual_seed(0)
    net = FusionClassifier("small_cnn", num_metadata=5, num_classes=2).eval()
    images = torch.rand(3, 3, 32, 32)
    meta = torch.zeros(3, 5)
    logits = net(images, meta)
    assert logits.shape == (3, 2)
    assert not torch.allclose(logits, net(images, meta + 1.0))  # the metadata branch matters
    with pytest.raises(ValueError, match="expects metadata of 5 features"):
        net(images)
    with pytest.raises(ValueError, match="metadata of shape"):
        net(images, torch.zeros(3, 4))
    image_only = FusionClassifier("small_cnn", num_metadata=0).eval()
    assert image_only(images).shape == (3, 2)


def test_grad_cam_on_the_image_branch_of_the_fused_model() -> None:
    torch.manual_seed(0)
    net = FusionClassifier("small_cnn", num_metadata=4).eval()
    assert net.target_layer == "image_branch.features.3"
    images, meta = torch.rand(2, 3, 32, 32), torch.rand(2, 4)
    with ActivationCapture(resolve_layer(net, net.target_layer)) as capture:
        logits = net(images, meta)
        acts = capture.pop()
    cam = cam_from_activations(acts, target_scores(logits, 1), images.shape[-2:])
    assert cam.shape == (2, 1, 32, 32) and torch.isfinite(cam).all() and cam.sum() > 0
    # each sample's cam depends only on that sample (no batch mixing after the layer)
    with ActivationCapture(resolve_layer(net, net.target_layer)) as capture:
        single = net(images[:1], meta[:1])
        acts1 = capture.pop()
    cam1 = cam_from_activations(acts1, target_scores(single, 1), images.shape[-2:])
    assert torch.allclose(cam1[0], cam[0], atol=1e-5)


def test_fused_model_trains_in_a_monai_trainer_with_gain_extra_supervision() -> None:
    torch.manual_seed(0)
    net = FusionClassifier("small_cnn", num_metadata=3)
    mask = torch.zeros(4, 1, 32, 32)
    mask[:, :, 8:16, 8:16] = 1
    batch = {
        "image": torch.rand(4, 3, 32, 32),
        "metadata": torch.rand(4, 3),
        "label": torch.tensor([1, 0, 1, 0]),
        "mask": mask,
        "has_mask": torch.tensor([True, False, True, False]),
    }
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batch, batch],
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
        loss_function=torch.nn.CrossEntropyLoss(),
        prepare_batch=PrepareBatchExtraInput({"metadata": "metadata"}),
    )
    GAINHandler(net.target_layer, am_weight=0.0, ex_weight=1.0).attach(trainer)
    seen = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda engine: seen.append(gain_loss_terms(engine.state.output)["loss_ex"])
    )
    trainer.run()
    assert len(seen) == 2 and all(np.isfinite(seen)) and seen[0] > 0


def test_chipnet_attention_is_a_softmax_grid_that_maps_to_a_box() -> None:
    torch.manual_seed(0)
    net = ChipNet("small_cnn", chip_size=16, hidden=8)
    images = torch.rand(2, 3, 48, 64)
    logits, attention = net.forward_with_attention(images)
    assert logits.shape == (2, 2) and attention.shape == (2, 1, 3, 4)
    assert torch.allclose(attention.sum(dim=(1, 2, 3)), torch.ones(2))
    logits.sum().backward()
    assert net.scorer[0].weight.grad is not None and net.encoder.features[0][0].weight.grad is not None
    assert torch.equal(net.eval()(images), net.forward_with_attention(images)[0])
    # a grid peaked on one chip gives a box around that chip of the original
    grid = torch.zeros(1, 1, 3, 4)
    grid[0, 0, 1, 2] = 5.0
    box = attention_box(torch.softmax(grid.flatten(), 0).reshape(3, 4), (300, 400), threshold=0.5, margin=0.0)
    assert box == (100, 200, 200, 300)
    with pytest.raises(ValueError, match="multiple of the chip size"):
        net(torch.rand(1, 3, 40, 64))


def test_draw_hair_is_seeded_darkens_strands_and_keeps_type() -> None:
    image = torch.full((3, 96, 128), 0.8)
    a = DrawHair(prob=1.0, num_hairs=(3, 3)).set_random_state(0)(image)
    b = DrawHair(prob=1.0, num_hairs=(3, 3)).set_random_state(0)(image)
    c = DrawHair(prob=1.0, num_hairs=(3, 3)).set_random_state(1)(image)
    assert torch.equal(a, b) and not torch.equal(a, c)
    dark = a < 0.6
    assert 0.001 < dark.float().mean() < 0.2 and a.max() <= 0.8 + 1e-6
    assert torch.equal(DrawHair(prob=0.0)(image), image)
    uint8 = DrawHair(prob=1.0, max_value=255).set_random_state(0)(np.full((3, 64, 64), 200, np.uint8))
    assert isinstance(uint8, np.ndarray) and uint8.dtype == np.uint8 and uint8.min() < 150
    with pytest.raises(ValueError, match="channel-first"):
        DrawHair(prob=1.0)(torch.rand(64, 64))
    d = DrawHaird(["image", "copy"], prob=1.0).set_random_state(2)({"image": image, "copy": image.clone(), "x": 1})
    assert torch.equal(d["image"], d["copy"]) and not torch.equal(d["image"], image) and d["x"] == 1
