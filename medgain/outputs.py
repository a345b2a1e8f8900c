"""Run outputs that are complete or absent: files written through a temporary file and a rename, errors that
name the file, and output folders that never mix the results of two runs."""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from medgain.model_file import atomic_write

__all__ = ["claim_output_dir", "write_atomic", "write_csv_atomic"]

logger = logging.getLogger(__name__)


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through a temporary file in its folder and a rename
    (:func:`medgain.model_file.atomic_write`): readers never see a half file.

    Args:
        path: the file to write; its folder is created when missing.
        write: writes the whole content into the binary file object it is given.

    Returns:
        ``path``.

    Raises:
        OSError: naming ``path`` when it cannot be written (e.g. a full disk); an earlier file there is intact.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
    except OSError as err:
        message = f"{path}: cannot be written ({err.strerror or err}); an earlier file there is unchanged"
        raise (OSError(err.errno, message) if err.errno else OSError(message)) from err
    return path


def write_csv_atomic(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV file (UTF-8, ``csv`` module defaults) whole or not at all, as :func:`write_atomic`.

    Raises:
        OSError: naming ``path`` when it cannot be written; an earlier file there is intact.
    """
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    content = text.getvalue().encode()
    return write_atomic(path, lambda f: f.write(content))


def claim_output_dir(output_dir: str | os.PathLike, outputs: Sequence[str], overwrite: bool = False) -> Path:
    """Make ``output_dir`` ready for a run that writes ``outputs``, refusing to mix two runs' results.

    A folder that already holds one of ``outputs`` (a file, or a non-empty folder) holds an earlier run's
    results: without ``overwrite`` it is refused; with ``overwrite`` those earlier outputs are deleted first, so
    the folder then holds only the new run's outputs. Other files in the folder are left alone.

    Args:
        output_dir: the run's output folder; created when missing.
        outputs: names of the files and folders the run writes directly under ``output_dir``.
        overwrite: delete the earlier outputs instead of refusing.

    Returns:
        ``output_dir`` as a path.

    Raises:
        FileExistsError: naming the folder and the earlier outputs found, when ``overwrite`` is false.
    """
    root = Path(output_dir)
    found = [
        name
        for name in outputs
        if (root / name).is_file() or ((root / name).is_dir() and any((root / name).iterdir()))
    ]
    if found and not overwrite:
        raise FileExistsError(
            f"{root}: holds the outputs of an earlier run ({', '.join(found)}); give another output folder, or "
            "--overwrite true to delete them and run again"
        )
    for name in found:
        target = root / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    if found:
        logger.warning("%s: deleted the earlier run's %s (--overwrite)", root, ", ".join(found))
    root.mkdir(parents=True, exist_ok=True)
    return root
