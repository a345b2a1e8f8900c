"""Cost of a GAIN training step relative to a plain classification step, side by side in one process.

Both steps run through a MONAI ``SupervisedTrainer`` on MobileNetV2 (224², batch 16 by default). Target: the
GAIN step (attention mining + extra supervision) costs at most 2.1x the plain step.

    python benchmarks/gain_step.py [--device cuda --amp] [--rounds 5]
"""

from __future__ import annotations

import torch
from common import alternate, machine, parser
from monai.engines import SupervisedTrainer

from medgain.handlers.gain import GAINHandler
from medgain.networks import TARGET_LAYERS, build_classifier


def _batch(n: int, size: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2  # half positives
    masks = torch.zeros(n, 1, size, size)
    masks[labels == 1, :, size // 4 : size // 2, size // 4 : size // 2] = 1.0
    return {
        "image": torch.rand(n, 3, size, size, generator=g).to(device),
        "label": labels.to(device),
        "mask": masks.to(device),
        "has_mask": (labels == 1).to(device),
    }


def _trainer(batch: dict[str, torch.Tensor], device: str, amp: bool, handler: GAINHandler | None) -> SupervisedTrainer:
    torch.manual_seed(0)
    net = build_classifier("mobilenet_v2", num_classes=2).to(device)
    trainer = SupervisedTrainer(
        device=torch.device(device),
        max_epochs=1,
        epoch_length=1,
        train_data_loader=[batch],
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=1e-3),
        loss_function=torch.nn.CrossEntropyLoss(),
        amp=amp,
        decollate=False,
    )
    if handler is not None:
        handler.attach(trainer)
    return trainer


def main() -> None:
    args = parser(__doc__.splitlines()[0], batch_size=16).parse_args()
    batch = _batch(args.batch_size, args.image_size, args.device)
    layer = TARGET_LAYERS["mobilenet_v2"]
    trainers = {
        "plain": _trainer(batch, args.device, args.amp, None),
        "gain (AM on positives + EX)": _trainer(batch, args.device, args.amp, GAINHandler(layer)),
        "gain (AM on all + EX)": _trainer(batch, args.device, args.amp, GAINHandler(layer, am_on_all=True)),
    }
    times = alternate({name: t.run for name, t in trainers.items()}, args.rounds, args.device)
    print(f"machine: {machine(args.device)}; MobileNetV2 {args.image_size}², batch {args.batch_size}, amp={args.amp}")
    for name, seconds in times.items():
        print(f"{name:30s} {seconds * 1000:9.1f} ms/step   ratio {seconds / times['plain']:.2f}x")


if __name__ == "__main__":
    main()
