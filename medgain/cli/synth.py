"""``medgain synth …``: synthetic data sets with known masks."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from medgain.cli._args import Fractions, bounded


def _run_synth_capsule(args: argparse.Namespace) -> int:
    from medgain.synth.capsule import make_capsule_dataset
    from medgain.synth.progress import print_progress

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
        progress=print_progress("synthetic capsule frames"),
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
    from medgain.synth.progress import print_progress

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
        progress=print_progress(f"synthetic {args.kind} images"),
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
    add("--n-images", type=bounded(int, 3), required=True, help="number of images")
    add("--seed", type=bounded(int, 0), required=True, help="random seed")
    add("--size", type=bounded(int, 32), default=1024, help="image side in pixels (default: %(default)s)")
    add("--rgb", action="store_true", help="3-channel colour images instead of grey")
    add("--field-size", type=bounded(int, 1), default=4, help="pattern2 grid side in patches (default: %(default)s)")
    add("--prevalence", type=bounded(float, 0.0, 1.0), default=0.5, help="fraction of tumour images (default: %(default)s)")
    add(
        "--split-fractions",
        type=bounded(float, 0.0, 1.0),
        nargs=3,
        action=Fractions,
        default=[0.7, 0.15, 0.15],
        metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of the images in the training, validation and test splits (default: 0.7 0.15 0.15)",
    )
    patterns.set_defaults(func=_run_synth_patterns)


def _run_synth_dermoscopy(args: argparse.Namespace) -> int:
    from medgain.synth.dermoscopy import make_dermoscopy_dataset
    from medgain.synth.progress import print_progress

    csv_path = make_dermoscopy_dataset(
        args.out,
        args.n_images,
        seed=args.seed,
        prevalence=args.prevalence,
        shortcut_rate=args.shortcut_rate,
        images_per_patient=args.images_per_patient,
        min_size=args.min_size,
        max_size=args.max_size,
        n_folds=args.n_folds,
        test_fraction=args.test_fraction,
        shortcut_folds=args.shortcut_folds,
        ink_probe=args.ink_probe,
        progress=print_progress("synthetic dermoscopy images"),
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
    probability = bounded(float, 0.0, 1.0)
    add = dermoscopy.add_argument
    add("--out", type=Path, required=True, help="output directory")
    add("--n-images", type=bounded(int, 1), required=True, help="number of images")
    add("--seed", type=bounded(int, 0), required=True, help="random seed")
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
        type=bounded(float, 1.0),
        default=6.0,
        help="mean number of images per patient (default: %(default)s)",
    )
    add("--min-size", type=bounded(int, 32), default=600, help="smallest longer image side (default: %(default)s)")
    add("--max-size", type=bounded(int, 32), default=2000, help="largest longer image side (default: %(default)s)")
    add("--n-folds", type=bounded(int, 0), default=0,
        help="write folds.csv, the bundle's fold table (its folds_source), with this many cross-validation folds and a "
        "test fold -1 (default: %(default)s, none)")
    add("--test-fraction", type=bounded(float, 0.0, 0.9), default=0.2,
        help="share of the patients in the test fold of folds.csv (default: %(default)s)")
    add("--shortcut-folds", type=int, nargs="+", default=None, metavar="FOLD",
        help="only melanomas of these folds carry ink, e.g. 1 2 for the training folds of a run validated on fold 0 "
        "(default: any melanoma; needs --n-folds)")
    add("--ink-probe", action="store_true",
        help="also write every clean test image again with its ink markings, and the ink's pixels, under probe/ "
        "(the ink-reliance probe of a shortcut study; needs --n-folds)")
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
        difficulty=args.difficulty,
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
    add("--n-slides", type=bounded(int, 1), required=True, help="number of slides")
    add("--seed", type=bounded(int, 0), required=True, help="random seed")
    add("--size", type=bounded(int, 512), default=16384, help="level-0 side of each slide in pixels (default: %(default)s)")
    add("--tumour-rate", type=bounded(float, 0.0, 1.0), default=0.5, help="fraction of tumour slides (default: %(default)s)")
    add("--mpp", type=bounded(float, 0.01), default=0.5, help="microns per pixel at level 0 (default: %(default)s)")
    add("--compression", choices=["jpeg", "deflate"], default="jpeg", help="tile compression (default: %(default)s)")
    add(
        "--difficulty",
        choices=["standard", "hard"],
        default="standard",
        help="standard: one large tumour region per tumour slide, uniform stain (the demo's data); hard: "
        "metastases from ITC to macro size, per-slide stain and scanner variation, folds, pen marks, blur and "
        "tumour-like normal structures (default: %(default)s)",
    )
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


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
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
    probability = bounded(float, 0.0, 1.0)
    add = capsule.add_argument
    add("--out", type=Path, required=True, help="output directory")
    add("--n-frames", type=bounded(int, 1), required=True, help="number of frames")
    add("--seed", type=bounded(int, 0), required=True, help="random seed")
    add("--size", type=bounded(int, 32), default=256, help="frame height and width in pixels (default: %(default)s)")
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
    add("--frames-per-study", type=bounded(int, 1), default=20, help="frames per study (default: %(default)s)")
    add(
        "--split-fractions",
        type=probability,
        nargs=3,
        action=Fractions,
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
