"""``medgain wsi …``: whole-slide image data sets."""

from __future__ import annotations

import argparse
from pathlib import Path

from medgain.cli._args import bounded


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


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
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
    add("--level", type=bounded(int, 0), default=0, help="pyramid level of the patches (default: %(default)s)")
    add("--patch-size", type=bounded(int, 8), default=224, help="patch side in pixels of --level (default: %(default)s)")
    add("--stride", type=bounded(int, 1), default=None, help="grid step in pixels of --level (default: the patch size)")
    add("--split-fractions", type=bounded(float, 0.0, 1.0), nargs=3, default=[0.6, 0.2, 0.2],
        metavar=("TRAIN", "VAL", "TEST"), help="slide shares of the splits (default: 0.6 0.2 0.2); every split with a "
        "positive share gets tumour and normal slides, so per label 1 + the number of other splits are needed "
        "(an error says so); 1 0 0: training only")
    add("--seed", type=bounded(int, 0), default=0, help="random seed (default: %(default)s)")
    add("--annotation-column", default="annotation_xml", help="annotation column of --labels (default: %(default)s)")
    add("--min-coverage", type=bounded(float, 0.0, 1.0), default=0.5,
        help="tumour share of a patch for label 1 (default: %(default)s)")
    add("--min-tissue", type=bounded(float, 0.0, 1.0), default=0.5, help="tissue share of a patch (default: %(default)s)")
    add("--max-per-class", type=bounded(int, 1), default=None, help="cap on training patches per class")
    add("--max-eval-patches", type=bounded(int, 1), default=None, help="cap on validation / test patches per split")
    add("--backend", choices=["tifffile", "openslide", "cucim"], default="tifffile", help="WSI backend (default: %(default)s)")
    add("--mpp", "--default-mpp", dest="default_mpp", metavar="MPP", type=bounded(float, 0.001), default=None,
        help="microns per pixel to assume for slides whose metadata gives none (--default-mpp: same option)")
    patches.set_defaults(func=_run_wsi_patches)
