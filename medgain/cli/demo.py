"""``medgain demo``: the capsule demo."""

from __future__ import annotations

import argparse
from pathlib import Path

from medgain.cli._args import bounded


def _run_demo(args: argparse.Namespace) -> int:
    from medgain.demo import run_capsule_demo
    from medgain.tracking import ui_command, ui_url

    result = run_capsule_demo(
        args.out, args.n_frames, args.frame_size, args.image_size, args.max_epochs, args.network, seed=args.seed
    )
    metrics, notes = result["metrics"], result["notes"]
    at_point = ("sensitivity", "specificity", "false_alarms", "false_alarms_per_1000", "accuracy", "fpr_upper",
                "fpr_above_bound")
    print("\nmedgain demo — capsule endoscopy, test split")
    print("at the operating point that ships with the model (chosen on validation, FPR <= 0.1 %):")
    print(f"  {result['operating_point']['statement']}")
    for figure in at_point:
        value = metrics.get(f"test_{figure}")
        line = f"  {figure:28s} {'n/a (unknown or no operating point)' if value is None else f'{value:.4f}'}"
        if f"test_{figure}" in notes and figure == "fpr_above_bound":
            line += f"   ({notes[f'test_{figure}']})"
        print(line)
    print("threshold-free, localisation, and re-tuned on the test split (optimistic):")
    for name, value in sorted(metrics.items()):
        if name.startswith("test_") and name[5:] not in at_point and not name.endswith(
            ("_threshold", "_negatives", "_positives", "_false_alarms")
        ):
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


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="synthetic capsule data, GAIN training and evaluation through monai.bundle run",
        description="Generate a small synthetic capsule-endoscopy data set, train the capsule bundle with GAIN "
        "and evaluate it on the test split (CPU: about 4 minutes), all tracked in a SQLite MLflow store.",
    )
    add = demo.add_argument
    add("--out", type=Path, default=Path("demo_out"), help="output directory (default: %(default)s)")
    add("--n-frames", type=bounded(int, 100), default=900, help="synthetic frames (default: %(default)s)")
    add("--frame-size", type=bounded(int, 32), default=96, help="synthetic frame size (default: %(default)s)")
    add("--image-size", type=bounded(int, 32), default=64, help="network input size (default: %(default)s)")
    add("--max-epochs", type=bounded(int, 1), default=14, help="training epochs (default: %(default)s)")
    add("--network", default="small_cnn", help="registry name of the classifier (default: %(default)s)")
    add("--seed", type=bounded(int, 0), default=0, help="random seed (default: %(default)s)")
    demo.set_defaults(func=_run_demo)
