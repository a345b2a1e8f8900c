"""``medgain sync`` and ``medgain runs doctor``: delivery of buffered tracking records."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


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


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
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
