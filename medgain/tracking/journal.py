"""The on-disk tracking journal of one MLflow run: every record a run logs, in order, before it is sent.

A journal is a folder (normally ``<ckpt_dir>/tracking/<journal id>/``) holding

- ``meta.json``: tracking URI, experiment, run name, artifact location, creation time;
- ``journal.jsonl``: append-only records ``{"seq": n, "op": ..., ...}`` (``start``, ``log``, ``artifact``,
  ``end``, ``register``, ``model_version_tag``), one JSON line each, flushed as they are written; a torn last
  line (a kill mid-write) is ignored and cut off when the journal is reopened;
- ``state.json``: the MLflow run id once created and ``delivered``, the last record the server has (written
  atomically after each delivery, so a record is sent again only when a kill falls between its delivery and
  this write; every record is idempotent on the server: metrics by (key, step, timestamp, value), params and
  tags by key, artifacts by path, the run by the ``medgain.journal`` tag, the model version by run);
- ``files/<id>/``: copies of logged artifacts (the original may change before it is sent), deleted once sent;
- ``owner.lock``: an ``flock`` held while a process writes the journal (a journal whose lock is free belongs
  to no living process).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from medgain.model_file import atomic_write

__all__ = ["JournalLockedError", "RunJournal", "find_journals"]

logger = logging.getLogger(__name__)

META = "meta.json"
RECORDS = "journal.jsonl"
STATE = "state.json"
LOCK = "owner.lock"


class JournalLockedError(RuntimeError):
    """The journal is held by another living process."""


def find_journals(root: str | os.PathLike) -> list[Path]:
    """Journal folders under ``root`` (``root`` itself when it is one), sorted by creation time."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder")
    found = [root] if (root / META).is_file() else [p.parent for p in root.rglob(META)]
    return sorted(found, key=lambda p: (p / META).stat().st_mtime)


class RunJournal:
    """One run's journal (see the module docstring). Appending is thread-safe; the owner holds the lock.

    Args:
        path: the journal folder.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = self.path / META
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{meta_path}: not a readable tracking journal ({err})") from err
        self.records: list[dict[str, Any]] = []
        self.state: dict[str, Any] = {"delivered": -1, "run_id": None, "rejected": []}
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)
        self._file: IO[str] | None = None
        self._lock_file: IO[str] | None = None
        self._load()

    @classmethod
    def create(
        cls,
        buffer_dir: str | os.PathLike,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        artifact_location: str | None = None,
        run_id: str | None = None,
    ) -> RunJournal:
        """A new, empty journal in a fresh folder of ``buffer_dir``; ``run_id`` continues an existing MLflow run."""
        journal_id = uuid.uuid4().hex
        path = Path(buffer_dir) / journal_id
        path.mkdir(parents=True)
        meta = {
            "journal_id": journal_id,
            "tracking_uri": tracking_uri,
            "experiment_name": experiment_name,
            "run_name": run_name,
            "artifact_location": artifact_location,
            "run_id": run_id,
            "created": time.time(),
        }
        atomic_write(path / META, lambda f: f.write(json.dumps(meta, indent=1).encode()))
        return cls(path)

    def update_meta(self, **fields: Any) -> None:
        """Change fields of ``meta.json`` (e.g. the tracking URI of a run folder that moved)."""
        self.meta.update(fields)
        snapshot = json.dumps(self.meta, indent=1)
        atomic_write(self.path / META, lambda f: f.write(snapshot.encode()))

    @property
    def journal_id(self) -> str:
        """The journal's id (its folder name, and the run's ``medgain.journal`` tag)."""
        return str(self.meta["journal_id"])

    def _load(self) -> None:
        state_path = self.path / STATE
        if state_path.is_file():
            try:
                self.state.update(json.loads(state_path.read_text()))
            except ValueError as err:
                raise ValueError(f"{state_path}: unreadable delivery state ({err})") from err
        records_path = self.path / RECORDS
        if records_path.is_file():
            for number, line in enumerate(records_path.read_text().splitlines(keepends=True), 1):
                if not line.endswith("\n"):
                    logger.warning("%s: line %d was cut off by a kill mid-write; it is ignored", records_path, number)
                    break
                try:
                    self.records.append(json.loads(line))
                except ValueError as err:
                    raise ValueError(f"{records_path}: line {number} is not a JSON record ({err})") from err

    # ---- ownership -----------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the owner lock (and cut a torn last line) before appending.

        Raises:
            JournalLockedError: when another living process holds the journal.
        """
        handle = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            handle.close()
            raise JournalLockedError(f"{self.path}: the journal is in use by another process") from err
        self._lock_file = handle
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        records_path = self.path / RECORDS
        complete = "".join(json.dumps(r, allow_nan=True) + "\n" for r in self.records)
        if records_path.is_file() and records_path.stat().st_size != len(complete.encode()):
            atomic_write(records_path, lambda f: f.write(complete.encode()))
        self._file = open(records_path, "a", encoding="utf-8")

    def release(self) -> None:
        """Close the journal file and free the owner lock."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def is_owned_elsewhere(self) -> bool:
        """Whether a living process (not this object) holds the owner lock."""
        if self._lock_file is not None:
            return False
        with open(self.path / LOCK, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    # ---- records -----------------------------------------------------------------------------------------
    def append(self, op: str, **fields: Any) -> dict[str, Any]:
        """Append one record (flushed to the OS before returning) and wake the sender."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: the journal is not open for writing (call acquire first)")
        with self.changed:
            record = {"seq": len(self.records), "op": op, "time": time.time(), **fields}
            self._file.write(json.dumps(record, allow_nan=True) + "\n")
            self._file.flush()
            self.records.append(record)
            self.changed.notify_all()
        return record

    def stage_files(self, local_path: str | os.PathLike) -> str:
        """Copy a file or folder into a new ``files/<id>/`` (the original may change later); its relative path."""
        source = Path(local_path)
        if not source.exists():
            raise FileNotFoundError(f"{source}: artifact to log not found")
        with self._lock:
            slot = self.path / "files" / uuid.uuid4().hex[:12]
        slot.mkdir(parents=True)
        target = slot / source.name
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        return str(target.relative_to(self.path))

    def pending(self) -> list[dict[str, Any]]:
        """Records not yet delivered, in order."""
        with self._lock:
            return self.records[int(self.state["delivered"]) + 1 :]

    def iter_records(self, op: str) -> Iterator[dict[str, Any]]:
        """Every record of one kind, in order."""
        with self._lock:
            records = list(self.records)
        return (r for r in records if r["op"] == op)

    def is_ended(self) -> bool:
        """Whether the run's last ``start`` was followed by an ``end`` (the run was closed, as FINISHED or not)."""
        with self._lock:
            ops = [r["op"] for r in self.records if r["op"] in ("start", "end")]
        return bool(ops) and ops[-1] == "end"

    def mark_delivered(self, last_seq: int, **state: Any) -> None:
        """Record that the server holds every record up to ``last_seq`` (and e.g. the run id)."""
        with self.changed:
            self.state.update(state)
            self.state["delivered"] = int(last_seq)
            snapshot = json.dumps(self.state, indent=1)
            self.changed.notify_all()
        atomic_write(self.path / STATE, lambda f: f.write(snapshot.encode()))

    def summary(self) -> Mapping[str, Any]:
        """What a person needs to know about the journal: run, records, delivered, rejected."""
        return {
            "journal": str(self.path),
            "run_name": self.meta.get("run_name"),
            "run_id": self.state.get("run_id"),
            "records": len(self.records),
            "pending": len(self.pending()),
            "ended": self.is_ended(),
            "rejected": len(self.state.get("rejected", [])),
        }
