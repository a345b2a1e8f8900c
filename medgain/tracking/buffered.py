"""Buffered MLflow tracking: the calls handlers make go to the run's journal; a background sender delivers them.

:class:`BufferedClient` has the writing subset of ``mlflow.MlflowClient``'s API that medgain's and MONAI's
handlers use (``log_batch``, ``log_metric``, ``log_param``, ``set_tag``, ``log_artifact(s)``,
``set_terminated``, ``set_model_version_tag``) plus :meth:`BufferedClient.register_model`; every call returns
at once. :func:`open_run` starts (or continues, or joins within this process) the run of a buffer folder;
:func:`sync` delivers what stayed in journals, and marks the runs of dead processes KILLED when asked.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from medgain.tracking.delivery import Sender, TrackingUnavailable, deliver
from medgain.tracking.journal import JournalLockedError, RunJournal, find_journals

__all__ = ["BufferedClient", "TrackedRun", "open_run", "sync"]

logger = logging.getLogger(__name__)

_ACTIVE: dict[Path, TrackedRun] = {}
_ACTIVE_LOCK = threading.Lock()
KILLED_REASON = "the process ended without closing the run (killed); marked KILLED"


def _kv(item: Any) -> tuple[str, Any]:
    return (item.key, item.value) if hasattr(item, "key") else (item[0], item[1])


class TrackedRun:
    """A run journal written by this process, with its background sender.

    Args:
        journal: the journal (its owner lock is taken here).
        offline_timeout: at :meth:`finish`, how long to keep trying an unreachable server before leaving the
            rest to ``medgain sync``.
    """

    def __init__(self, journal: RunJournal, offline_timeout: float) -> None:
        journal.acquire()
        self.journal = journal
        self.offline_timeout = offline_timeout
        logged = list(journal.iter_records("log"))
        self.params: dict[str, str] = {str(k): str(v) for r in logged for k, v in r.get("params", ())}
        # (key, step) of metrics a previous process of this run logged: a resumed run repeats the steps after
        # its checkpoint, and the run keeps one value per step
        self.earlier_steps = {(str(m[0]), int(m[3])) for r in logged for m in r.get("metrics", ())}
        self.sender = Sender(journal)
        self.sender.start()
        self.others: list[TrackedRun] = []
        self.buffer_dir = journal.path.parent.resolve()
        self.finished = False

    @property
    def info(self) -> SimpleNamespace:
        """What MONAI's handler keeps as ``cur_run.info``: ``run_id`` (the journal id, the local name of the
        run until the server has it), ``run_name``."""
        return SimpleNamespace(run_id=self.journal.journal_id, run_name=self.journal.meta["run_name"])

    def log(self, metrics: Iterable[Any] = (), params: Iterable[Any] = (), tags: Iterable[Any] = ()) -> None:
        """Append metrics ``(key, value, timestamp ms, step)``, params and tags. A metric step that an earlier
        process of this run logged is dropped (a resumed run repeats the steps after its checkpoint); a param
        already logged with the same value is dropped, one whose value changed (e.g. a resumed run given more
        epochs) becomes the tag ``changed_param.<key>`` (MLflow params cannot change)."""
        metric_rows = [
            row
            for row in (
                [m.key, float(m.value), int(m.timestamp), int(m.step or 0)] if hasattr(m, "key") else list(m)
                for m in metrics
            )
            if (row[0], row[3]) not in self.earlier_steps
        ]
        tag_rows = [list(_kv(t)) for t in tags]
        param_rows = []
        for key, value in map(_kv, params):
            value = str(value)
            if self.params.get(key) == value:
                continue
            if key in self.params:
                logger.warning("param %s changed from %r to %r: logged as tag changed_param.%s", key,
                               self.params[key], value, key)
                tag_rows.append([f"changed_param.{key}", value])
                continue
            self.params[key] = value
            param_rows.append([key, value])
        if metric_rows or param_rows or tag_rows:
            self.journal.append("log", metrics=metric_rows, params=param_rows, tags=tag_rows)

    def finish(self) -> bool:
        """Deliver what is left (see :meth:`Sender.finish`), stop the senders, free the journals. Returns whether
        everything was delivered."""
        if self.finished:
            return not self.journal.pending()
        self.finished = True
        with _ACTIVE_LOCK:
            if _ACTIVE.get(self.buffer_dir) is self:
                del _ACTIVE[self.buffer_dir]
        done = self.sender.finish(self.offline_timeout)
        self.journal.release()
        if not done:
            logger.warning(
                "MLflow tracking: %d records of run %s are not delivered yet; they are kept in %s. Send them "
                "with `medgain sync %s` when the server is back (a later run in this folder also sends them).",
                len(self.journal.pending()), self.journal.meta["run_name"], self.journal.path, self.buffer_dir,
            )
        for other in self.others:
            other.finish()
        return done


class BufferedClient:
    """The writing calls of ``mlflow.MlflowClient``, appended to the run journal of :attr:`run` (returning at
    once); ``run_id`` arguments are the journal id that :attr:`TrackedRun.info` gives as the run id.

    Args:
        tracking_uri: the MLflow tracking URI the journal is sent to.
    """

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.run: TrackedRun | None = None

    def _run(self, run_id: str) -> TrackedRun:
        if self.run is None or self.run.finished or run_id != self.run.journal.journal_id:
            raise RuntimeError(f"BufferedClient: run {run_id} is not open in this process")
        return self.run

    def log_batch(self, run_id: str, metrics: Iterable[Any] = (), params: Iterable[Any] = (),
                  tags: Iterable[Any] = (), **_: Any) -> None:
        """Metrics (``mlflow.entities.Metric``), params and tags of the run."""
        self._run(run_id).log(metrics, params, tags)

    def log_metric(self, run_id: str, key: str, value: float, timestamp: int | None = None, step: int | None = None,
                   **_: Any) -> None:
        """One metric value (timestamp now when not given)."""
        stamp = int(time.time() * 1000) if timestamp is None else int(timestamp)
        self._run(run_id).log(metrics=[[key, float(value), stamp, int(step or 0)]])

    def log_param(self, run_id: str, key: str, value: Any, **_: Any) -> None:
        """One param."""
        self._run(run_id).log(params=[(key, value)])

    def set_tag(self, run_id: str, key: str, value: Any, **_: Any) -> None:
        """One tag."""
        self._run(run_id).log(tags=[(key, str(value))])

    def log_artifact(self, run_id: str, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file, copied into the journal now and uploaded under ``artifact_path`` later."""
        run = self._run(run_id)
        run.journal.append("artifact", path=run.journal.stage_files(local_path), artifact_path=artifact_path)

    def log_artifacts(self, run_id: str, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A folder's content, copied into the journal now and uploaded under ``artifact_path`` later."""
        run = self._run(run_id)
        run.journal.append("artifact", path=run.journal.stage_files(local_dir), artifact_path=artifact_path)

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        """End the run (FINISHED, FAILED, KILLED) and deliver what is left, waiting at most the run's
        ``offline_timeout`` while the server is unreachable."""
        run = self._run(run_id)
        stamp = {} if end_time is None else {"end_time": int(end_time)}
        run.journal.append("end", status=status or "FINISHED", **stamp)
        run.finish()

    def register_model(self, run_id: str, name: str, alias: str, tags: Mapping[str, str], description: str,
                       checkpoint: str | os.PathLike | None) -> None:
        """Register the run's ``model/`` artifact when it is delivered (see
        :func:`medgain.tracking.delivery.register_model_version`)."""
        self._run(run_id).journal.append(
            "register", name=name, alias=alias, tags=dict(tags), description=description,
            checkpoint=None if checkpoint is None else str(Path(checkpoint).resolve()),
        )

    def set_model_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        """A tag on a registered model version; the open run's id in ``value`` becomes its MLflow run id."""
        if self.run is None or self.run.finished:
            raise RuntimeError("BufferedClient: no open run to record the model version tag with")
        value = str(value).replace(self.run.journal.journal_id, "{run_id}")
        self.run.journal.append("model_version_tag", name=name, version=str(version), key=key, value=value)


def _retire(journal: RunJournal, offline_timeout: float) -> TrackedRun | None:
    """Take over a journal of a dead process: mark its run KILLED when it was never closed, send what is left."""
    try:
        run = TrackedRun(journal, offline_timeout)
    except JournalLockedError:
        return None
    if journal.records and not journal.is_ended():
        logger.warning("run %s (%s): %s", journal.meta["run_name"], journal.path, KILLED_REASON)
        run.log(tags=[("end_reason", KILLED_REASON)])
        journal.append("end", status="KILLED")
    return run


def open_run(
    buffer_dir: str | os.PathLike,
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    artifact_location: str | None = None,
    resume: Mapping[str, Any] | None = None,
    offline_timeout: float = 10.0,
) -> TrackedRun:
    """The run this process tracks in ``buffer_dir``: the one already open here (a validation handler joins the
    training handler's run), the run ``resume`` names (``{"journal_id", "run_id"}`` from a checkpoint:
    continued, set back to RUNNING), or a new one. Journals of dead processes in ``buffer_dir`` are taken over:
    runs never closed are marked KILLED, and what they did not deliver is sent in the background."""
    buffer_dir = Path(buffer_dir).resolve()
    with _ACTIVE_LOCK:
        if buffer_dir in _ACTIVE:
            return _ACTIVE[buffer_dir]
    buffer_dir.mkdir(parents=True, exist_ok=True)
    journal = None
    resume_id = str((resume or {}).get("journal_id") or "")
    if resume_id and (buffer_dir / resume_id / "meta.json").is_file():
        journal = RunJournal(buffer_dir / resume_id)
        logger.info("continuing MLflow run %s (journal %s)", journal.meta["run_name"], journal.path)
        if journal.meta["tracking_uri"] != tracking_uri:  # e.g. a run folder that was copied or moved
            logger.warning("run %s now tracks to %s (was %s)", journal.meta["run_name"], tracking_uri,
                           journal.meta["tracking_uri"])
            journal.update_meta(tracking_uri=tracking_uri, artifact_location=artifact_location)
    others = []
    for path in find_journals(buffer_dir):
        old = RunJournal(path) if path.name != resume_id else None
        if old is not None and (old.pending() or (old.records and not old.is_ended())):
            other = _retire(old, offline_timeout)
            if other is not None:
                others.append(other)
    if journal is None:
        journal = RunJournal.create(
            buffer_dir, tracking_uri, experiment_name, run_name, artifact_location,
            run_id=str((resume or {}).get("run_id") or "") or None,
        )
    run = TrackedRun(journal, offline_timeout)
    run.others = others
    journal.append("start")
    with _ACTIVE_LOCK:
        _ACTIVE[buffer_dir] = run
    return run


def sync(root: str | os.PathLike, mark_killed: bool = False) -> list[dict[str, Any]]:
    """Deliver every journal under ``root`` that no living process holds; with ``mark_killed``, first mark the
    runs never closed as KILLED. Returns one summary per journal (``status``: delivered, pending: <error>,
    in use)."""
    results = []
    for path in find_journals(root):
        journal = RunJournal(path)
        try:
            journal.acquire()
        except JournalLockedError:
            results.append({**journal.summary(), "status": "in use by a running process"})
            continue
        try:
            if mark_killed and journal.records and not journal.is_ended():
                journal.append("log", metrics=[], params=[], tags=[["end_reason", KILLED_REASON]])
                journal.append("end", status="KILLED")
            try:
                deliver(journal)
                status = "delivered"
            except TrackingUnavailable as err:
                status = f"pending: {err}"
        finally:
            journal.release()
        results.append({**journal.summary(), "status": status})
    return results
