"""Tests of medgain.saliency against Captum (test-only oracle) and of its no-side-effect contract."""

from __future__ import annotations

import pytest
import torch
from captum.attr import GuidedBackprop, Saliency
from conftest import TinyNet
from torch import nn

from medgain.networks import TARGET_LAYERS, build_classifier
from medgain.saliency import (
    SALIENCY_SOURCES,
    guided_backprop,
    input_gradient,
    saliency_map,
    sample_noise_seeds,
    smooth_grad,
)

TARGETS = torch.tensor([0, 2, 1, 2])

pytestmark = pytest.mark.filterwarnings("ignore:.*(required_grads|backward hooks on ReLU).*:UserWarning")


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    model = build_classifier("small_cnn", num_classes=3)  # nn.ReLU(inplace=True) blocks with BatchNorm
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_guided_backprop_equals_captum_per_sample(net: nn.Module, batch: torch.Tensor) -> None:
    logits, ours = guided_backprop(net, batch, TARGETS)
    theirs = GuidedBackprop(net).attribute(batch.clone(), target=TARGETS)
    assert ours.shape == batch.shape and logits.shape == (4, 3)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-9)
    for i in range(4):  # the same map as the sample explained alone
        alone = GuidedBackprop(net).attribute(batch[i : i + 1].clone(), target=int(TARGETS[i]))
        torch.testing.assert_close(ours[i : i + 1], alone, rtol=1e-5, atol=1e-9)
    _, plain = input_gradient(net, batch, TARGETS)
    assert not torch.allclose(ours, plain)  # the guided rule changed something


def test_gradient_equals_captum_saliency(net: nn.Module, batch: torch.Tensor) -> None:
    _, ours = input_gradient(net, batch, TARGETS)
    torch.testing.assert_close(ours, Saliency(net).attribute(batch.clone(), target=TARGETS, abs=False))
    _, reduced = saliency_map(net, batch, TARGETS, "gradient")
    absolute = Saliency(net).attribute(batch.clone(), target=TARGETS, abs=True)
    torch.testing.assert_close(reduced, absolute.amax(1, keepdim=True))


def test_relu6_rule() -> None:
    """Guided rule on ReLU6: positive gradients only, through 0 < x < 6."""
    model = nn.Sequential(nn.Flatten(), nn.ReLU6(), nn.Linear(4, 1, bias=False)).eval()
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[1.0, -1.0, 1.0, 2.0]]))
    x = torch.tensor([[[[3.0, 2.0], [7.0, -1.0]]]])
    _, plain = input_gradient(model, x)
    _, guided = guided_backprop(model, x)
    assert plain.flatten().tolist() == [1.0, -1.0, 0.0, 0.0]
    assert guided.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]


def test_no_side_effects(net: nn.Module, batch: torch.Tensor) -> None:
    model = TinyNet()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    x = batch.clone().requires_grad_(True)
    for training in (True, False):
        model.train(training)
        for source in ("gradient", "guided_backprop", "smoothgrad_guided", "grad_cam"):
            saliency_map(model, x, TARGETS, source, target_layer="features.conv2", n_samples=2)
            assert model.training is training and x.grad is None
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    logits, _ = saliency_map(model, batch, TARGETS, "guided_backprop")
    torch.testing.assert_close(logits, model(batch).detach())


def test_smoothgrad_averages_noisy_copies(net: nn.Module, batch: torch.Tensor) -> None:
    """Copy j of sample i is the image plus the j-th ``randn(C, H, W)`` of the sample's own generator."""
    n, noise, seed = 3, 0.2, 5
    ours = smooth_grad(net, batch, TARGETS, n_samples=n, noise=noise, guided=True, chunk_size=64, seed=seed)
    generators = [torch.Generator().manual_seed(s) for s in sample_noise_seeds(batch, seed)]
    eps = torch.stack([torch.randn((3, 16, 16), generator=g) for g in generators for _ in range(n)])
    span = batch.flatten(1).amax(1) - batch.flatten(1).amin(1)
    noisy = batch.repeat_interleave(n, 0) + noise * span.repeat_interleave(n).view(-1, 1, 1, 1) * eps
    per_copy = GuidedBackprop(net).attribute(noisy, target=TARGETS.repeat_interleave(n))
    torch.testing.assert_close(ours, per_copy.view(4, n, 3, 16, 16).mean(1), rtol=1e-5, atol=1e-9)
    again = smooth_grad(net, batch, TARGETS, n_samples=n, noise=noise, guided=True, seed=seed)
    assert torch.equal(ours, again)
    assert not torch.equal(ours, smooth_grad(net, batch, TARGETS, n_samples=n, noise=noise, guided=True, seed=6))


def test_every_source_gives_a_sample_the_same_map_in_any_batch(net: nn.Module, batch: torch.Tensor) -> None:
    """Alone, in a batch of 4 and at another position of a reordered batch, with SmoothGrad chunks that straddle
    samples: the same map (up to float differences of batched convolutions)."""
    order = torch.tensor([2, 0, 3, 1])
    options = {"target_layer": TARGET_LAYERS["small_cnn"], "n_samples": 4, "noise": 0.2, "chunk_size": 3, "seed": 3}
    for source in SALIENCY_SOURCES:
        _, batched = saliency_map(net, batch, TARGETS, source, **options)
        _, reordered = saliency_map(net, batch[order], TARGETS[order], source, **options)
        tolerance = {"rtol": 1e-4, "atol": 1e-5 * float(batched.max())}
        torch.testing.assert_close(reordered, batched[order], **tolerance, msg=f"{source}: reordered batch")
        for i in range(4):
            _, alone = saliency_map(net, batch[i : i + 1], TARGETS[i : i + 1], source, **options)
            torch.testing.assert_close(alone, batched[i : i + 1], **tolerance, msg=f"{source}: sample {i} alone")


def test_smoothgrad_noise_is_keyed_by_the_sample(net: nn.Module, batch: torch.Tensor) -> None:
    """The noise follows the image (or the caller's key), not the batch position or the chunking."""
    twice = torch.cat([batch[:1], batch[1:2], batch[:1]])
    seeds = sample_noise_seeds(twice, 4)
    assert seeds[0] == seeds[2] != seeds[1] and seeds[0] == sample_noise_seeds(batch[:1], 4)[0]
    assert sample_noise_seeds(batch[:1], 5) != seeds[:1] and all(0 <= s < 2**63 for s in seeds)
    maps = smooth_grad(net, twice, 1, n_samples=3, chunk_size=2, seed=4)
    torch.testing.assert_close(maps[0], maps[2], rtol=1e-5, atol=1e-9)
    by_chunk = [smooth_grad(net, batch, TARGETS, n_samples=3, chunk_size=c, seed=4) for c in (1, 5, 64)]
    for other in by_chunk[1:]:
        torch.testing.assert_close(other, by_chunk[0], rtol=1e-5, atol=1e-9)
    keyed = smooth_grad(net, batch, TARGETS, n_samples=3, seed=4, sample_keys=[10, 11, 12, 13])
    alone = smooth_grad(net, batch[2:3], TARGETS[2:3], n_samples=3, seed=4, sample_keys=torch.tensor([12]))
    torch.testing.assert_close(alone, keyed[2:3], rtol=1e-5, atol=1e-9)
    assert not torch.allclose(keyed, by_chunk[0])  # caller keys replace the content keys
    assert sample_noise_seeds(batch[:1], 4, [12]) == sample_noise_seeds(batch[2:3], 4, [12])


def test_smoothgrad_chunks_cover_every_copy(net: nn.Module, batch: torch.Tensor) -> None:
    """Without noise every copy is the image: any chunking averages back to the guided gradient."""
    _, guided = guided_backprop(net, batch, TARGETS)
    for chunk in (1, 5, 64):
        chunked = smooth_grad(net, batch, TARGETS, n_samples=3, noise=0.0, guided=True, chunk_size=chunk)
        torch.testing.assert_close(chunked, guided)


def test_default_target_is_argmax(net: nn.Module, batch: torch.Tensor) -> None:
    logits, default = saliency_map(net, batch, None, "smoothgrad", n_samples=2)
    _, explicit = saliency_map(net, batch, logits.argmax(1), "smoothgrad", n_samples=2)
    assert torch.equal(default, explicit)


def test_grad_cam_source_matches_attention(net: nn.Module, batch: torch.Tensor) -> None:
    from medgain.attention import grad_cam

    _, ours = saliency_map(net, batch, TARGETS, "grad_cam", target_layer=TARGET_LAYERS["small_cnn"])
    _, cam = grad_cam(net, batch, TARGET_LAYERS["small_cnn"], TARGETS)
    assert ours.shape == (4, 1, 16, 16)
    torch.testing.assert_close(ours, cam.detach())


def test_errors(net: nn.Module, batch: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="SiLU"):
        guided_backprop(TinyNet(act=nn.SiLU).eval(), batch)
    with pytest.raises(ValueError, match="unknown source"):
        saliency_map(net, batch, source="lime")
    with pytest.raises(ValueError, match="target_layer"):
        saliency_map(net, batch, source="grad_cam")
    with pytest.raises(ValueError, match="3 entries for a batch of 4"):
        input_gradient(net, batch, [0, 1, 2])
    with pytest.raises(ValueError, match="n_samples"):
        smooth_grad(net, batch, n_samples=0)
    with pytest.raises(ValueError, match="sample_keys has 3 entries for a batch of 4"):
        smooth_grad(net, batch, sample_keys=[0, 1, 2])
    with pytest.raises(ValueError, match="sample_keys must be integers"):
        saliency_map(net, batch, source="smoothgrad", sample_keys=[0.5, 1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        input_gradient(net, batch[0])
