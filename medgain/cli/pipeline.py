"""``medgain pipeline …``: multi-stage workflows composing bundles."""

from __future__ import annotations

import argparse
import json

from medgain.cli._args import bounded


def _run_pipeline_attention_crop(args: argparse.Namespace) -> int:
    from medgain.pipeline import run_attention_crop

    summary = run_attention_crop(
        args.config, dataset_dir=args.dataset_dir, output_dir=args.output_dir, seed=args.seed
    )
    print(json.dumps({k: summary[k] for k in ("weights", "oof", "test") if k in summary}, indent=2))
    print(f"MLflow: {summary['tracking_uri']} (parent run {summary['parent_run_id']})")
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
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
    crop.add_argument("--seed", type=bounded(int, 0), default=None, help="replaces the config's seed")
    crop.set_defaults(func=_run_pipeline_attention_crop)
