"""medgain's batched ``grad_cam`` against pytorch-grad-cam's ``GradCAM`` on the same model and batch.

Target: at least 3x faster. Both produce per-sample maps for mixed target classes at the input size.
medgain is timed as its evaluator and inference use it (under ``torch.no_grad``: only the layers after the
target layer are recorded) and, for reference, with gradients enabled (as inside the GAIN loss, where the
forward is the trainer's own and is not repeated).

    python benchmarks/gradcam.py [--device cuda] [--rounds 5]
"""

from __future__ import annotations

import torch
from common import alternate, machine, parser
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from medgain.attention import grad_cam, resolve_layer
from medgain.networks import TARGET_LAYERS, build_classifier


def main() -> None:
    args = parser(__doc__.splitlines()[0], batch_size=32).parse_args()
    torch.manual_seed(0)
    model = build_classifier("mobilenet_v2", num_classes=4).to(args.device).eval()
    layer_name = TARGET_LAYERS["mobilenet_v2"]
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    classes = torch.arange(args.batch_size, device=args.device) % 4
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    oracle = GradCAM(model=model, target_layers=[resolve_layer(model, layer_name)])

    def ours() -> None:
        with torch.no_grad():
            grad_cam(model, images, layer_name, classes)

    def ours_full_graph() -> None:
        grad_cam(model, images, layer_name, classes)

    def theirs() -> None:
        oracle(input_tensor=images, targets=targets)

    candidates = {"medgain.grad_cam": ours, "medgain (full graph)": ours_full_graph, "pytorch-grad-cam": theirs}
    times = alternate(candidates, args.rounds, args.device)
    print(f"machine: {machine(args.device)}; MobileNetV2 {args.image_size}², batch {args.batch_size}")
    for name, seconds in times.items():
        print(f"{name:22s} {seconds * 1000:9.1f} ms/batch   speed-up {times['pytorch-grad-cam'] / seconds:.2f}x")


if __name__ == "__main__":
    main()
