"""Recurrent glimpse model: Gaussian glimpse extraction, gradients to the location head, losses, patterns."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from medgain.cli import main as cli_main
from medgain.losses import (
    GlimpseLoss,
    area_location_loss,
    distance_location_loss,
    glimpse_mask_fraction,
    glimpse_rank_loss,
    glimpse_step_loss,
)
from medgain.networks import GlimpseOutput, RecurrentGlimpseNetwork, gaussian_glimpses, glimpse_geometry
from medgain.synth import make_pattern_dataset, make_pattern_image


def _tiny(**kwargs: object) -> RecurrentGlimpseNetwork:
    torch.manual_seed(0)
    options = {"glimpse_size": 8, "hidden_size": 16, "context_size": 16, "num_glimpses": 3} | kwargs
    return RecurrentGlimpseNetwork(encoder="small_cnn", **options)


def _output(centers: list, scales: list, size: int = 8) -> GlimpseOutput:
    c = torch.tensor(centers, dtype=torch.float32)
    return GlimpseOutput(
        logits=torch.zeros(c.shape[0], 2),
        glimpse_logits=torch.zeros(c.shape[0], c.shape[1], 2),
        centers=c,
        scales=torch.tensor(scales, dtype=torch.float32),
        glimpse_size=size,
        sigma_ratio=0.5,
    )


def test_gaussian_glimpse_reads_the_window_and_zeros_outside() -> None:
    image = torch.zeros(1, 1, 40, 40)
    image[..., 10:20, 10:20] = 1.0
    centre = torch.tensor([[[14.5, 14.5], [34.5, 34.5]]])
    glimpses = gaussian_glimpses(image, centre, torch.ones(1, 2), torch.full((1, 2), 0.5), 6)
    assert glimpses.shape == (1, 2, 1, 6, 6)
    torch.testing.assert_close(glimpses[0, 0, 0, 1:-1, 1:-1], torch.ones(4, 4), atol=1e-5, rtol=0)
    assert glimpses[0, 1].abs().max() < 1e-6
    # a glimpse hanging over the border reads zeros beyond it (no corner attraction from renormalisation)
    border = gaussian_glimpses(torch.ones(1, 1, 40, 40), torch.tensor([[[0.0, 20.0]]]), torch.full((1, 1), 2.0),
                               torch.ones(1, 1), 8)
    assert border[0, 0, 0, :, 0].max() < 0.05 and border[0, 0, 0, :, -1].min() > 0.99
    with pytest.raises(ValueError, match="centers must be"):
        gaussian_glimpses(image, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 4)


def test_geometry_maps_normalised_coordinates_to_pixels() -> None:
    pixels, strides, sigmas = glimpse_geometry(torch.tensor([[[-1.0, 1.0]]]), torch.tensor([[0.5]]), 33, 65, 8, 0.5)
    torch.testing.assert_close(pixels, torch.tensor([[[0.0, 32.0]]]))
    assert strides.item() == pytest.approx(33 * 0.5 / 8) and sigmas.item() == pytest.approx(strides.item() / 2)


def test_gradients_reach_the_location_head_through_the_glimpse() -> None:
    net = _tiny()
    images = torch.rand(8, 3, 32, 32)
    out = net(images)
    assert out.logits.shape == (8, 2) and out.glimpse_logits.shape == (8, 3, 2)
    # initial glimpses are spread (step 0 near the centre, then on a circle) and far from tanh saturation
    means = out.centers.detach().mean(0)
    assert out.centers.abs().max() < 0.8 and torch.pdist(means).min() > 0.3
    out.logits.sum().backward()  # classification only: the location must be reached through the glimpse pixels
    assert net.location.weight.grad is not None and net.location.weight.grad.abs().sum() > 0
    assert net.location_bias.grad[1:, :2].abs().min() > 0


def test_exclude_first_glimpse_removes_glimpse_zero_from_the_aggregate() -> None:
    images = torch.rand(2, 3, 32, 32)
    for exclude in (True, False):
        net = _tiny(exclude_first_glimpse=exclude)
        seen: list[torch.Tensor] = []
        net.core.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
        out = net(images)
        features = torch.stack(seen[1:] if exclude else seen, 1).amax(1)
        torch.testing.assert_close(out.logits, net.classifier(features))
    with pytest.raises(ValueError, match="num_glimpses must be >= 2"):
        _tiny(num_glimpses=1)
    with pytest.raises(ValueError, match="min_scale < init_scale < max_scale"):
        _tiny(init_scale=0.9)


def test_registry_backbones_as_glimpse_encoders() -> None:
    torch.manual_seed(0)  # a backbone without a ``features`` block (small_cnn, above, has one)
    net = RecurrentGlimpseNetwork(encoder="resnet18", glimpse_size=16, hidden_size=8, context_size=16, num_glimpses=2)
    assert net(torch.rand(2, 3, 24, 24)).logits.shape == (2, 2)
    assert all(not m.training for m in net.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert net.context.training  # only the encoder's normalisation is frozen


def test_area_and_distance_location_losses() -> None:
    mask = torch.zeros(2, 1, 33, 33)
    mask[0, :, 0:9, 0:9] = 1.0  # tumour in the top-left corner of image 0
    inside = _output([[[-0.75, -0.75]], [[0.0, 0.0]]], [[0.2], [0.2]])
    far = _output([[[0.75, 0.75]], [[0.0, 0.0]]], [[0.2], [0.2]])
    tumour = torch.tensor([True, False])
    frac_in, frac_far = glimpse_mask_fraction(mask, inside), glimpse_mask_fraction(mask, far)
    assert frac_in[0, 0] > 0.9 and frac_far[0, 0] < 1e-3
    assert area_location_loss(frac_in, tumour) < 0.1 < area_location_loss(frac_far, tumour)
    assert area_location_loss(frac_far, tumour) <= -math.log(1e-4) + 1e-6
    assert distance_location_loss(inside.centers, mask, tumour).item() == 0.0
    # centre (28, 28) to the nearest tumour pixel (8, 8), over the image side 33
    expected = math.hypot(20, 20) / 33
    assert distance_location_loss(far.centers, mask, tumour).item() == pytest.approx(expected, rel=1e-4)
    assert area_location_loss(frac_far, torch.tensor([False, False])).item() == 0.0
    with pytest.raises(ValueError, match="mask is empty"):
        distance_location_loss(far.centers, mask, torch.tensor([False, True]))


def test_location_loss_moves_a_glimpse_onto_the_tumour() -> None:
    mask = torch.zeros(1, 1, 48, 48)
    mask[..., 30:40, 6:16] = 1.0
    centre = torch.tensor([[[0.5, -0.5]]], requires_grad=True)
    optimizer = torch.optim.Adam([centre], lr=0.05)
    loss_fn = GlimpseLoss(per_glimpse_weight=0.0)
    for _ in range(80):
        out = _output([[[0.0, 0.0]]], [[0.2]])._replace(centers=torch.tanh(centre))
        terms = loss_fn(out, torch.tensor([1]), mask)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    x, y = ((torch.tanh(centre) + 1) * 0.5 * 47)[0, 0].tolist()
    assert 6 <= x <= 16 and 30 <= y <= 40
    assert terms["distance"].item() == 0.0


def test_glimpse_loss_terms_weights_and_normal_images() -> None:
    out = _output([[[0.0, 0.0], [0.5, 0.5]]], [[0.3, 0.3]])
    out = out._replace(glimpse_logits=torch.tensor([[[0.0, 2.0], [0.0, -1.0]]]))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :4, :4] = 1.0
    normal = GlimpseLoss()(out, torch.tensor([0]), mask)
    assert normal["location"].item() == 0.0  # normal images add no location loss
    tumour = GlimpseLoss(rank_weight=2.0, location_decay=0.5)(out, torch.tensor([1]), mask, epoch=2)
    assert tumour["rank"].item() == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item() - torch.sigmoid(torch.tensor(-1.0)).item())
    expected = tumour["classification"] + tumour["per_glimpse"] + 2.0 * tumour["rank"] + 0.25 * tumour["location"]
    torch.testing.assert_close(tumour["loss"], expected)
    no_mask = GlimpseLoss()(out, torch.tensor([1]), mask, has_mask=torch.tensor([False]))
    assert no_mask["location"].item() == 0.0
    assert glimpse_rank_loss(torch.tensor([[[0.0, 1.0], [0.0, 2.0]]]), torch.tensor([1])).item() == 0.0
    with pytest.raises(ValueError, match="alpha"):
        GlimpseLoss(alpha=1.5)
    with pytest.raises(ValueError, match="location_decay"):
        GlimpseLoss(location_decay=0.0)


def test_step_loss_charges_glimpses_that_stay_put() -> None:
    # centres in [-1, 1]: a step of 0.2 in x is 0.1 of the side
    centers = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.2, 0.0], [0.8, 0.0]]], requires_grad=True)
    loss = glimpse_step_loss(centers, min_step=0.15)
    assert loss.item() == pytest.approx((0.15 + 0.05 + 0.0) / 3, abs=1e-5)
    loss.backward()
    assert centers.grad[0, 2, 0] < 0 < centers.grad[0, 1, 0]  # the close pair (glimpses 1, 2) is pushed apart
    assert centers.grad[0, 3].abs().sum() == 0  # a step over min_step costs nothing
    assert glimpse_step_loss(centers[:, :1], 0.15).item() == 0.0
    out = _output([[[0.0, 0.0], [0.0, 0.0]]], [[0.3, 0.3]])
    terms = GlimpseLoss(step_weight=2.0, min_step=0.1)(out, torch.tensor([0]))
    assert terms["step"].item() == pytest.approx(0.1, abs=1e-5)
    torch.testing.assert_close(terms["loss"], terms["classification"] + terms["per_glimpse"] + 2.0 * terms["step"])
    with pytest.raises(ValueError, match="min_step"):
        GlimpseLoss(min_step=1.5)


def test_patterns_are_deterministic_with_masks_on_the_checkerboards() -> None:
    image, mask = make_pattern_image("pattern2", 3, 7, True, size=64, rgb=True)
    again, _ = make_pattern_image("pattern2", 3, 7, True, size=64, rgb=True)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and np.array_equal(image, again)
    assert 0.02 < mask.mean() < 0.15  # one or two of the 16 fields
    _, normal_mask = make_pattern_image("pattern2", 3, 8, False, size=64)
    assert normal_mask.sum() == 0
    grey, ellipse = make_pattern_image("ellipses", 0, 1, True, size=64)
    assert grey.ndim == 2 and ellipse.any() and grey[ellipse.astype(bool)].max() <= 0.08 * 255 + 1
    _, patch = make_pattern_image("pattern1", 0, 2, True, size=64)
    assert 0.04 - 1e-9 <= patch.mean() <= 0.16 + 1e-9
    with pytest.raises(ValueError, match="unknown pattern kind"):
        make_pattern_image("stripes", 0, 0, True)
    with pytest.raises(ValueError, match="field_size"):
        make_pattern_image("pattern2", 0, 0, True, size=32, field_size=8)


def test_synth_patterns_cli_writes_images_masks_and_datalist(tmp_path) -> None:
    out = tmp_path / "p2"
    assert cli_main(["synth", "patterns", "--kind", "pattern2", "--out", str(out), "--n-images", "10",
                     "--seed", "1", "--size", "64", "--rgb"]) == 0
    datalist = json.loads((out / "datalist.json").read_text())
    items = [item for split in ("training", "validation", "test") for item in datalist[split]]
    assert len(items) == 10 and all(datalist[s] for s in ("validation", "test"))
    for item in items:
        mask = np.asarray(Image.open(out / item["label_map"]))
        assert np.asarray(Image.open(out / item["image"])).shape == (64, 64, 3)
        assert bool(mask.any()) == bool(item["label"])
    again = make_pattern_dataset(tmp_path / "again", "pattern2", 10, 1, size=64, rgb=True)
    assert again.read_text() == (out / "datalist.json").read_text()  # relative paths, same seed: same data set
    assert np.array_equal(np.asarray(Image.open(again.parent / items[3]["image"])),
                          np.asarray(Image.open(out / items[3]["image"])))
