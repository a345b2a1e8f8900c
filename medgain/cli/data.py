"""``medgain data …``: datalists from data as public releases and teams store it."""

from __future__ import annotations

import argparse
from pathlib import Path

from medgain.cli._args import Fractions, bounded


def _run_capsule_datalist(args: argparse.Namespace) -> int:
    from medgain.data.kvasir import capsule_datalist, parse_class_roles

    summary = capsule_datalist(
        args.root,
        args.out,
        args.layout,
        metadata=args.metadata,
        class_roles=parse_class_roles(args.map),
        split_fractions=args.split_fractions,
        seed=args.seed,
    )
    print(args.out)
    for name, counts in summary["splits"].items():
        print(
            f"{name}: {counts['frames']} frames, {counts['lesion']} lesion ({counts['lesion_with_box']} with a box "
            f"mask), {counts['videos']} videos"
        )
    print(f"excluded: {summary['excluded']} frames")
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="datalists from stored data", description="Datalists from stored data.")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    capsule = commands.add_parser(
        "capsule-datalist",
        help="write the capsule bundle's datalist for a folder of labelled frames",
        description="Write the capsule bundle's datalist.json for labelled frames stored one folder per finding "
        "class: Kvasir-Capsule's labelled images with their metadata.csv (--layout kvasir-capsule), or a team's "
        "own export (--layout folders; a frame's video is its sub-folder or its file name up to the last '_'). "
        "Whole videos go to one split; finding classes become lesion / normal frames or are left out by the "
        "table in medgain.data.kvasir.KVASIR_CAPSULE_ROLES (--map overrides it); a lesion frame's bounding boxes "
        "become a box mask, written under <--out folder>/box_masks/.",
    )
    add = capsule.add_argument
    add("--layout", choices=["kvasir-capsule", "folders"], required=True, help="how the frames are stored")
    add("--root", type=Path, required=True, help="the folder with one folder per finding class")
    add("--out", type=Path, required=True, help="datalist JSON to write (paths in it are relative to its folder)")
    add("--metadata", type=Path, default=None, help="Kvasir-Capsule metadata CSV (default: <root>/metadata.csv)")
    add("--map", action="append", default=[], metavar="CLASS=ROLE",
        help="role of a finding class: lesion, normal or exclude (repeatable), e.g. --map 'Foreign body=lesion'")
    add("--split-fractions", type=bounded(float, 0.0, 1.0), nargs=3, default=[0.7, 0.15, 0.15], action=Fractions,
        metavar=("TRAIN", "VAL", "TEST"), help="frame shares of the splits, whole videos each (default: 0.7 0.15 0.15)")
    add("--seed", type=bounded(int, 0), default=0, help="seed of the video order among equals (default: %(default)s)")
    capsule.set_defaults(func=_run_capsule_datalist)
