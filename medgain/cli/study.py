"""``medgain study run | report``: studies of configurations x seeds."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medgain.cli._args import bounded


def _run_study_run(args: argparse.Namespace) -> int:
    from medgain.study import load_study, run_study

    spec = load_study(args.study).subset(args.seeds, args.data_seeds, args.methods)
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


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    study = subparsers.add_parser(
        "study",
        help="grids of bundle configurations x seeds, with bootstrap confidence intervals",
        description="Run a study (configurations x seeds x data seeds of one bundle, each trained and evaluated "
        "through monai.bundle run) and report it. See pipelines/study/README.md.",
    )
    commands = study.add_subparsers(dest="study_command", required=True, metavar="ACTION")
    run = commands.add_parser("run", help="run every unfinished run of the study (finished runs are skipped)")
    run.add_argument("study", type=Path, help="study YAML file")
    run.add_argument("--workers", type=bounded(int, 1), default=None,
                     help="parallel runs (default: the study's 'workers', else one per GPU, else 1)")
    run.add_argument("--seeds", type=bounded(int, 0), nargs="+", default=None,
                     help="run only these of the study's training seeds (default: all of them)")
    run.add_argument("--data-seeds", type=bounded(int, 0), nargs="+", default=None,
                     help="run only these of the study's data seeds (default: all of them); the report reads "
                          "whatever runs have finished, and a later full run skips them")
    run.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                     help="run only these of the study's configurations, each on all its data variants (default: "
                          "all of them)")
    run.set_defaults(func=_run_study_run)
    report = commands.add_parser("report", help="Markdown + CSV tables and plots of the finished runs")
    report.add_argument("study", type=Path, help="study YAML file")
    report.add_argument("--out", type=Path, default=None, help="report folder (default: <output_dir>/report)")
    report.add_argument("--n-bootstrap", type=bounded(int, 100), default=1000,
                        help="bootstrap draws (default: %(default)s)")
    report.add_argument("--seed", type=bounded(int, 0), default=0, help="bootstrap seed (default: %(default)s)")
    report.set_defaults(func=_run_study_report)
