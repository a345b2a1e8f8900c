"""The ``medgain`` command line.

Sub-commands are grouped: ``medgain <group> <command> [options]``, one module per group. A group module has an
``add_parsers(subparsers)`` function that registers its parsers and, for every command, sets ``func`` (called
with the parsed namespace, returning the exit code) through ``set_defaults``; :func:`build_parser` calls each.
Commands import their heavy modules inside ``func`` so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import traceback

from medgain.cli import data, demo, partner, pipeline, registry, study, synth, tracking, unveil, wsi
from medgain.errors import short_report

__all__ = ["build_parser", "main"]

_GROUPS = (synth, data, demo, unveil, wsi, study, registry, partner, pipeline, tracking)


def build_parser() -> argparse.ArgumentParser:
    """The top-level ``medgain`` parser with all command groups registered."""
    parser = argparse.ArgumentParser(prog="medgain", description="Guided-attention (GAIN) training for medical images.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in _GROUPS:
        group.add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``medgain`` command line.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        the process exit code. medgain's own input errors print a short report ending in one line that names
        the file or value and what is wrong (see :mod:`medgain.errors`); other errors print their traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except subprocess.CalledProcessError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError) as err:
        report = short_report(err, prefix=f"{parser.prog}: error: ")
        if report is None:  # a bug, or MEDGAIN_TRACEBACK asked for the full traceback
            traceback.print_exc()
        else:
            print(report, file=sys.stderr)
        return 1
