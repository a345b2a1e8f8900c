"""Errors a person can act on: medgain's own input errors (a missing file, a bad label, the wrong model, a bad
config value) end the program with a short report whose last line names the file or value and what is wrong,
instead of a 50-line traceback whose last line is MONAI's ``RuntimeError: Failed to evaluate ConfigExpression``.

An exception is *medgain's own* when it is a :class:`MedgainError`, a ``ValueError`` / ``OSError`` /
``RuntimeError`` raised by a ``raise`` statement in medgain's code (the innermost frame of its traceback is in the
``medgain`` package), or a file-system error naming its file (``FileNotFoundError: … 'x.csv'``) met while medgain
code ran. Anything else (a ``TypeError``, a ``KeyError``, an error raised inside torch, numpy or
MONAI) is a bug and keeps its full traceback. Setting the environment variable ``MEDGAIN_TRACEBACK=1`` shows the
full traceback for every error.

An error raised in a DataLoader worker process reaches the main process as torch re-raises it: an exception of the
same type whose message is ``Caught X in DataLoader worker process N.`` followed by the worker's whole formatted
traceback (its chain included). That text is read back into the chain it describes, so a medgain error raised in a
worker gets the same short report, naming the worker.

Importing :mod:`medgain` installs :func:`excepthook` (bundle configs import medgain, so ``python -m monai.bundle
run …`` reports this way too); the ``medgain`` command line uses :func:`short_report` directly.
"""

from __future__ import annotations

import builtins
import os
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
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
# torch.utils.data re-raises a worker's exception with this message (torch/_utils.py, ExceptionWrapper.reraise)
_WORKER_ERROR = re.compile(r"^Caught \S+ in (.+?)\.\nOriginal (Traceback \(most recent call last\):\n.*)$", re.S)
_CHAIN_SEPARATOR = re.compile(
    r"\n\n(?:The above exception was the direct cause of the following exception:"
    r"|During handling of the above exception, another exception occurred:)\n\n"
)
_FRAME_LINE = re.compile(r'^  File "(.+)", line (\d+), in (.+)$')
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?:: (.*))?$", re.S)
_NAMED_FILE = re.compile(r"^\[Errno \d+\] .+: '.+'")


class MedgainError(ValueError):
    """Bad input to medgain (a file, a label, a model, a config value); its message names what and why."""


@dataclass(frozen=True)
class _Raised:
    """One exception of a chain: a live one (``exc``), or one read back from a worker's traceback text.

    ``kind`` is None for a type that cannot be found in this process; ``frames`` are ``(file, line, function)``,
    outermost first; ``where`` names the worker process (``""`` for the main process)."""

    kind: type[BaseException] | None
    message: str
    frames: tuple[tuple[str, int, str], ...]
    exc: BaseException | None = None
    where: str = ""

    @property
    def names_file(self) -> bool:
        """Whether it is a file-system error naming its file (``[Errno 2] No such file or directory: 'x'``)."""
        if self.exc is not None:
            return getattr(self.exc, "filename", None) is not None
        return _NAMED_FILE.match(self.message) is not None

    def is_a(self, types: type[BaseException] | tuple[type[BaseException], ...]) -> bool:
        """Whether its type is known and a subclass of ``types``."""
        return self.kind is not None and issubclass(self.kind, types)


def full_traceback_requested() -> bool:
    """Whether ``MEDGAIN_TRACEBACK`` asks for full tracebacks (set, and not ``0``, ``false``, ``no`` or empty)."""
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _text(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def _resolve(name: str) -> type[BaseException] | None:
    """The exception class a formatted traceback names (``ValueError``, ``medgain.errors.MedgainError``), when
    its module is loaded in this process."""
    module, _, qualname = name.rpartition(".")
    found: Any = builtins if not module else sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


def _read_section(section: str, where: str) -> _Raised:
    """One exception of a formatted traceback: its frames, then its ``Type: message`` lines."""
    lines = section.splitlines()
    frames = []
    last = -1
    for index, line in enumerate(lines):
        match = _FRAME_LINE.match(line)
        if match:
            frames.append((match.group(1), int(match.group(2)), match.group(3)))
            last = index
    rest = lines[last + 1:] if frames else [line for line in lines if not line.startswith("Traceback (")]
    while rest and rest[0].startswith(" "):  # the source and caret lines of the innermost frame
        rest = rest[1:]
    match = _EXCEPTION_LINE.match("\n".join(rest))
    if match is None:
        return _Raised(None, "\n".join(rest), tuple(frames), where=where)
    return _Raised(_resolve(match.group(1)), match.group(2) or "", tuple(frames), where=where)


def _worker_chain(exc: BaseException) -> list[_Raised] | None:
    """The chain an exception re-raised from a DataLoader worker describes, outermost first; None for others."""
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    match = _WORKER_ERROR.match(text)
    if match is None:
        return None
    sections = _CHAIN_SEPARATOR.split(match.group(2).rstrip("\n"))
    return [_read_section(section, match.group(1)) for section in reversed(sections)]


def _chain(exc: BaseException) -> list[_Raised]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first; an exception re-raised
    from a worker is replaced by the chain its text describes."""
    out: list[_Raised] = []
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not earlier for earlier in seen):
        seen.append(current)
        worker = _worker_chain(current)
        if worker is not None:
            out += worker
        else:
            frames = tuple((f.filename, f.lineno or 0, f.name) for f in traceback.extract_tb(current.__traceback__))
            out.append(_Raised(type(current), _text(current), frames, current))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return out


def _in_medgain(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(_PACKAGE_DIR)


def _is_own(raised: _Raised) -> bool:
    """Whether it is a :class:`MedgainError`, a ``ValueError`` / ``OSError`` / ``RuntimeError`` whose innermost
    frame is in medgain, or a file-system ``OSError`` naming its file met while medgain code ran."""
    if raised.is_a(MedgainError):
        return True
    if not raised.frames:
        return False
    if raised.is_a(_OWN_TYPES) and _in_medgain(raised.frames[-1][0]):
        return True
    return raised.is_a(OSError) and raised.names_file and any(_in_medgain(f[0]) for f in raised.frames)


def _own(exc: BaseException) -> tuple[_Raised, _Raised] | None:
    """``(outermost, own)`` of ``exc``'s chain (see :func:`own_error`), or None."""
    chain = _chain(exc)
    for depth in range(len(chain) - 1, -1, -1):
        if _is_own(chain[depth]):
            cause = chain[depth + 1] if depth + 1 < len(chain) else None
            if cause is None or cause.is_a((OSError, ValueError)):
                return chain[0], chain[depth]
            return None
    return None


def own_error(exc: BaseException) -> BaseException | None:
    """The medgain input error behind ``exc``, or None when ``exc`` is a bug.

    Args:
        exc: the exception that ended the program (possibly a wrapper such as MONAI's config-evaluation error, or
            torch's re-raise of an error raised in a DataLoader worker).

    Returns:
        the innermost exception of ``exc``'s chain that is medgain's own, provided the exception it was raised
        from, if any, is an ``OSError`` / ``ValueError`` (a file that cannot be read, a number that cannot be
        parsed; what that one was raised from is the reading library's business); None otherwise. An error raised
        in a worker is rebuilt from the worker's traceback text: an exception of its type and message.
    """
    found = _own(exc)
    if found is None:
        return None
    own = found[1]
    if own.exc is not None:
        return own.exc
    try:
        return own.kind(own.message)  # type: ignore[misc]
    except Exception:  # noqa: BLE001 - a type that takes other arguments
        return MedgainError(own.message)


def _message(raised: _Raised) -> str:
    lines = raised.message.strip().splitlines() or [""]
    if len(lines) > _MAX_MESSAGE_LINES:
        lines = [*lines[: _MAX_MESSAGE_LINES - 1], f"… ({len(lines) - _MAX_MESSAGE_LINES + 1} more lines)"]
    return "\n".join(lines)


def _where(raised: _Raised) -> str:
    """``file:line in function`` of the innermost frame in medgain's code (else the innermost frame), the file
    relative to the working folder, and the worker process it ran in."""
    if not raised.frames:
        return "medgain"
    own = [f for f in raised.frames if _in_medgain(f[0])]
    filename, lineno, function = (own or raised.frames)[-1]
    path = Path(filename)
    try:
        shown = str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        shown = str(path)
    return f"{shown}:{lineno} in {function}" + (f", in {raised.where}" if raised.where else "")


def short_report(exc: BaseException, prefix: str = "") -> str | None:
    """The short report of a medgain input error, or None when ``exc`` is a bug (or full tracebacks are asked for).

    Args:
        exc: the exception that ended the program.
        prefix: put before the last line (``"medgain: error: "`` for the command line); default: the error's type.

    Returns:
        at most 12 lines: where the error was raised (and in which worker process), the outermost wrapper's
        message when it wraps the error (e.g. the failing config expression, cut to one line), how to see the full
        traceback, and last the error's message.
    """
    if full_traceback_requested():
        return None
    found = _own(exc)
    if found is None:
        return None
    outer, own = found
    lines = [f"error raised at {_where(own)} (set {TRACEBACK_ENV}=1 for the full traceback)"]
    if outer is not own:
        context = " ".join(outer.message.split())
        if len(context) > _MAX_CONTEXT_CHARS:
            context = context[: _MAX_CONTEXT_CHARS - 1] + "…"
        lines.insert(0, f"while: {context}")
    name = own.kind.__name__ if own.kind is not None else "Error"
    lines.append(f"{prefix or name + ': '}{_message(own)}")
    return "\n".join(lines)


Hook = Callable[[type[BaseException], BaseException, TracebackType | None], Any]


def excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None, *, fallback: Hook = sys.__excepthook__
) -> None:
    """``sys.excepthook`` that prints :func:`short_report` for medgain's own errors and defers to ``fallback``
    (Python's default traceback) for everything else. Progress bars left open by the error (ignite's
    ``ProgressBar``) are closed first: they would otherwise print their last state after the report, at exit."""
    report = short_report(exc) if isinstance(exc, Exception) else None
    if report is None:
        fallback(exc_type, exc, tb)
        return
    _close_progress_bars()
    sys.stderr.flush()
    print(report, file=sys.stderr)


def _close_progress_bars() -> None:
    """Close the tqdm bars still open, when tqdm is loaded."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def install_excepthook() -> None:
    """Make :func:`excepthook` the interpreter's ``sys.excepthook``, in front of the hook already there (once)."""
    if getattr(sys.excepthook, "__medgain__", False):
        return
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        excepthook(exc_type, exc, tb, fallback=previous)

    hook.__medgain__ = True  # type: ignore[attr-defined]
    sys.excepthook = hook
