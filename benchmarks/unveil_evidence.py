"""Evidence for iterative unveiling: lesion recall of the unveiled regions vs one thresholded map of the same area.

Trains a small CNN (registry ``small_cnn``, single-threaded CPU, a few minutes) on synthetic capsule frames with
1-3 lesions each (``make_capsule_dataset(lesions_per_frame=(1, 3))``), then on the test frames with >= 2 lesions
that the model calls "lesion" compares, per saliency source:

- unveiling: the union of the regions unveiled until p(lesion) < ``--prob-threshold`` (at most ``--steps``);
- single map: the same source on the untouched frame, thresholded to keep as many pixels as the union.

A lesion (connected component of the per-lesion label map) counts as found when >= 25 % of it is covered
(:func:`medgain.metrics.unveil_recall`); precision is the fraction of the covered pixels inside lesions.

    OMP_NUM_THREADS=1 python benchmarks/unveil_evidence.py [--frames 1200] [--epochs 12]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medgain.metrics import equal_area_mask, unveil_recall
from medgain.networks import TARGET_LAYERS, build_classifier
from medgain.saliency import saliency_map
from medgain.synth import make_capsule_dataset
from medgain.unveil import unveil


def _load(root: Path, items: list[dict], size: int) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    images, lesions = [], []
    for item in items:
        with Image.open(root / item["image"]) as im:
            images.append(torch.from_numpy(np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0))
        if "lesion_map" in item:
            with Image.open(root / item["lesion_map"]) as im:
                lesions.append(np.asarray(im))
    batch = torch.stack(images)
    if batch.shape[-1] != size:
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False)
    return batch, torch.tensor([item["label"] for item in items]), lesions


def _train(images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int, head: str) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_classifier("small_cnn", num_classes=2)
    if head == "max":  # global max pooling: the decision rests on the single strongest location
        net.head[0] = torch.nn.AdaptiveMaxPool2d(1)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), 32):
            idx = order[start : start + 32]
            x = images[idx]
            flips = torch.rand(2, generator=generator)
            x = x.flip(-1) if flips[0] < 0.5 else x
            x = x.flip(-2) if flips[1] < 0.5 else x
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def _evaluate(
    args: argparse.Namespace, root: Path, net: torch.nn.Module, head: str, test_items: list[dict], start: float
) -> None:
    test_x, test_y, _ = _load(root, test_items, args.size)
    with torch.no_grad():
        prob = torch.softmax(net(test_x), 1)[:, 1]
    accuracy = float(((prob >= 0.5).long() == test_y).float().mean())
    chosen = [i for i, item in enumerate(test_items) if item["n_lesions"] >= 2 and prob[i] >= 0.5]
    multi = sum(item["n_lesions"] >= 2 for item in test_items)
    x, _, lesion_maps = _load(root, [test_items[i] for i in chosen], args.size)
    print(
        f"\nsmall_cnn ({head}-pool head) {args.size}², {args.epochs} epochs, test accuracy {accuracy:.3f}; "
        f"{len(chosen)} of {multi} test frames with >= 2 lesions called 'lesion' (p >= 0.5); steps <= {args.steps}, "
        f"stop at p < {args.prob_threshold}, kernel {args.kernel_size} ({time.perf_counter() - start:.0f} s)"
    )
    print("| source | unveiling recall | single-map recall | gain | unveiling precision | single-map precision "
          "| mean steps | mean area |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for source in args.sources:
        options = {"target_layer": TARGET_LAYERS["small_cnn"], "n_samples": 8}
        results = unveil(
            net, x, 1, source=source, steps=args.steps, prob_threshold=args.prob_threshold, fill="mean",
            kernel_size=args.kernel_size, **options,
        )
        union = [r.cumulative.numpy() for r in results]
        _, maps = saliency_map(net, x, 1, source, **options)
        single = [equal_area_mask(m[0], int(u.sum())) for m, u in zip(maps, union)]
        ours = unveil_recall(union, lesion_maps, per_lesion=True)
        base = unveil_recall(single, lesion_maps, per_lesion=True)
        steps = np.mean([r.steps for r in results])
        area = np.mean([u.mean() for u in union])
        print(
            f"| {source} | {ours.recall:.3f} ({ours.found}/{ours.lesions}) | {base.recall:.3f} "
            f"({base.found}/{base.lesions}) | {ours.recall - base.recall:+.3f} | {ours.precision:.3f} | "
            f"{base.precision:.3f} | {steps:.2f} | {area:.3f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=800)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prob-threshold", type=float, default=0.2)
    p.add_argument("--kernel-size", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heads", nargs="+", choices=["avg", "max"], default=["avg", "max"], help="global pooling")
    p.add_argument("--sources", nargs="+", default=["guided_backprop", "smoothgrad_guided", "grad_cam"])
    p.add_argument("--data", type=Path, help="data folder (default: a temporary one)")
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp)
        datalist_path = make_capsule_dataset(
            root, args.frames, seed=args.seed, size=args.size, prevalence=0.5, frames_per_study=10,
            lesions_per_frame=(1, 3),
        )
        datalist = json.loads(datalist_path.read_text())
        train_x, train_y, _ = _load(root, datalist["training"], args.size)
        test_items = datalist["test"]
        for head in args.heads:
            _evaluate(args, root, _train(train_x, train_y, args.epochs, args.seed, head), head, test_items, start)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
