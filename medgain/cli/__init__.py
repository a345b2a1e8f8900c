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

from medgain.cli import demo, pipeline, registry, study, synth, tracking, unveil, wsi

__all__ = ["build_parser", "main"]

_GROUPS = (synth, demo, unveil, wsi, study, registry, pipeline, tracking)


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
        the process exit code.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError, subprocess.CalledProcessError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
