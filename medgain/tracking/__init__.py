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
    ui_command,
    ui_url,
)

__all__ = [
    "ML_WORKFLOW_QUERY",
    "BufferedClient",
    "JournalLockedError",
    "RunJournal",
    "Sender",
    "TrackedRun",
    "TrackingUnavailable",
    "data_hash",
    "deliver",
    "find_journals",
    "gain_summary",
    "medgain_commit",
    "merged",
    "open_run",
    "register_model_version",
    "run_name",
    "run_tags",
    "sync",
    "ui_command",
    "ui_url",
]
