"""A short GAIN training on a tiny synthetic task: extra supervision must improve localisation."""

from __future__ import annotations

import torch
from conftest import TinyNet, blob_batch
from monai.engines import SupervisedTrainer

from medgain.attention import grad_cam
from medgain.handlers.gain import GAINHandler
from medgain.metrics import attention_iou


def _train(ex_weight: float) -> tuple[float, float]:
    """Train 12 epochs; return (mean attention IoU on validation positives, validation accuracy)."""
    torch.manual_seed(0)
    net = TinyNet(num_classes=2, downsample=True)
    batches = [blob_batch(16, size=24, seed=s) for s in range(8)]
    for b in batches:  # a confounder: positives also carry a bright bar on the left border, outside the mask
        b["image"][b["label"] == 1, 1, :, :2] += 0.5
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=12,
        train_data_loader=batches,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 3e-3),
        loss_function=torch.nn.CrossEntropyLoss(),
        decollate=False,
    )
    GAINHandler("features.act2", am_weight=0.0, ex_weight=ex_weight).attach(trainer)
    trainer.run()
    val = blob_batch(64, size=24, seed=100)
    val["image"][val["label"] == 1, 1, :, :2] += 0.5
    net.eval()
    logits, cam = grad_cam(net, val["image"], "features.act2", 1)
    pos = val["label"] == 1
    iou = attention_iou(cam.detach()[pos], val["mask"][pos]).mean().item()
    return iou, (logits.argmax(1) == val["label"]).float().mean().item()


def test_extra_supervision_improves_attention_iou() -> None:
    (plain_iou, plain_acc), (guided_iou, guided_acc) = _train(0.0), _train(10.0)
    assert plain_acc > 0.9 and guided_acc > 0.9, (plain_acc, guided_acc)
    assert guided_iou > plain_iou + 0.3, (plain_iou, guided_iou)
