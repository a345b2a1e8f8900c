"""SmoothGrad of guided backpropagation for a batch: medgain's ``smooth_grad`` vs Captum per image.

medgain evaluates the batch x ``n`` noisy copies in chunks taken across the whole batch; Captum's
``NoiseTunnel(GuidedBackprop)`` is called image by image (its API takes one noise level for all inputs, and the
noise level is a fraction of each image's own range), with the same ``n`` and all of an image's copies in one
pass (``nt_samples_batch_size = n``). ResNet-18 (ReLU modules, on which both apply the same guided rule), eval
mode, four target classes mixed in the batch. Target: at least 3x faster.

    python benchmarks/saliency.py [--device cuda] [--image-size 224] [--samples 8] [--rounds 5]
"""

from __future__ import annotations

import torch
from captum.attr import GuidedBackprop, NoiseTunnel
from common import alternate, machine, parser

from medgain.networks import build_classifier
from medgain.saliency import smooth_grad


def main() -> None:
    p = parser(__doc__.splitlines()[0], batch_size=32)
    p.add_argument("--samples", type=int, default=8, help="noisy copies per image (n)")
    p.add_argument("--noise", type=float, default=0.15, help="noise as a fraction of each image's range")
    p.add_argument("--chunk-size", type=int, default=64, help="medgain: copies per pass")
    args = p.parse_args()
    torch.manual_seed(0)
    model = build_classifier("resnet18", num_classes=4).to(args.device).eval()
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    classes = torch.arange(args.batch_size, device=args.device) % 4
    spans = (images.flatten(1).amax(1) - images.flatten(1).amin(1)).tolist()
    tunnel = NoiseTunnel(GuidedBackprop(model))

    def ours() -> None:
        smooth_grad(
            model, images, classes, n_samples=args.samples, noise=args.noise, guided=True, chunk_size=args.chunk_size
        )

    def theirs() -> None:
        for i in range(args.batch_size):
            tunnel.attribute(
                images[i : i + 1],
                nt_type="smoothgrad",
                nt_samples=args.samples,
                nt_samples_batch_size=args.samples,
                stdevs=args.noise * spans[i],
                target=int(classes[i]),
            )

    times = alternate({"medgain.smooth_grad": ours, "captum NoiseTunnel": theirs}, args.rounds, args.device)
    print(
        f"machine: {machine(args.device)}; ResNet-18 {args.image_size}², batch {args.batch_size}, n = {args.samples}, "
        f"chunk {args.chunk_size}"
    )
    for name, seconds in times.items():
        print(f"{name:22s} {seconds * 1000:9.1f} ms/batch   speed-up {times['captum NoiseTunnel'] / seconds:.2f}x")


if __name__ == "__main__":
    main()
