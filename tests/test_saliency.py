"""Tests of medgain.saliency against Captum (test-only oracle) and of its no-side-effect contract."""

from __future__ import annotations

import pytest
import torch
from captum.attr import GuidedBackprop, Saliency
from conftest import TinyNet
from torch import nn

from medgain.networks import TARGET_LAYERS, build_classifier
from medgain.saliency import guided_backprop, input_gradient, saliency_map, smooth_grad

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
    n, noise, seed = 3, 0.2, 5
    ours = smooth_grad(net, batch, TARGETS, n_samples=n, noise=noise, guided=True, chunk_size=64, seed=seed)
    eps = torch.randn((4 * n, 3, 16, 16), generator=torch.Generator().manual_seed(seed))
    span = batch.flatten(1).amax(1) - batch.flatten(1).amin(1)
    noisy = batch.repeat_interleave(n, 0) + noise * span.repeat_interleave(n).view(-1, 1, 1, 1) * eps
    per_copy = GuidedBackprop(net).attribute(noisy, target=TARGETS.repeat_interleave(n))
    torch.testing.assert_close(ours, per_copy.view(4, n, 3, 16, 16).mean(1), rtol=1e-5, atol=1e-9)
    again = smooth_grad(net, batch, TARGETS, n_samples=n, noise=noise, guided=True, seed=seed)
    assert torch.equal(ours, again)
    assert not torch.equal(ours, smooth_grad(net, batch, TARGETS, n_samples=n, noise=noise, guided=True, seed=6))


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
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        input_gradient(net, batch[0])
