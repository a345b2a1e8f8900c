"""Sending a run journal to the MLflow tracking server: in order, exactly once, never blocking training.

:func:`deliver` sends a journal's pending records (merging consecutive ``log`` records into MLflow batches);
:class:`Sender` does it in a background thread, retrying with back-off while the server is unreachable and
warning once. A record the server refuses for good (a 4xx answer, e.g. a param whose value changed) is kept in
``state.json`` under ``rejected`` and skipped, so one bad record never holds back the rest.

Every text a record carries (run name, params, tags, descriptions, model-version tags, artifact folder and file
names) reaches the server through :func:`medgain.data.phi.pseudonymise_text`: paths, data file names and
person names leave as salted pseudonyms, while the local journal and log keep the real names.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medgain.model_file import atomic_write, load_checkpoint
from medgain.tracking.journal import RunJournal
from medgain.data.phi import pseudonymise_text
from medgain.tracking.naming import tracking_artifact_path
from medgain.tracking.store import prepare_store

__all__ = ["Sender", "TrackingUnavailable", "deliver", "quick_timeouts", "register_model_version"]

logger = logging.getLogger(__name__)

JOURNAL_TAG = "medgain.journal"
# MLflow's log_batch limits
MAX_METRICS, MAX_PARAMS, MAX_TAGS, MAX_ENTITIES = 1000, 100, 100, 1000


class TrackingUnavailable(RuntimeError):
    """The tracking server could not be reached (or failed on its side); the record is sent again later."""


def quick_timeouts() -> None:
    """Short HTTP timeouts and no MLflow-level retries for this process (unless the user set them): the
    :class:`Sender` retries by itself, and a dead server must not hold a call for minutes of back-off."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _is_permanent(err: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return False
    status = err.get_http_status_code()
    message = str(err)
    transport = "API request to" in message or "Max retries exceeded" in message or "Connection" in message
    return 400 <= status < 500 and not transport


def _client(journal: RunJournal) -> Any:
    import mlflow

    prepare_store(journal.meta["tracking_uri"])
    return mlflow.MlflowClient(tracking_uri=journal.meta["tracking_uri"])


def _ensure_run(client: Any, journal: RunJournal, record: dict[str, Any]) -> str:
    """Create the journal's run (or find it: by the stored id, or by its journal tag) and set it RUNNING."""
    from mlflow.exceptions import MlflowException

    meta = journal.meta
    run_id = journal.state.get("run_id") or meta.get("run_id")
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException as err:
            if not _is_permanent(err):
                raise
            logger.warning("%s: MLflow run %s not found on the server; a new run is created", journal.path, run_id)
            run_id = None
        else:
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            return str(run_id)
    experiment = client.get_experiment_by_name(meta["experiment_name"])
    if experiment is None:
        try:
            experiment_id = client.create_experiment(meta["experiment_name"], meta.get("artifact_location"))
        except MlflowException:
            experiment = client.get_experiment_by_name(meta["experiment_name"])
            if experiment is None:
                raise
            experiment_id = experiment.experiment_id
    else:
        experiment_id = experiment.experiment_id
    found = client.search_runs([experiment_id], f"tags.`{JOURNAL_TAG}` = '{journal.journal_id}'")
    if found:
        return str(found[0].info.run_id)
    run = client.create_run(
        experiment_id,
        start_time=int(record["time"] * 1000),
        tags={JOURNAL_TAG: journal.journal_id},
        run_name=pseudonymise_text(meta["run_name"]),
    )
    return str(run.info.run_id)


def register_model_version(
    client: Any,
    run_id: str,
    name: str,
    alias: str,
    tags: dict[str, str],
    description: str,
    checkpoint: str | os.PathLike | None = None,
) -> str:
    """Register the run's ``model/`` artifact as a version of ``name`` (once per run: an existing version of the
    run is reused, with this description and these tags), point ``alias`` at it, tag the run, and write the
    provenance into ``checkpoint``. The description and tag values go through
    :func:`medgain.data.phi.pseudonymise_text`.

    Returns:
        The version number.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    import torch

    description = pseudonymise_text(description)
    tags = {k: pseudonymise_text(str(v)) for k, v in tags.items()}
    try:
        client.create_registered_model(name, description="medgain classifier; one version per training run.")
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:  # sent twice, or a resumed run completing again: its one version now describes the final model
        version = str(existing[0].version)
        client.update_model_version(name, version, description)
        for key, value in {**tags, "training_run_id": run_id}.items():
            client.set_model_version_tag(name, version, key, value)
    else:
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
        version = str(
            client.create_model_version(
                name, source, run_id=run_id, tags={**tags, "training_run_id": run_id}, description=description
            ).version
        )
    client.set_registered_model_alias(name, alias, version)
    client.set_tag(run_id, "registered_model", f"{name} v{version}")
    if checkpoint is not None and Path(checkpoint).is_file():
        saved = load_checkpoint(checkpoint)
        saved["provenance"] = {"run_id": run_id, "model_name": name, "model_version": version}
        atomic_write(checkpoint, lambda f: torch.save(saved, f))
    origin = f"epoch {tags['epoch']} of run {run_id}" if "epoch" in tags else f"run {run_id}"
    logger.info("registered %s version %s (alias %r) from %s", name, version, alias, origin)
    return version


def _batches(records: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive ``log`` records merged up to MLflow's batch limits; other records alone."""
    groups: list[list[dict[str, Any]]] = []
    counts = [0, 0, 0]
    for record in records:
        sizes = [len(record.get(k, ())) for k in ("metrics", "params", "tags")] if record["op"] == "log" else None
        last = groups[-1] if groups else None
        if (
            sizes is not None
            and last is not None
            and last[-1]["op"] == "log"
            and counts[0] + sizes[0] <= MAX_METRICS
            and counts[1] + sizes[1] <= MAX_PARAMS
            and counts[2] + sizes[2] <= MAX_TAGS
            and sum(counts) + sum(sizes) <= MAX_ENTITIES
        ):
            last.append(record)
            counts = [a + b for a, b in zip(counts, sizes)]
        else:
            groups.append([record])
            counts = sizes or [0, 0, 0]
    return groups


def _send_artifact(client: Any, run_id: str, local: Path, artifact_path: str | None) -> None:
    """Upload a staged file or folder with its folder and file names through :func:`tracking_artifact_path`
    (a renamed copy is uploaded when a name changes)."""
    target = None if artifact_path is None else tracking_artifact_path(artifact_path)
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    names = {f: tracking_artifact_path(f.relative_to(local).as_posix() if local.is_dir() else f.name) for f in files}
    if all((f.relative_to(local).as_posix() if local.is_dir() else f.name) == n for f, n in names.items()):
        if local.is_dir():
            client.log_artifacts(run_id, str(local), target)
        else:
            client.log_artifact(run_id, str(local), target)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for file, name in names.items():
            copy = Path(tmp, name)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, copy)
        if local.is_dir():
            client.log_artifacts(run_id, tmp, target)
        else:
            client.log_artifact(run_id, str(Path(tmp, names[local])), target)


def _send(client: Any, journal: RunJournal, group: list[dict[str, Any]], run_id: str | None) -> str | None:
    """Send one group of records; returns the run id (set by ``start``)."""
    from mlflow.entities import Metric, Param, RunTag

    op = group[0]["op"]
    if op == "start":
        return _ensure_run(client, journal, group[0])
    if run_id is None:
        raise RuntimeError(f"{journal.path}: record {group[0]['seq']} ({op}) precedes the run's start record")
    if op == "log":
        metrics = [Metric(k, float(v), int(t), int(s)) for r in group for k, v, t, s in r.get("metrics", ())]
        params = {k: pseudonymise_text(str(v)) for r in group for k, v in r.get("params", ())}
        tags = {k: pseudonymise_text(str(v)) for r in group for k, v in r.get("tags", ())}
        client.log_batch(
            run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
    elif op == "artifact":
        _send_artifact(client, run_id, journal.path / group[0]["path"], group[0].get("artifact_path"))
    elif op == "end":
        client.set_terminated(run_id, group[0]["status"], group[0].get("end_time", int(group[0]["time"] * 1000)))
    elif op == "register":
        r = group[0]
        register_model_version(client, run_id, r["name"], r["alias"], r["tags"], r["description"], r["checkpoint"])
    elif op == "model_version_tag":
        r = group[0]
        value = pseudonymise_text(r["value"]).replace("{run_id}", run_id)
        client.set_model_version_tag(r["name"], r["version"], r["key"], value)
    else:
        raise ValueError(f"{journal.path}: record {group[0]['seq']} has an unknown op {op!r}")
    return run_id


def deliver(journal: RunJournal, client: Any = None, stop: threading.Event | None = None) -> int:
    """Send the journal's pending records in order; returns how many were sent.

    Raises:
        TrackingUnavailable: when the server cannot be reached (what was sent stays sent).
    """
    client = client if client is not None else _client(journal)
    sent = 0
    run_id = journal.state.get("run_id")
    groups = _batches(journal.pending())
    while groups:
        group = groups.pop(0)
        if stop is not None and stop.is_set():
            break
        try:
            run_id = _send(client, journal, group, run_id)
        except Exception as err:  # MLflow raises MlflowException, requests errors, sqlalchemy errors...
            if not _is_permanent(err):
                raise TrackingUnavailable(f"{journal.meta['tracking_uri']}: {type(err).__name__}: {err}") from err
            if len(group) > 1:  # a merged batch: find the refused record(s), send the others
                groups[:0] = [[record] for record in group]
                continue
            rejected = [*journal.state.get("rejected", []), {"seq": group[0]["seq"], "op": group[0]["op"],
                                                             "error": str(err)[:2000]}]
            logger.error(
                "tracking server refused record %d (%s) of %s for good: %s", group[0]["seq"], group[0]["op"],
                journal.path, err,
            )
            journal.mark_delivered(group[-1]["seq"], run_id=run_id, rejected=rejected)
        else:
            journal.mark_delivered(group[-1]["seq"], run_id=run_id)
            if group[0]["op"] == "artifact":  # the server has it: the staged copy is no longer needed
                shutil.rmtree((journal.path / group[0]["path"]).parent, ignore_errors=True)
        sent += len(group)
    return sent


class Sender(threading.Thread):
    """Background delivery of a journal: sends what is appended, retries while the server is away.

    Args:
        journal: the journal to send.
        retry_interval: first wait after a failed attempt, doubled up to ``max_retry_interval``.
        max_retry_interval: longest wait between attempts.
    """

    _warned: set[str] = set()

    def __init__(self, journal: RunJournal, retry_interval: float = 0.5, max_retry_interval: float = 5.0) -> None:
        super().__init__(name=f"medgain-tracking-{journal.journal_id[:8]}", daemon=True)
        self.journal = journal
        self.retry_interval = retry_interval
        self.max_retry_interval = max_retry_interval
        self.stopping = threading.Event()
        self.offline_since: float | None = None
        self._wake = threading.Event()
        quick_timeouts()

    def run(self) -> None:
        client = _client(self.journal)
        wait = self.retry_interval
        while not self.stopping.is_set():
            if not self.journal.pending():
                with self.journal.changed:
                    self.journal.changed.wait(0.2)
                continue
            try:
                deliver(self.journal, client, self.stopping)
            except TrackingUnavailable as err:
                self._offline(str(err))
                self._wake.wait(wait)
                self._wake.clear()
                wait = min(wait * 2, self.max_retry_interval)
            else:
                if self.offline_since is not None:
                    logger.warning(
                        "MLflow tracking is back (%s): the records kept during %.0f s offline are delivered",
                        self.journal.meta["tracking_uri"], time.monotonic() - self.offline_since,
                    )
                self.offline_since, wait = None, self.retry_interval

    def _offline(self, error: str) -> None:
        if self.offline_since is None:
            self.offline_since = time.monotonic()
        uri = self.journal.meta["tracking_uri"]
        if uri not in Sender._warned:
            Sender._warned.add(uri)
            logger.warning(
                "MLflow tracking is OFFLINE (%s). Training goes on; metrics, params, tags, artifacts and the model "
                "registration are kept in %s and sent when the server is back, or later with "
                "`medgain sync %s`.", error.splitlines()[0][:300], self.journal.path, self.journal.path.parent,
            )

    def finish(self, offline_timeout: float) -> bool:
        """Send what is left, waiting while the server answers (or at most ``offline_timeout`` seconds while it
        does not), then stop. Returns whether everything was delivered."""
        self._wake.set()
        offline_for = 0.0
        while self.is_alive() and self.journal.pending():
            time.sleep(0.05)
            self._wake.set()
            offline_for = offline_for + 0.05 if self.offline_since is not None else 0.0
            if offline_for >= offline_timeout:
                break
        self.stopping.set()
        self._wake.set()
        self.join(timeout=max(offline_timeout, 1.0) + 30.0)
        return not self.journal.pending()
