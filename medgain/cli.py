"""The ``medgain`` command line.

Sub-commands are grouped: ``medgain <group> <command> [options]``.  A group is added by writing an
``_add_<group>_parser(subparsers)`` function that registers its parser and, for every command, sets
``func`` (called with the parsed namespace, returning the exit code) through ``set_defaults``; then
calling it from :func:`build_parser`.  Commands import their heavy modules inside ``func`` so that
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
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
    )
    print(datalist_path)
    for name, items in json.loads(datalist_path.read_text()).items():
        positives = sum(item["label"] for item in items)
        studies = len({item["study"] for item in items})
        negatives = len(items) - positives
        print(f"{name}: {len(items)} frames, {positives} positive, {negatives} negative, studies: {studies}")
    return 0


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
    capsule.set_defaults(func=_run_synth_capsule)


def _run_demo(args: argparse.Namespace) -> int:
    from medgain.demo import run_capsule_demo

    result = run_capsule_demo(
        args.out, args.n_frames, args.frame_size, args.image_size, args.max_epochs, args.network, seed=args.seed
    )
    print("\nmedgain demo — capsule endoscopy, test split:")
    for name, value in sorted(result["metrics"].items()):
        if not name.endswith("_threshold"):
            print(f"  {name:28s} {'nan' if value is None else f'{value:.4f}'}")
    print(f"best checkpoint: {result['checkpoint']}")
    print(f"evaluation outputs: {result['evaluation']}")
    print(f"browse the runs: mlflow ui --backend-store-uri {result['tracking_uri']}")
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


def build_parser() -> argparse.ArgumentParser:
    """The top-level ``medgain`` parser with all command groups registered."""
    parser = argparse.ArgumentParser(prog="medgain", description="Guided-attention (GAIN) training for medical images.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_synth_parser(subparsers)
    _add_demo_parser(subparsers)
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
    except (ValueError, OSError, subprocess.CalledProcessError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
