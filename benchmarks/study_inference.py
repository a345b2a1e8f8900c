"""Frames per second of the capsule bundle's inference against a per-frame pytorch-grad-cam loop and against a
bare batched forward pass, same model, same frames, one run.

The first two go from a folder of PNG frames to ``predictions.csv`` (file, frame, log-odds, probability,
decision at the checkpoint's operating point) and heatmap PNG overlays + NIfTI maps, starting from the same
checkpoint (written here in ``BestModelSaver``'s format for an untrained registry network):

- bundle: ``bundles/capsule_endoscopy_gain/configs/inference.yaml`` alone, parsed with ``monai.bundle.ConfigParser``
  (``input_dir``, ``output_dir``, ``checkpoint``, ``batch_size``, ``num_workers``, ``device``, ``amp`` overridden)
  and run as ``monai.bundle run inference`` runs it: folder scan, DataLoader (``read_frame`` decode, resize),
  batched forward + Grad-CAM (``GradCamInferer``), ``PredictionCSVWriter``, ``HeatmapWriter``;
- per-frame loop: for each frame ``medgain.transforms.read_frame``, bilinear resize to the model's input size,
  ``pytorch_grad_cam.GradCAM`` of the lesion class (its forward gives the logits), decision at the same
  threshold, a CSV row, and the same PNG overlay (``medgain.visualize.cam_overlay``) and NIfTI map;
- bare forward: the network on the frames already decoded and resized in memory, in batches of ``--batch-size``,
  under ``torch.no_grad``: no Grad-CAM, no file read or written (the floor of this machine).

The bundle writes the heatmaps its ``heatmaps`` setting selects (``--heatmaps``, default the bundle's
``flagged``: frames at or above the operating point plus each study's top-K), the loop one per frame.
Targets: the bundle at least 5x faster than the loop on CPU, and at least 0.5x the bare forward's throughput.
The first printed line also gives the load average (``os.getloadavg``) before the runs: the figures of a shared
machine. The study holds ``--frames`` PNG files: ``--distinct`` frames from
``medgain.synth.make_capsule_dataset`` (generating a frame costs more than inferring it), the others hard links
to them under their own names; every file is decoded and written on its own. Each candidate is warmed up once on
the first ``2 * batch`` frames, then the three alternate over the whole study. After timing, the two outputs are
compared (scores, decisions, maps) to show that they did the same work.

    python benchmarks/study_inference.py [--frames 5000] [--network small_cnn --image-size 96] [--workers 2]
        [--heatmaps flagged|all|none]
    python benchmarks/study_inference.py --device cuda --amp --network mobilenet_v2 --image-size 224
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import json
import os
import pstats
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
from medgain.handlers.heatmap_writer import HEATMAP_SELECTIONS
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
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: profile one bundle run in-process (no workers) with cProfile")
    p.add_argument("--flag-quantile", type=float, default=0.99, help="operating point: this quantile of the scores")
    p.add_argument("--heatmaps", default="flagged", choices=HEATMAP_SELECTIONS, help="the bundle's heatmaps setting")
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


def write_checkpoint(path: Path, network: str, image_size: int, frames: list[Path], quantile: float) -> None:
    """An untrained network in ``BestModelSaver``'s format; its threshold is the ``quantile`` of the log-odds of
    ``frames`` (the distinct frames of the study; 0.99: about 1 % of the frames flagged, as at a clinical operating
    point)."""
    torch.manual_seed(0)
    spec = ModelSpec(network=network, num_classes=2, image_size=image_size, class_names=["normal", "lesion"],
                     bundle="capsule_endoscopy_gain", modality="ES")
    model = build_network(spec).eval()
    with torch.no_grad():
        batch = torch.cat([load_resized(f, spec.image_size, "cpu") for f in frames])
        threshold = float(torch.quantile(positive_score(model(batch)), quantile))
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
            "heatmaps": args.heatmaps,
            "overwrite": True,
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


def bare_forward(frames: list[Path], checkpoint: Path, args: argparse.Namespace) -> Callable[[], None]:
    """The network alone on the frames decoded and resized beforehand, in batches, without gradients."""
    spec = load_model_spec(checkpoint)
    model = load_model(checkpoint, args.device)
    images = torch.cat([load_resized(f, spec.image_size, args.device) for f in frames])

    def run() -> None:
        with torch.no_grad(), torch.autocast(torch.device(args.device).type, enabled=args.amp):
            for start in range(0, len(images), args.batch_size):
                model(images[start : start + args.batch_size])

    return run


def profile_bundle(input_dir: Path, output_dir: Path, checkpoint: Path, args: argparse.Namespace) -> None:
    """Print where one bundle run spends its time: cProfile, in-process (no DataLoader workers, so that decoding
    and resizing are seen; the heatmap files are still encoded by the writer's threads, seen as the waits of
    ``HeatmapWriter.flush``), the 25 functions of largest cumulative time."""
    args = argparse.Namespace(**{**vars(args), "workers": 0})
    profiler = cProfile.Profile()
    profiler.enable()
    run_bundle(input_dir, output_dir, checkpoint, args)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


def compare(bundle_dir: Path, loop_dir: Path, n_maps: int = 50) -> str:
    """How far the two outputs are apart: scores, decisions and the first ``n_maps`` NIfTI maps the bundle wrote
    (the loop writes one per frame, the bundle those its ``heatmaps`` setting selects)."""

    def read(folder: Path) -> dict[str, tuple[float, int]]:
        with open(folder / "predictions.csv", newline="") as f:
            return {row["file"]: (float(row["score"]), int(row["decision"])) for row in csv.DictReader(f)}

    ours, theirs = read(bundle_dir), read(loop_dir)
    if sorted(ours) != sorted(theirs):
        raise RuntimeError(f"the two paths wrote rows for different frames ({len(ours)} vs {len(theirs)})")
    score_diff = max(abs(ours[k][0] - theirs[k][0]) for k in ours)
    agree = sum(ours[k][1] == theirs[k][1] for k in ours)
    names = sorted(p.name for p in (bundle_dir / "heatmaps").glob("*.nii.gz"))
    if not set(names) <= {p.name for p in (loop_dir / "heatmaps").glob("*.nii.gz")}:
        raise RuntimeError("the bundle wrote heatmap files that the loop did not")
    maps = [tuple(nib.load(d / "heatmaps" / n).get_fdata() for d in (bundle_dir, loop_dir)) for n in names[:n_maps]]
    map_diff = max((float(np.abs(a - b).max()) for a, b in maps), default=0.0)
    map_mean = float(np.mean([a.mean() for a, _ in maps])) if maps else float("nan")
    return (
        f"same {len(ours)} rows; the bundle wrote {len(names)} heatmaps (the loop {len(ours)}); max |score "
        f"difference| {score_diff:.2e}; decisions agree "
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
        distinct = sorted(study.glob("*_c00.png"))  # one file of each generated frame
        write_checkpoint(checkpoint, args.network, args.image_size, distinct, args.flag_quantile)

        def candidates(folder: Path, tag: str) -> dict[str, Callable[[], None]]:
            return {
                "bundle (inference.yaml)": lambda: run_bundle(folder, root / f"bundle_{tag}", checkpoint, args),
                "per-frame pytorch-grad-cam": lambda: run_per_frame(folder, root / f"loop_{tag}", checkpoint, args),
                "bare batched forward": bare_forward(sorted(folder.glob("*.png")), checkpoint, args),
            }

        for fn in candidates(warm, "warm_up").values():
            fn()
        if args.profile:
            profile_bundle(study, root / "bundle_profile", checkpoint, args)
            return
        load = os.getloadavg()
        times = alternate(candidates(study, "study"), args.rounds, args.device, warm_up=False)
        agreement = compare(root / "bundle_study", root / "loop_study")
    amp = ", AMP" if args.amp else ""
    print(
        f"machine: {machine(args.device)}; {args.network} {args.image_size}²{amp}; {args.frames} PNG frames of "
        f"{args.frame_size}² ({args.distinct} distinct); batch {args.batch_size}, {args.workers} DataLoader workers; "
        f"median of {args.rounds} rounds; bundle heatmaps: {args.heatmaps}; load average before the runs "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)"
    )
    baseline = times["per-frame pytorch-grad-cam"]
    for name, seconds in times.items():
        print(
            f"{name:28s} {seconds:8.1f} s   {args.frames / seconds:8.1f} frames/s   speed-up {baseline / seconds:.2f}x"
        )
    bare = times["bare batched forward"]
    print(
        f"bundle / per-frame loop: {baseline / times['bundle (inference.yaml)']:.2f}x (goal >= 5); bundle / bare "
        f"forward throughput: {bare / times['bundle (inference.yaml)']:.2f} (goal >= 0.5)"
    )
    print(agreement)


if __name__ == "__main__":
    main()
