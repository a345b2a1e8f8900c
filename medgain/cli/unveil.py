"""``medgain unveil``: iterative unveiling of the regions behind a decision."""

from __future__ import annotations

import argparse
from pathlib import Path

from medgain.cli._args import bounded


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
    print(f"unveiling stopped below probability {result['prob_threshold']:.6g} ({result['prob_threshold_source']})")
    return 0


def _fill_value(text: str) -> str:
    if text == "mean":
        return text
    try:
        float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'mean' or numbers in [0, 1], got {text!r}") from None
    return text


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    unveil = subparsers.add_parser(
        "unveil",
        help="iterative unveiling: every region a trained classifier relies on, per frame of a folder",
        description="Saliency map -> smoothed mask -> region hidden -> classified again, until the target "
        "probability falls below --prob-threshold (default: the model's operating point), or rises (the region "
        "just hidden is then no evidence and is not kept). With --bundle, a model trained by another bundle is "
        "refused. Writes per frame a panel PNG, the regions as a label map "
        "(masks/*.png, *.nii.gz; value k in ROI k), unveil.csv and errors.csv. The network, input size, "
        "Grad-CAM layer and normalisation are read from the checkpoint's model_spec; for a checkpoint without "
        "one, from the options below and the bundle's configs/train.yaml.",
    )
    add = unveil.add_argument
    add("--bundle", type=Path, help="bundle folder (default checkpoint: BUNDLE/models/model.pt)")
    add("--checkpoint", type=Path, help="model checkpoint written by BestModelSaver, or a state dict")
    add("--input", type=Path, required=True, help="folder of PNG / JPEG / DICOM frames")
    add("--output", type=Path, required=True, help="output folder")
    add("--steps", type=bounded(int, 1), default=5, help="maximum regions per frame (default: %(default)s)")
    add(
        "--prob-threshold",
        type=bounded(float, 0.0, 1.0),
        default=None,
        help="stop once the target probability is below this (default: the model's operating point, where its "
        "decision changes; 0.5 for a model without one)",
    )
    add(
        "--source",
        default="guided_backprop",
        help="saliency: gradient, guided_backprop, smoothgrad, smoothgrad_guided or grad_cam (default: %(default)s)",
    )
    add("--target", type=bounded(int, 0), default=1, help="class explained (default: %(default)s, lesion)")
    add("--kernel-size", type=bounded(int, 1), default=11, help="smoothing window, odd (default: %(default)s)")
    add("--iterations", type=bounded(int, 1), default=3, help="smoothing passes (default: %(default)s)")
    add(
        "--threshold",
        type=bounded(float, 0.0, 1.0),
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
    add("--smoothgrad-samples", type=bounded(int, 1), default=16, help="SmoothGrad copies (default: %(default)s)")
    add("--noise", type=bounded(float, 0.0), default=0.15, help="SmoothGrad noise level (default: %(default)s)")
    add("--seed", type=bounded(int, 0), default=0, help="SmoothGrad noise seed (default: %(default)s)")
    add("--batch-size", type=bounded(int, 1), default=8, help="frames per batch (default: %(default)s)")
    add("--device", default="cpu", help="torch device (default: %(default)s)")
    add("--network", help="registry name, for a checkpoint without model_spec")
    add("--num-classes", type=bounded(int, 1), help="output logits, for a checkpoint without model_spec")
    add("--image-size", type=bounded(int, 1), help="network input side, for a checkpoint without model_spec")
    add("--target-layer", help="Grad-CAM layer (source grad_cam), for a checkpoint without model_spec")
    add("--norm-mean", type=float, nargs="+", help="input normalisation mean, for a checkpoint without model_spec")
    add("--norm-std", type=float, nargs="+", help="input normalisation std, for a checkpoint without model_spec")
    unveil.set_defaults(func=_run_unveil)
