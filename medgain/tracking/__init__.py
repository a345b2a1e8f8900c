"""MLflow tracking: what identifies a run (names, tags, links) and buffered tracking that never blocks training
(an on-disk journal per run, delivered in the background, in order, exactly once)."""

from medgain.tracking.buffered import BufferedClient, TrackedRun, open_run, sync
from medgain.tracking.delivery import Sender, TrackingUnavailable, deliver, register_model_version
from medgain.tracking.journal import JournalLockedError, RunJournal, find_journals
from medgain.tracking.naming import (
    ML_WORKFLOW_QUERY,
    data_hash,
    gain_summary,
    medgain_commit,
    merged,
    run_name,
    run_tags,
    tracking_artifact_path,
    ui_command,
    ui_url,
)
from medgain.tracking.store import artifact_root, prepare_store

__all__ = [
    "ML_WORKFLOW_QUERY",
    "BufferedClient",
    "JournalLockedError",
    "RunJournal",
    "Sender",
    "TrackedRun",
    "TrackingUnavailable",
    "artifact_root",
    "data_hash",
    "deliver",
    "find_journals",
    "gain_summary",
    "medgain_commit",
    "merged",
    "open_run",
    "prepare_store",
    "register_model_version",
    "run_name",
    "run_tags",
    "sync",
    "tracking_artifact_path",
    "ui_command",
    "ui_url",
]
