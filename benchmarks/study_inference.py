"""Frames per second of the capsule bundle's inference against a per-frame pytorch-grad-cam loop, same model.

Both go from a folder of PNG frames to ``predictions.csv`` (file, frame, log-odds, probability, decision at the
checkpoint's operating point) and one heatmap PNG overlay + NIfTI map per frame, starting from the same
checkpoint (written here in ``BestModelSaver``'s format for an untrained registry network):

- bundle: ``bundles/capsule_endoscopy_gain/configs/inference.yaml`` alone, parsed with ``monai.bundle.ConfigParser``
  (``input_dir``, ``output_dir``, ``checkpoint``, ``batch_size``, ``num_workers``, ``device``, ``amp`` overridden)
  and run as ``monai.bundle run inference`` runs it: folder scan, DataLoader (``read_frame`` decode, resize),
  batched forward + Grad-CAM (``GradCamInferer``), ``PredictionCSVWriter``, ``HeatmapWriter``;
- per-frame loop: for each frame ``medgain.transforms.read_frame``, bilinear resize to the model's input size,
  ``pytorch_grad_cam.GradCAM`` of the lesion class (its forward gives the logits), decision at the same
  threshold, a CSV row, and the same PNG overlay (``medgain.visualize.cam_overlay``) and NIfTI map.

Target: the bundle at least 5x faster on CPU. The study holds ``--frames`` PNG files: ``--distinct`` frames from
``medgain.synth.make_capsule_dataset`` (generating a frame costs more than inferring it), the others hard links
to them under their own names; every file is decoded and written on its own. Each candidate is warmed up once on
the first ``2 * batch`` frames, then both alternate over the whole study. After timing, the two outputs are
compared (scores, decisions, maps) to show that they did the same work.

    python benchmarks/study_inference.py [--frames 5000] [--network small_cnn --image-size 96] [--workers 2]
    python benchmarks/study_inference.py --device cuda --amp --network mobilenet_v2 --image-size 224
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from common import alternate, machine, parser
from monai.bundle import ConfigParser
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from medgain.attention import resolve_layer
from medgain.handlers import HeatmapWriter
from medgain.metrics import positive_score, score_to_probability
from medgain.model_file import (
    ModelSpec,
    build_network,
    decision_threshold,
    load_model,
    load_model_spec,
    load_operating_point,
)
from medgain.networks import TARGET_LAYERS
from medgain.synth import make_capsule_dataset
from medgain.transforms import read_frame
from medgain.visualize import cam_overlay

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "capsule_endoscopy_gain"
CONFIG = BUNDLE / "configs" / "inference.yaml"
LESION_CLASS = 1
PNG_LEVEL = HeatmapWriter(".").compress_level  # the PNG files of the bundle's HeatmapWriter, byte for byte


def arguments() -> argparse.Namespace:
    p = parser(__doc__.splitlines()[0], batch_size=32)
    p.set_defaults(image_size=96, rounds=1)
    p.add_argument("--network", default="small_cnn", choices=sorted(TARGET_LAYERS))
    p.add_argument("--frames", type=int, default=5000, help="PNG files in the study")
    p.add_argument("--distinct", type=int, default=250, help="frames generated; the rest are hard links")
    p.add_argument("--frame-size", type=int, default=128, help="height and width of the stored frames")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the bundle (its num_workers)")
    p.add_argument("--study", type=Path, default=None, help="keep (and reuse) the study and outputs in this folder")
    args = p.parse_args()
    if not 1 <= args.distinct <= args.frames:
        p.error(f"--distinct must be in [1, --frames], got {args.distinct}")
    if args.amp and not args.device.startswith("cuda"):
        p.error("--amp needs --device cuda")
    return args


def make_study(root: Path, frames: int, distinct: int, frame_size: int) -> Path:
    """Folder of ``frames`` PNG frames, reused when ``root`` already holds one made with the same arguments."""
    folder, stamp = root / "frames", root / "study.json"
    wanted = {"frames": frames, "distinct": distinct, "frame_size": frame_size}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return folder
    shutil.rmtree(root, ignore_errors=True)
    make_capsule_dataset(root / "generated", distinct, seed=0, size=frame_size, frames_per_study=20)
    sources = sorted((root / "generated" / "images").glob("*.png"))
    folder.mkdir(parents=True)
    for index in range(frames):
        source = sources[index % distinct]
        os.link(source, folder / f"{source.stem}_c{index // distinct:02d}.png")
    stamp.write_text(json.dumps(wanted))
    return folder


def load_resized(path: Path, size: tuple[int, int], device: str) -> torch.Tensor:
    """(1, 3, H, W) frame at the model's input size, bilinear as the bundle's ``Resized``."""
    image = torch.from_numpy(np.ascontiguousarray(read_frame(path).transpose(2, 0, 1)))
    return F.interpolate(image[None].to(device), size=size, mode="bilinear", align_corners=False)


def write_checkpoint(path: Path, network: str, image_size: int, frames: list[Path]) -> None:
    """An untrained network in ``BestModelSaver``'s format; its threshold is the median log-odds of ``frames``,
    so that the decisions split the study."""
    torch.manual_seed(0)
    spec = ModelSpec(network=network, num_classes=2, image_size=image_size, class_names=["normal", "lesion"])
    model = build_network(spec).eval()
    with torch.no_grad():
        batch = torch.cat([load_resized(f, spec.image_size, "cpu") for f in frames])
        threshold = float(positive_score(model(batch)).median())
    point = {
        "threshold": threshold,
        "probability": float(score_to_probability(threshold)),
        "max_fpr": 0.001,
        "metric": "val_tpr_at_fpr_0.001",
        "value": float("nan"),
    }
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    checkpoint = {"model": state, "model_spec": spec.as_dict(), "operating_point": point, "epoch": 0, "metrics": {}}
    torch.save(checkpoint, path)


def run_bundle(input_dir: Path, output_dir: Path, checkpoint: Path, args: argparse.Namespace) -> None:
    """``inference.yaml`` as ``monai.bundle run inference`` runs it: initialize, inference, finalize."""
    config = ConfigParser()
    config.read_config(str(CONFIG))
    config.update(
        {
            "bundle_root": str(BUNDLE),
            "input_dir": str(input_dir),
            "output_dir": str(output_dir),
            "checkpoint": str(checkpoint),
            "batch_size": args.batch_size,
            "num_workers": args.workers,
            "device": f"$torch.device('{args.device}')",
            "amp": bool(args.amp),
        }
    )
    for section in ("initialize", "inference", "finalize"):
        config.get_parsed_content(section)


def run_per_frame(input_dir: Path, output_dir: Path, checkpoint: Path, args: argparse.Namespace) -> None:
    """The same outputs, one frame at a time, with pytorch-grad-cam."""
    spec = load_model_spec(checkpoint)
    threshold = decision_threshold(load_operating_point(checkpoint), checkpoint)
    model = load_model(checkpoint, args.device)
    heatmaps = output_dir / "heatmaps"
    heatmaps.mkdir(parents=True, exist_ok=True)
    rows: list[list[object]] = []
    targets = [ClassifierOutputTarget(LESION_CLASS)]
    with GradCAM(model=model, target_layers=[resolve_layer(model, spec.target_layer)]) as cam:
        for path in sorted(input_dir.glob("*.png")):
            image = load_resized(path, spec.image_size, args.device)
            with torch.autocast(torch.device(args.device).type, enabled=args.amp):
                cam01 = cam(input_tensor=image, targets=targets)[0]
            score = float(positive_score(cam.outputs)[0])
            probability = f"{float(score_to_probability(score)):.6g}"
            rows.append([str(path), 0, repr(score), probability, int(score >= threshold)])
            overlay = Image.fromarray(cam_overlay(image[0].cpu(), cam01))
            overlay.save(heatmaps / f"{path.stem}_f0.png", compress_level=PNG_LEVEL)
            nib.save(nib.Nifti1Image(cam01.astype(np.float32), np.eye(4)), heatmaps / f"{path.stem}_f0.nii.gz")
    with open(output_dir / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "frame", "score", "probability", "decision"])
        writer.writerows(rows)


def compare(bundle_dir: Path, loop_dir: Path, n_maps: int = 50) -> str:
    """How far the two outputs are apart: scores, decisions and the first ``n_maps`` NIfTI maps."""

    def read(folder: Path) -> dict[str, tuple[float, int]]:
        with open(folder / "predictions.csv", newline="") as f:
            return {row["file"]: (float(row["score"]), int(row["decision"])) for row in csv.DictReader(f)}

    ours, theirs = read(bundle_dir), read(loop_dir)
    if sorted(ours) != sorted(theirs):
        raise RuntimeError(f"the two paths wrote rows for different frames ({len(ours)} vs {len(theirs)})")
    score_diff = max(abs(ours[k][0] - theirs[k][0]) for k in ours)
    agree = sum(ours[k][1] == theirs[k][1] for k in ours)
    names = sorted(p.name for p in (bundle_dir / "heatmaps").glob("*.nii.gz"))
    if names != sorted(p.name for p in (loop_dir / "heatmaps").glob("*.nii.gz")):
        raise RuntimeError("the two paths wrote different heatmap files")
    maps = [tuple(nib.load(d / "heatmaps" / n).get_fdata() for d in (bundle_dir, loop_dir)) for n in names[:n_maps]]
    map_diff = max(float(np.abs(a - b).max()) for a, b in maps)
    map_mean = float(np.mean([a.mean() for a, _ in maps]))
    return (
        f"same {len(ours)} rows and {len(names)} heatmaps; max |score difference| {score_diff:.2e}; decisions agree "
        f"on {agree}/{len(ours)}; max |map difference| {map_diff:.3f} over the first {len(maps)} maps (mean map value "
        f"{map_mean:.3f})"
    )


def main() -> None:
    args = arguments()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.study or Path(tmp)
        study = make_study(root / "study", args.frames, args.distinct, args.frame_size)
        warm = root / "warm_up"
        warm.mkdir(parents=True, exist_ok=True)
        for frame in sorted(study.glob("*.png"))[: 2 * args.batch_size]:
            if not (warm / frame.name).exists():
                os.link(frame, warm / frame.name)
        checkpoint = root / "model.pt"
        write_checkpoint(checkpoint, args.network, args.image_size, sorted(warm.glob("*.png")))

        def candidates(folder: Path, tag: str) -> dict[str, Callable[[], None]]:
            return {
                "bundle (inference.yaml)": lambda: run_bundle(folder, root / f"bundle_{tag}", checkpoint, args),
                "per-frame pytorch-grad-cam": lambda: run_per_frame(folder, root / f"loop_{tag}", checkpoint, args),
            }

        for fn in candidates(warm, "warm_up").values():
            fn()
        times = alternate(candidates(study, "study"), args.rounds, args.device, warm_up=False)
        agreement = compare(root / "bundle_study", root / "loop_study")
    amp = ", AMP" if args.amp else ""
    print(
        f"machine: {machine(args.device)}; {args.network} {args.image_size}²{amp}; {args.frames} PNG frames of "
        f"{args.frame_size}² ({args.distinct} distinct); batch {args.batch_size}, {args.workers} DataLoader workers; "
        f"median of {args.rounds} rounds"
    )
    baseline = times["per-frame pytorch-grad-cam"]
    for name, seconds in times.items():
        print(
            f"{name:28s} {seconds:8.1f} s   {args.frames / seconds:8.1f} frames/s   speed-up {baseline / seconds:.2f}x"
        )
    print(agreement)


if __name__ == "__main__":
    main()
