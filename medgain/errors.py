"""Errors a person can act on: medgain's own input errors (a missing file, a bad label, the wrong model, a bad
config value) end the program with a short report whose last line names the file or value and what is wrong,
instead of a 50-line traceback whose last line is MONAI's ``RuntimeError: Failed to evaluate ConfigExpression``.

An exception is *medgain's own* when it is a :class:`MedgainError`, a ``ValueError`` / ``OSError`` /
``RuntimeError`` raised by a ``raise`` statement in medgain's code (the innermost frame of its traceback is in the
``medgain`` package), or a file-system error naming its file (``FileNotFoundError: … 'x.csv'``) met while medgain
code ran. Anything else (a ``TypeError``, a ``KeyError``, an error raised inside torch, numpy or
MONAI) is a bug and keeps its full traceback. Setting the environment variable ``MEDGAIN_TRACEBACK=1`` shows the
full traceback for every error.

Importing :mod:`medgain` installs :func:`excepthook` (bundle configs import medgain, so ``python -m monai.bundle
run …`` reports this way too); the ``medgain`` command line uses :func:`short_report` directly.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

__all__ = [
    "TRACEBACK_ENV",
    "MedgainError",
    "excepthook",
    "full_traceback_requested",
    "install_excepthook",
    "own_error",
    "short_report",
]

TRACEBACK_ENV = "MEDGAIN_TRACEBACK"
_PACKAGE_DIR = Path(__file__).resolve().parent
_OWN_TYPES = (ValueError, OSError, RuntimeError)
_MAX_MESSAGE_LINES = 10
_MAX_CONTEXT_CHARS = 200


class MedgainError(ValueError):
    """Bad input to medgain (a file, a label, a model, a config value); its message names what and why."""


def full_traceback_requested() -> bool:
    """Whether ``MEDGAIN_TRACEBACK`` asks for full tracebacks (set, and not ``0``, ``false``, ``no`` or empty)."""
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first."""
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in out):
        out.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return out


def _in_medgain(frame: FrameType) -> bool:
    return Path(frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


def _is_own(exc: BaseException) -> bool:
    """Whether ``exc`` is a :class:`MedgainError`, a ``ValueError`` / ``OSError`` / ``RuntimeError`` whose
    innermost frame is in medgain, or a file-system ``OSError`` naming its file met while medgain code ran."""
    if isinstance(exc, MedgainError):
        return True
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    if not frames:
        return False
    if isinstance(exc, _OWN_TYPES) and _in_medgain(frames[-1]):
        return True
    return isinstance(exc, OSError) and exc.filename is not None and any(_in_medgain(f) for f in frames)


def own_error(exc: BaseException) -> BaseException | None:
    """The medgain input error behind ``exc``, or None when ``exc`` is a bug.

    Args:
        exc: the exception that ended the program (possibly a wrapper such as MONAI's config-evaluation error).

    Returns:
        the innermost exception of ``exc``'s chain that is medgain's own, provided every exception it was raised
        from is medgain's own or an ``OSError`` / ``ValueError`` (a file that cannot be read, a number that cannot
        be parsed); None otherwise.
    """
    chain = _chain(exc)
    for depth in range(len(chain) - 1, -1, -1):
        if _is_own(chain[depth]):
            causes = chain[depth + 1:]
            if all(isinstance(cause, (OSError, ValueError)) for cause in causes):
                return chain[depth]
            return None
    return None


def _message(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = text.strip().splitlines() or [""]
    if len(lines) > _MAX_MESSAGE_LINES:
        lines = [*lines[: _MAX_MESSAGE_LINES - 1], f"… ({len(lines) - _MAX_MESSAGE_LINES + 1} more lines)"]
    return "\n".join(lines)


def _where(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame of ``exc`` in medgain's code (else the innermost frame),
    the file relative to the working folder."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "medgain"
    own = [f for f in frames if Path(f.filename).resolve().is_relative_to(_PACKAGE_DIR)]
    frame = (own or frames)[-1]
    path = Path(frame.filename)
    try:
        shown = str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        shown = str(path)
    return f"{shown}:{frame.lineno} in {frame.name}"


def short_report(exc: BaseException, prefix: str = "") -> str | None:
    """The short report of a medgain input error, or None when ``exc`` is a bug (or full tracebacks are asked for).

    Args:
        exc: the exception that ended the program.
        prefix: put before the last line (``"medgain: error: "`` for the command line); default: the error's type.

    Returns:
        at most 12 lines: where the error was raised, the outermost wrapper's message when it wraps the error
        (e.g. the failing config expression, cut to one line), how to see the full traceback, and last the
        error's message.
    """
    if full_traceback_requested():
        return None
    own = own_error(exc)
    if own is None:
        return None
    lines = [f"error raised at {_where(own)} (set {TRACEBACK_ENV}=1 for the full traceback)"]
    if exc is not own:
        context = " ".join(str(exc).split())
        if len(context) > _MAX_CONTEXT_CHARS:
            context = context[: _MAX_CONTEXT_CHARS - 1] + "…"
        lines.insert(0, f"while: {context}")
    lines.append(f"{prefix or type(own).__name__ + ': '}{_message(own)}")
    return "\n".join(lines)


Hook = Callable[[type[BaseException], BaseException, TracebackType | None], Any]


def excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None, *, fallback: Hook = sys.__excepthook__
) -> None:
    """``sys.excepthook`` that prints :func:`short_report` for medgain's own errors and defers to ``fallback``
    (Python's default traceback) for everything else."""
    report = short_report(exc) if isinstance(exc, Exception) else None
    if report is None:
        fallback(exc_type, exc, tb)
        return
    sys.stderr.flush()
    print(report, file=sys.stderr)


def install_excepthook() -> None:
    """Make :func:`excepthook` the interpreter's ``sys.excepthook``, in front of the hook already there (once)."""
    if getattr(sys.excepthook, "__medgain__", False):
        return
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        excepthook(exc_type, exc, tb, fallback=previous)

    hook.__medgain__ = True  # type: ignore[attr-defined]
    sys.excepthook = hook
