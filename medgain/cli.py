"""The ``medgain`` command line.

Sub-commands are grouped: ``medgain <group> <command> [options]``.  A group is added by writing an
``_add_<group>_parser(subparsers)`` function that registers its parser and, for every command, sets
``func`` (called with the parsed namespace, returning the exit code) through ``set_defaults``; then
calling it from :func:`build_parser`.  Commands import their heavy modules inside ``func`` so that
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]


def _bounded(kind: Callable[[str], int | float], low: float, high: float | None = None) -> Callable[[str], int | float]:
    """An argparse ``type`` converting with ``kind`` and checking ``low <= value (<= high)``."""

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return convert


class _Fractions(argparse.Action):
    """Store fractions (each already range-checked by ``type``) after checking that they sum to 1."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        values = list(values or [])
        if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
            parser.error(f"argument {option_string}: must sum to 1, got {' + '.join(map(str, values))}")
        setattr(namespace, self.dest, values)


def _run_synth_capsule(args: argparse.Namespace) -> int:
    from medgain.synth.capsule import make_capsule_dataset

    datalist_path = make_capsule_dataset(
        args.out,
        args.n_frames,
        seed=args.seed,
        size=args.size,
        prevalence=args.prevalence,
        shortcut_rate=args.shortcut_rate,
        dicom=args.dicom,
        frames_per_study=args.frames_per_study,
        split_fractions=args.split_fractions,
        lesions_per_frame=args.lesions_per_frame,
        shortcut_splits=args.shortcut_splits,
    )
    print(datalist_path)
    for name, items in json.loads(datalist_path.read_text()).items():
        positives = sum(item["label"] for item in items)
        studies = len({item["study"] for item in items})
        negatives = len(items) - positives
        print(f"{name}: {len(items)} frames, {positives} positive, {negatives} negative, studies: {studies}")
    return 0


def _run_synth_patterns(args: argparse.Namespace) -> int:
    from medgain.synth.patterns import make_pattern_dataset

    datalist_path = make_pattern_dataset(
        args.out,
        args.kind,
        args.n_images,
        seed=args.seed,
        size=args.size,
        rgb=args.rgb,
        field_size=args.field_size,
        prevalence=args.prevalence,
        split_fractions=args.split_fractions,
    )
    print(datalist_path)
    for name, items in json.loads(datalist_path.read_text()).items():
        tumour = sum(item["label"] for item in items)
        print(f"{name}: {len(items)} images, {tumour} tumour, {len(items) - tumour} normal")
    return 0


def _add_synth_patterns_parser(commands: argparse._SubParsersAction) -> None:
    patterns = commands.add_parser(
        "patterns",
        help="synthetic ellipse / stripe-and-checkerboard images with tumour masks (glimpse models)",
        description="Write synthetic pattern images (ellipses, pattern1, pattern2), 0/1 tumour masks and a MONAI "
        "datalist (datalist.json, dataset.json) into --out.",
    )
    add = patterns.add_argument
    add("--kind", choices=["ellipses", "pattern1", "pattern2"], required=True, help="pattern family")
    add("--out", type=Path, required=True, help="output directory")
    add("--n-images", type=_bounded(int, 3), required=True, help="number of images")
    add("--seed", type=_bounded(int, 0), required=True, help="random seed")
    add("--size", type=_bounded(int, 32), default=1024, help="image side in pixels (default: %(default)s)")
    add("--rgb", action="store_true", help="3-channel colour images instead of grey")
    add("--field-size", type=_bounded(int, 1), default=4, help="pattern2 grid side in patches (default: %(default)s)")
    add("--prevalence", type=_bounded(float, 0.0, 1.0), default=0.5, help="fraction of tumour images (default: %(default)s)")
    add(
        "--split-fractions",
        type=_bounded(float, 0.0, 1.0),
        nargs=3,
        action=_Fractions,
        default=[0.7, 0.15, 0.15],
        metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of the images in the training, validation and test splits (default: 0.7 0.15 0.15)",
    )
    patterns.set_defaults(func=_run_synth_patterns)


def _run_synth_dermoscopy(args: argparse.Namespace) -> int:
    from medgain.synth.dermoscopy import make_dermoscopy_dataset

    csv_path = make_dermoscopy_dataset(
        args.out,
        args.n_images,
        seed=args.seed,
        prevalence=args.prevalence,
        shortcut_rate=args.shortcut_rate,
        images_per_patient=args.images_per_patient,
        min_size=args.min_size,
        max_size=args.max_size,
    )
    summary = json.loads((csv_path.parent / "dataset.json").read_text())
    print(csv_path)
    print(
        f"{summary['n_images']} images, {summary['malignant']} malignant, {summary['n_patients']} patients, "
        f"{summary['ink_markings']} with ink markings"
    )
    return 0


def _add_synth_dermoscopy_parser(commands: argparse._SubParsersAction) -> None:
    dermoscopy = commands.add_parser(
        "dermoscopy",
        help="synthetic dermoscopy JPEGs with lesion masks and an ISIC-2020-style CSV",
        description="Write synthetic dermoscopy images (images/*.jpg), lesion masks (masks/*_segmentation.png), "
        "an ISIC-2020-style train.csv (patients with several images, age / sex / site metadata) and dataset.json "
        "into --out.",
    )
    probability = _bounded(float, 0.0, 1.0)
    add = dermoscopy.add_argument
    add("--out", type=Path, required=True, help="output directory")
    add("--n-images", type=_bounded(int, 1), required=True, help="number of images")
    add("--seed", type=_bounded(int, 0), required=True, help="random seed")
    add("--prevalence", type=probability, default=0.05, help="fraction of melanomas (default: %(default)s)")
    add(
        "--shortcut-rate",
        type=probability,
        default=0.0,
        help="fraction of the melanomas with ink markings beside the lesion, a shortcut confounder "
        "(default: %(default)s)",
    )
    add(
        "--images-per-patient",
        type=_bounded(float, 1.0),
        default=6.0,
        help="mean number of images per patient (default: %(default)s)",
    )
    add("--min-size", type=_bounded(int, 32), default=600, help="smallest longer image side (default: %(default)s)")
    add("--max-size", type=_bounded(int, 32), default=2000, help="largest longer image side (default: %(default)s)")
    dermoscopy.set_defaults(func=_run_synth_dermoscopy)


def _run_synth_wsi(args: argparse.Namespace) -> int:
    from medgain.synth.wsi import make_wsi_dataset

    labels = make_wsi_dataset(
        args.out,
        args.n_slides,
        seed=args.seed,
        size=args.size,
        tumour_rate=args.tumour_rate,
        mpp=args.mpp,
        compression=args.compression,
    )
    print(labels)
    with labels.open() as fh:
        rows = list(csv.DictReader(fh))
    tumour = sum(int(row["label"]) for row in rows)
    print(f"{len(rows)} slides: {tumour} tumour, {len(rows) - tumour} normal")
    return 0


def _add_synth_wsi_parser(commands: argparse._SubParsersAction) -> None:
    wsi = commands.add_parser(
        "wsi",
        help="synthetic H&E whole-slide images (pyramidal TIFF) with tumour annotations",
        description="Write synthetic pyramidal tiled TIFF slides (images/), tumour annotations as ASAP XML and "
        "GeoJSON (annotations/) and slide labels (labels.csv) into --out.",
    )
    add = wsi.add_argument
    add("--out", type=Path, required=True, help="output directory")
    add("--n-slides", type=_bounded(int, 1), required=True, help="number of slides")
    add("--seed", type=_bounded(int, 0), required=True, help="random seed")
    add("--size", type=_bounded(int, 512), default=16384, help="level-0 side of each slide in pixels (default: %(default)s)")
    add("--tumour-rate", type=_bounded(float, 0.0, 1.0), default=0.5, help="fraction of tumour slides (default: %(default)s)")
    add("--mpp", type=_bounded(float, 0.01), default=0.5, help="microns per pixel at level 0 (default: %(default)s)")
    add("--compression", choices=["jpeg", "deflate"], default="jpeg", help="tile compression (default: %(default)s)")
    wsi.set_defaults(func=_run_synth_wsi)


def _count_range(text: str) -> tuple[int, int]:
    """``"N"`` or ``"LOW-HIGH"`` as ``(low, high)`` with 1 <= low <= high <= 5."""
    parts = text.split("-")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW-HIGH, got {text!r}") from None
    if not 1 <= low <= high <= 5:
        raise argparse.ArgumentTypeError(f"expected N or LOW-HIGH with 1 <= LOW <= HIGH <= 5, got {text!r}")
    return low, high


def _add_synth_parser(subparsers: argparse._SubParsersAction) -> None:
    synth = subparsers.add_parser(
        "synth", help="generate synthetic data sets", description="Generate synthetic data sets."
    )
    commands = synth.add_subparsers(dest="synth_command", required=True, metavar="DATASET")
    capsule = commands.add_parser(
        "capsule",
        help="synthetic small-bowel capsule-endoscopy frames with lesion masks",
        description="Write synthetic capsule-endoscopy frames, lesion label maps (PNG and NIfTI) and a MONAI "
        "datalist split by study (datalist.json, dataset.json) into --out.",
    )
    probability = _bounded(float, 0.0, 1.0)
    add = capsule.add_argument
    add("--out", type=Path, required=True, help="output directory")
    add("--n-frames", type=_bounded(int, 1), required=True, help="number of frames")
    add("--seed", type=_bounded(int, 0), required=True, help="random seed")
    add("--size", type=_bounded(int, 32), default=256, help="frame height and width in pixels (default: %(default)s)")
    add("--prevalence", type=probability, default=0.1, help="fraction of frames with lesions (default: %(default)s)")
    add(
        "--shortcut-rate",
        type=probability,
        default=0.0,
        help="fraction of the positive frames that also carry a corner marker, a shortcut confounder "
        "(default: %(default)s)",
    )
    add(
        "--shortcut-splits",
        nargs="+",
        choices=["training", "validation", "test"],
        default=["training", "validation", "test"],
        metavar="SPLIT",
        help="splits whose positive frames may carry the marker, e.g. training validation for a clean test "
        "split (default: all)",
    )
    add("--dicom", action="store_true", help="write frames as DICOM VL Endoscopic images instead of PNG")
    add("--frames-per-study", type=_bounded(int, 1), default=20, help="frames per study (default: %(default)s)")
    add(
        "--split-fractions",
        type=probability,
        nargs=3,
        action=_Fractions,
        default=[0.7, 0.15, 0.15],
        metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of the studies in the training, validation and test splits (default: 0.7 0.15 0.15)",
    )
    add(
        "--lesions-per-frame",
        type=_count_range,
        default=None,
        metavar="N or LOW-HIGH",
        help="lesions per positive frame, e.g. 2 or 1-3 (at most 5), and a per-lesion label map per frame in "
        "lesions/ (default: 1-2 lesions, no per-lesion maps, as earlier versions)",
    )
    capsule.set_defaults(func=_run_synth_capsule)
    _add_synth_patterns_parser(commands)
    _add_synth_dermoscopy_parser(commands)
    _add_synth_wsi_parser(commands)


def _run_demo(args: argparse.Namespace) -> int:
    from medgain.demo import run_capsule_demo
    from medgain.tracking import ui_command, ui_url

    result = run_capsule_demo(
        args.out, args.n_frames, args.frame_size, args.image_size, args.max_epochs, args.network, seed=args.seed
    )
    metrics, notes = result["metrics"], result["notes"]
    print("\nmedgain demo — capsule endoscopy, test split")
    print("at the operating point that ships with the model (chosen on validation, FPR <= 0.1 %):")
    for figure in ("sensitivity", "specificity", "false_alarms", "false_alarms_per_1000", "accuracy"):
        value = metrics.get(f"test_{figure}")
        print(f"  {figure:28s} {'n/a (no operating point)' if value is None else f'{value:.4f}'}")
    print("threshold-free, localisation, and re-tuned on the test split (optimistic):")
    for name, value in sorted(metrics.items()):
        if name.startswith("test_") and name[5:] not in {
            "sensitivity", "specificity", "false_alarms", "false_alarms_per_1000", "accuracy"
        } and not name.endswith("_threshold"):
            line = f"  {name[5:]:28s} {'nan' if value is None else f'{value:.4f}'}"
            if name in notes:
                line += f"   ({notes[name]})"
            print(line)
    print(f"best checkpoint: {result['checkpoint']}")
    print(f"evaluation outputs: {result['evaluation']}")
    print("browse the runs (model-training view):")
    print(f"  {ui_command(result['tracking_uri'])}")
    print(f"  then open {ui_url()}")
    return 0


def _add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="synthetic capsule data, GAIN training and evaluation through monai.bundle run",
        description="Generate a small synthetic capsule-endoscopy data set, train the capsule bundle with GAIN "
        "and evaluate it on the test split (CPU: a few minutes), all tracked in a SQLite MLflow store.",
    )
    add = demo.add_argument
    add("--out", type=Path, default=Path("demo_out"), help="output directory (default: %(default)s)")
    add("--n-frames", type=_bounded(int, 100), default=900, help="synthetic frames (default: %(default)s)")
    add("--frame-size", type=_bounded(int, 32), default=128, help="synthetic frame size (default: %(default)s)")
    add("--image-size", type=_bounded(int, 32), default=96, help="network input size (default: %(default)s)")
    add("--max-epochs", type=_bounded(int, 1), default=16, help="training epochs (default: %(default)s)")
    add("--network", default="small_cnn", help="registry name of the classifier (default: %(default)s)")
    add("--seed", type=_bounded(int, 0), default=0, help="random seed (default: %(default)s)")
    demo.set_defaults(func=_run_demo)


def _run_unveil(args: argparse.Namespace) -> int:
    from medgain.unveil.command import run_unveil

    normalization = None
    if args.norm_mean is not None or args.norm_std is not None:
        if args.norm_mean is None or args.norm_std is None:
            raise ValueError("--norm-mean and --norm-std go together")
        normalization = {"mean": args.norm_mean, "std": args.norm_std}
    fill: str | float | list[float] = args.fill[0] if args.fill == ["mean"] else [float(v) for v in args.fill]
    result = run_unveil(
        args.input,
        args.output,
        args.checkpoint,
        args.bundle,
        target=args.target,
        batch_size=args.batch_size,
        device=args.device,
        spec_overrides={
            "network": args.network,
            "num_classes": args.num_classes,
            "image_size": args.image_size,
            "target_layer": args.target_layer,
            "normalization": normalization,
        },
        unveil_options={
            "source": args.source,
            "steps": args.steps,
            "prob_threshold": args.prob_threshold,
            "fill": fill,
            "kernel_size": args.kernel_size,
            "iterations": args.iterations,
            "threshold": args.threshold,
            "n_samples": args.smoothgrad_samples,
            "noise": args.noise,
            "seed": args.seed,
        },
    )
    print(f"{result['frames']} frame(s) unveiled, {result['errors']} unreadable file(s): {result['csv']}")
    return 0


def _fill_value(text: str) -> str:
    if text == "mean":
        return text
    try:
        float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'mean' or numbers in [0, 1], got {text!r}") from None
    return text


def _add_unveil_parser(subparsers: argparse._SubParsersAction) -> None:
    unveil = subparsers.add_parser(
        "unveil",
        help="iterative unveiling: every region a trained classifier relies on, per frame of a folder",
        description="Saliency map -> smoothed mask -> region hidden -> classified again, until the target "
        "probability falls below --prob-threshold. Writes per frame a panel PNG, the regions as a label map "
        "(masks/*.png, *.nii.gz; value k in ROI k), unveil.csv and errors.csv. The network, input size, "
        "Grad-CAM layer and normalisation are read from the checkpoint's model_spec; for a checkpoint without "
        "one, from the options below and the bundle's configs/train.yaml.",
    )
    add = unveil.add_argument
    add("--bundle", type=Path, help="bundle folder (default checkpoint: BUNDLE/models/model.pt)")
    add("--checkpoint", type=Path, help="model checkpoint written by BestModelSaver, or a state dict")
    add("--input", type=Path, required=True, help="folder of PNG / JPEG / DICOM frames")
    add("--output", type=Path, required=True, help="output folder")
    add("--steps", type=_bounded(int, 1), default=5, help="maximum regions per frame (default: %(default)s)")
    add(
        "--prob-threshold",
        type=_bounded(float, 0.0, 1.0),
        default=0.5,
        help="stop once the target probability is below this (default: %(default)s)",
    )
    add(
        "--source",
        default="guided_backprop",
        help="saliency: gradient, guided_backprop, smoothgrad, smoothgrad_guided or grad_cam (default: %(default)s)",
    )
    add("--target", type=_bounded(int, 0), default=1, help="class explained (default: %(default)s, lesion)")
    add("--kernel-size", type=_bounded(int, 1), default=11, help="smoothing window, odd (default: %(default)s)")
    add("--iterations", type=_bounded(int, 1), default=3, help="smoothing passes (default: %(default)s)")
    add(
        "--threshold",
        type=_bounded(float, 0.0, 1.0),
        default=0.5,
        help="smoothing threshold, relative to each map's maximum (default: %(default)s)",
    )
    add(
        "--fill",
        type=_fill_value,
        nargs="+",
        default=["mean"],
        help="colour of hidden regions: 'mean' (each frame's mean colour), one value or one per channel in [0, 1] "
        "(default: mean)",
    )
    add("--smoothgrad-samples", type=_bounded(int, 1), default=16, help="SmoothGrad copies (default: %(default)s)")
    add("--noise", type=_bounded(float, 0.0), default=0.15, help="SmoothGrad noise level (default: %(default)s)")
    add("--seed", type=_bounded(int, 0), default=0, help="SmoothGrad noise seed (default: %(default)s)")
    add("--batch-size", type=_bounded(int, 1), default=8, help="frames per batch (default: %(default)s)")
    add("--device", default="cpu", help="torch device (default: %(default)s)")
    add("--network", help="registry name, for a checkpoint without model_spec")
    add("--num-classes", type=_bounded(int, 1), help="output logits, for a checkpoint without model_spec")
    add("--image-size", type=_bounded(int, 1), help="network input side, for a checkpoint without model_spec")
    add("--target-layer", help="Grad-CAM layer (source grad_cam), for a checkpoint without model_spec")
    add("--norm-mean", type=float, nargs="+", help="input normalisation mean, for a checkpoint without model_spec")
    add("--norm-std", type=float, nargs="+", help="input normalisation std, for a checkpoint without model_spec")
    unveil.set_defaults(func=_run_unveil)


def _run_wsi_patches(args: argparse.Namespace) -> int:
    from medgain.wsi import make_patch_dataset

    counts = make_patch_dataset(
        args.labels,
        args.out,
        args.level,
        args.patch_size,
        fractions=args.split_fractions,
        seed=args.seed,
        annotation_column=args.annotation_column,
        max_per_class=args.max_per_class,
        max_eval_patches=args.max_eval_patches,
        stride=args.stride,
        min_coverage=args.min_coverage,
        min_tissue=args.min_tissue,
        backend=args.backend,
        default_mpp=args.default_mpp,
    )
    print(args.out)
    for split in ("training", "validation", "test"):
        print(
            f"{split}: {counts[f'{split}_slides']} slides, {counts[split]} patches "
            f"({counts[f'{split}_tumour']} tumour)"
        )
    return 0


def _add_wsi_parser(subparsers: argparse._SubParsersAction) -> None:
    wsi = subparsers.add_parser("wsi", help="whole-slide image data sets", description="Whole-slide image data sets.")
    commands = wsi.add_subparsers(dest="wsi_command", required=True, metavar="COMMAND")
    patches = commands.add_parser(
        "patches",
        help="split slides and write the patch tables of the whole-slide bundle",
        description="Split the slides of a label CSV (slide, label, image, annotation) by slide into training / "
        "validation / test, stratified by slide label, and write slides_<split>.csv and patches_<split>.csv "
        "(slide, x, y, level, label, coverage) into --out: a grid over the tissue, labelled from the tumour "
        "annotations; training patches balanced tumour / normal.",
    )
    add = patches.add_argument
    add("--labels", type=Path, required=True, help="slide label CSV (e.g. labels.csv of `medgain synth wsi`)")
    add("--out", type=Path, required=True, help="data set folder")
    add("--level", type=_bounded(int, 0), default=0, help="pyramid level of the patches (default: %(default)s)")
    add("--patch-size", type=_bounded(int, 8), default=224, help="patch side in pixels of --level (default: %(default)s)")
    add("--stride", type=_bounded(int, 1), default=None, help="grid step in pixels of --level (default: the patch size)")
    add("--split-fractions", type=_bounded(float, 0.0, 1.0), nargs=3, default=[0.6, 0.2, 0.2],
        metavar=("TRAIN", "VAL", "TEST"), help="slide shares of the splits (default: 0.6 0.2 0.2)")
    add("--seed", type=_bounded(int, 0), default=0, help="random seed (default: %(default)s)")
    add("--annotation-column", default="annotation_xml", help="annotation column of --labels (default: %(default)s)")
    add("--min-coverage", type=_bounded(float, 0.0, 1.0), default=0.5,
        help="tumour share of a patch for label 1 (default: %(default)s)")
    add("--min-tissue", type=_bounded(float, 0.0, 1.0), default=0.5, help="tissue share of a patch (default: %(default)s)")
    add("--max-per-class", type=_bounded(int, 1), default=None, help="cap on training patches per class")
    add("--max-eval-patches", type=_bounded(int, 1), default=None, help="cap on validation / test patches per split")
    add("--backend", choices=["tifffile", "openslide", "cucim"], default="tifffile", help="WSI backend (default: %(default)s)")
    add("--default-mpp", type=_bounded(float, 0.001), default=None,
        help="microns per pixel to assume for slides without resolution tags")
    patches.set_defaults(func=_run_wsi_patches)


def _run_study_run(args: argparse.Namespace) -> int:
    from medgain.study import load_study, run_study

    spec = load_study(args.study)
    outcomes = run_study(spec, workers=args.workers)
    counts = {status: sum(o.status == status for o in outcomes) for status in ("done", "skipped", "failed")}
    print(f"study {spec.name}: {counts['done']} run(s) done, {counts['skipped']} finished earlier (skipped), "
          f"{counts['failed']} failed; runs under {spec.output_dir / 'runs'}")
    for outcome in outcomes:
        if outcome.status == "failed":
            print(f"  FAILED {outcome.key.folder}: {outcome.message}", file=sys.stderr)
    print(f"report: .venv/bin/medgain study report {args.study}")
    return 1 if counts["failed"] else 0


def _run_study_report(args: argparse.Namespace) -> int:
    from medgain.study import load_study, write_report

    spec = load_study(args.study)
    path = write_report(spec, args.out, n_bootstrap=args.n_bootstrap, seed=args.seed)
    print(path.read_text())
    print(f"written: {path} (and summary.csv, differences.csv, runs.csv, plots beside it)")
    return 0


def _add_study_parser(subparsers: argparse._SubParsersAction) -> None:
    study = subparsers.add_parser(
        "study",
        help="grids of bundle configurations x seeds, with bootstrap confidence intervals",
        description="Run a study (configurations x seeds x data seeds of one bundle, each trained and evaluated "
        "through monai.bundle run) and report it. See pipelines/study/README.md.",
    )
    commands = study.add_subparsers(dest="study_command", required=True, metavar="ACTION")
    run = commands.add_parser("run", help="run every unfinished run of the study (finished runs are skipped)")
    run.add_argument("study", type=Path, help="study YAML file")
    run.add_argument("--workers", type=_bounded(int, 1), default=None,
                     help="parallel runs (default: the study's 'workers', else one per GPU, else 1)")
    run.set_defaults(func=_run_study_run)
    report = commands.add_parser("report", help="Markdown + CSV tables and plots of the finished runs")
    report.add_argument("study", type=Path, help="study YAML file")
    report.add_argument("--out", type=Path, default=None, help="report folder (default: <output_dir>/report)")
    report.add_argument("--n-bootstrap", type=_bounded(int, 100), default=1000,
                        help="bootstrap draws (default: %(default)s)")
    report.add_argument("--seed", type=_bounded(int, 0), default=0, help="bootstrap seed (default: %(default)s)")
    report.set_defaults(func=_run_study_report)


def _run_review(args: argparse.Namespace) -> int:
    from medgain.registry import review_model

    review = review_model(
        args.model, args.version, args.data, args.out, split=args.split, against=args.against,
        tracking_uri=args.tracking_uri, n_bootstrap=args.n_bootstrap, gallery_size=args.gallery_size,
        bundles_dir=args.bundles_dir,
    )
    for name, figure in review["figures"].items():
        print(f"{review['split']}_{name:24s} {figure['value']:.4f}  [{figure['low']:.4f}, {figure['high']:.4f}]")
    print(f"report: {Path(args.out) / 'report.html'} (logged as {review['report_link']})")
    return 0


def _run_promote(args: argparse.Namespace) -> int:
    from medgain.registry import PromotionRefused, promote

    try:
        result = promote(
            args.model, args.version, args.alias, args.gate, args.reviewer, override=args.override,
            reason=args.reason, tracking_uri=args.tracking_uri,
        )
    except PromotionRefused as err:
        print(f"medgain promote: refused: {err}", file=sys.stderr)
        return 2
    for verdict in result["verdicts"]:
        value = "n/a" if verdict["value"] is None else f"{verdict['value']:.4f}"
        print(f"{'pass' if verdict['passed'] else 'FAIL'}  {verdict['rule']}  {value}  {verdict['why']}".rstrip())
    print(f"{args.model} version {args.version}: {result['decision']} to alias {args.alias!r}")
    return 0


def _run_package(args: argparse.Namespace) -> int:
    from medgain.registry import build_package

    manifest = build_package(
        args.model, args.out, tracking_uri=args.tracking_uri, sign_key=args.sign_key, wheel=args.wheel,
        include_wheel=not args.no_wheel, bundles_dir=args.bundles_dir,
    )
    signed = "signed" if "signing_key" in manifest else "unsigned"
    print(f"{args.out}: {manifest['model']} version {manifest['version']}, {len(manifest['files'])} files, {signed}")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from medgain.registry import PackageVerificationError, verify_package

    try:
        manifest = verify_package(args.package, args.public_key, require_signature=args.require_signature)
    except PackageVerificationError as err:
        print(f"medgain verify: FAILED: {err}", file=sys.stderr)
        return 1
    checked = "hashes and signature" if args.public_key else "hashes (no public key: signer not checked)"
    print(f"{args.package}: OK ({checked}); {manifest['model']} version {manifest['version']}")
    return 0


def _add_registry_parsers(subparsers: argparse._SubParsersAction) -> None:
    """``medgain review | promote | package | verify``: the model registry's review, gate and partner packages."""
    tracking = {"help": "MLflow tracking / registry URI (default: $MLFLOW_TRACKING_URI)"}
    review = subparsers.add_parser(
        "review",
        help="evaluate a registered model version and write the reviewer's HTML report",
        description="Evaluate model NAME version V on a data split through its bundle's evaluate config; "
        "writes OUT/report.html (self-contained) and OUT/review.json, logs them on the version's run and links "
        "the report from the version.",
    )
    add = review.add_argument
    add("--model", required=True, help="registered model name")
    add("--version", required=True, help="model version")
    add("--data", type=Path, required=True,
        help="the evaluated data: a datalist JSON, a dermoscopy CSV, or the bundle's data folder (whole-slide, "
        "dermoscopy: dataset_dir)")
    add("--split", default="test", help="datalist split (default: %(default)s)")
    add("--against", help="alias of the model compared with on the same data (e.g. champion)")
    add("--out", type=Path, required=True, help="output folder")
    add("--n-bootstrap", type=_bounded(int, 10), default=1000, help="bootstrap resamples (default: %(default)s)")
    add("--gallery-size", type=_bounded(int, 0), default=8, help="frames per gallery category (default: %(default)s)")
    add("--bundles-dir", type=Path, help="folder of the bundle folders (default: the repository's bundles/)")
    add("--tracking-uri", **tracking)
    review.set_defaults(func=_run_review)
    promote = subparsers.add_parser(
        "promote",
        help="check a reviewed version against a gate and move a registry alias to it",
        description="Check the rules of GATE against the version's review; on pass move ALIAS to the version. "
        "The decision (reviewer, time, gate hash, each rule's value and verdict) is recorded as version tags.",
    )
    add = promote.add_argument
    add("--model", required=True, help="registered model name")
    add("--version", required=True, help="model version")
    add("--alias", default="champion", help="alias moved on pass (default: %(default)s)")
    add("--gate", type=Path, required=True, help="gate YAML (rules, not_worse_than)")
    add("--reviewer", required=True, help="who decides (recorded)")
    add("--override", action="store_true", help="promote although rules fail (needs --reason; recorded)")
    add("--reason", help="why the gate is overridden")
    add("--tracking-uri", **tracking)
    promote.set_defaults(func=_run_promote)
    package = subparsers.add_parser(
        "package",
        help="a reviewed model version as an offline MONAI bundle zip for a partner hospital",
        description="Build a MONAI bundle zip (standalone inference, evaluate config, weights, TorchScript, model "
        "card, review report, medgain wheel, manifest with sha256 of every file, optional Ed25519 signature).",
    )
    add = package.add_argument
    add("--model", required=True, help="NAME@ALIAS or NAME@VERSION, e.g. capsule_endoscopy_gain@champion")
    add("--out", type=Path, required=True, help="zip file written")
    add("--sign-key", type=Path, help="Ed25519 private key (PEM) signing the manifest")
    add("--wheel", type=Path, help="medgain wheel to include (default: built from this source tree)")
    add("--no-wheel", action="store_true", help="leave the wheel out (requirements.txt pins medgain)")
    add("--bundles-dir", type=Path, help="folder of the bundle folders (default: the repository's bundles/)")
    add("--tracking-uri", **tracking)
    package.set_defaults(func=_run_package)
    verify = subparsers.add_parser(
        "verify",
        help="check a partner package's file hashes and signature",
        description="Check every file of a package (zip or unpacked folder) against its manifest and, with "
        "--public-key, the Ed25519 signature; exits non-zero naming the first file that differs.",
    )
    verify.add_argument("package", type=Path, help="package zip or unpacked folder")
    verify.add_argument("--public-key", type=Path, help="signer's Ed25519 public key (PEM)")
    verify.add_argument("--require-signature", action="store_true", help="fail without a verified signature")
    verify.set_defaults(func=_run_verify)


def _run_pipeline_attention_crop(args: argparse.Namespace) -> int:
    from medgain.pipeline import run_attention_crop

    summary = run_attention_crop(
        args.config, dataset_dir=args.dataset_dir, output_dir=args.output_dir, seed=args.seed
    )
    print(json.dumps({k: summary[k] for k in ("weights", "oof", "test") if k in summary}, indent=2))
    print(f"MLflow: {summary['tracking_uri']} (parent run {summary['parent_run_id']})")
    return 0


def _add_pipeline_parser(subparsers: argparse._SubParsersAction) -> None:
    pipeline = subparsers.add_parser(
        "pipeline", help="multi-stage workflows composing bundles", description="Multi-stage workflows."
    )
    commands = pipeline.add_subparsers(dest="pipeline_command", required=True, metavar="PIPELINE")
    crop = commands.add_parser(
        "attention-crop",
        help="dermoscopy: full-image model, attention crops of the originals, crop model, OOF-weighted ensemble",
        description="Run or resume the attention-guided cropping pipeline (pipelines/attention_crop/README.md); "
        "stages whose output exists are skipped.",
    )
    crop.add_argument("--config", required=True, help="pipeline YAML, e.g. pipelines/attention_crop/config.yaml")
    crop.add_argument("--dataset-dir", default=None, help="replaces the config's dataset_dir")
    crop.add_argument("--output-dir", default=None, help="replaces the config's output_dir")
    crop.add_argument("--seed", type=_bounded(int, 0), default=None, help="replaces the config's seed")
    crop.set_defaults(func=_run_pipeline_attention_crop)


def _print_journals(results: list[dict[str, Any]]) -> int:
    for row in results:
        print(
            f"{row['journal']}  run {row['run_name']} ({row['run_id'] or 'not created yet'}): {row['records']} "
            f"records, {row['pending']} pending, {row['rejected']} refused by the server — {row['status']}"
        )
    if not results:
        print("no tracking journals found")
    return 0 if all(row["status"] == "delivered" for row in results) else 1


def _run_sync(args: argparse.Namespace) -> int:
    from medgain.tracking import sync

    return _print_journals(sync(args.run_dir))


def _run_runs_doctor(args: argparse.Namespace) -> int:
    from medgain.tracking import sync

    return _print_journals(sync(args.run_dir, mark_killed=True))


def _add_tracking_parsers(subparsers: argparse._SubParsersAction) -> None:
    sync = subparsers.add_parser(
        "sync",
        help="send the MLflow records a run kept while the tracking server was unreachable",
        description="Deliver, in order and exactly once, every tracking journal under RUN_DIR (e.g. "
        "<bundle_root>/models/tracking) that no running process holds. Exit code 1 while some stay pending.",
    )
    sync.add_argument("run_dir", type=Path, help="a run's checkpoint folder, its tracking folder or one journal")
    sync.set_defaults(func=_run_sync)
    runs = subparsers.add_parser("runs", help="tracked runs", description="Tracked runs.")
    commands = runs.add_subparsers(dest="runs_command", required=True, metavar="COMMAND")
    doctor = commands.add_parser(
        "doctor",
        help="mark runs whose process was killed as KILLED and deliver what they kept",
        description="For every tracking journal under RUN_DIR that no running process holds: a run that was never "
        "closed (its process was killed) is marked KILLED; then everything pending is delivered.",
    )
    doctor.add_argument("run_dir", type=Path, help="a run's checkpoint folder, its tracking folder or one journal")
    doctor.set_defaults(func=_run_runs_doctor)


def build_parser() -> argparse.ArgumentParser:
    """The top-level ``medgain`` parser with all command groups registered."""
    parser = argparse.ArgumentParser(prog="medgain", description="Guided-attention (GAIN) training for medical images.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_synth_parser(subparsers)
    _add_demo_parser(subparsers)
    _add_unveil_parser(subparsers)
    _add_wsi_parser(subparsers)
    _add_study_parser(subparsers)
    _add_registry_parsers(subparsers)
    _add_pipeline_parser(subparsers)
    _add_tracking_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``medgain`` command line.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        the process exit code.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError, subprocess.CalledProcessError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
