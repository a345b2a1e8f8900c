"""What identifies a run in MLflow: readable names, tags (data hash, medgain commit) and links that open the
model-training view of the MLflow UI."""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medgain.data.phi import pseudonymise_text

__all__ = [
    "data_hash",
    "gain_summary",
    "medgain_commit",
    "run_name",
    "run_tags",
    "tracking_artifact_path",
    "ui_command",
    "ui_url",
]

#: query parameter that makes the MLflow 3 UI open an experiment in its model-training (not GenAI) view
ML_WORKFLOW_QUERY = "workflowType=machine_learning"


def data_hash(datalist: str | os.PathLike) -> str:
    """First 12 hex digits of the sha256 of a datalist file: which data a run saw, without naming any file."""
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: datalist file not found")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def medgain_commit() -> str:
    """The git commit of the medgain source tree in use (``+dirty`` with local changes), or the package version
    when medgain is installed without its git history."""
    from medgain import __version__

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"medgain-{__version__} (no git checkout)"
    return commit + ("+dirty" if dirty else "")


def gain_summary(am_weight: float, ex_weight: float, masks_fraction: float = 1.0) -> str:
    """Short name of the GAIN setting: ``plain``, ``AM``, ``EX100%``, ``AM+EX10%``…"""
    parts = (["AM"] if am_weight > 0 else []) + ([f"EX{masks_fraction * 100:g}%"] if ex_weight > 0 else [])
    return "+".join(parts) or "plain"


def run_name(kind: str, *parts: Any) -> str:
    """``<kind>-<part>-…-<YYYYmmdd-HHMMSS>``: readable in the runs table and unique per second."""
    words = [kind, *(str(p) for p in parts if p not in (None, ""))]
    return "-".join(words + [time.strftime("%Y%m%d-%H%M%S")])


def run_tags(**tags: Any) -> dict[str, str]:
    """Tags as MLflow strings; ``description`` becomes the run's description (``mlflow.note.content``)."""
    out = {k: str(v) for k, v in tags.items() if v is not None and k != "description"}
    if tags.get("description"):
        out["mlflow.note.content"] = str(tags["description"])
    return out


def tracking_artifact_path(path: str) -> str:
    """An artifact's path in the run (``folder/sub/file.ext``), each part through
    :func:`medgain.data.phi.pseudonymise_text`: a folder or file named after a patient or a data file leaves as
    its pseudonym, medgain's own names (``checkpoint/model.pt``, ``review/v2``) are kept."""
    return "/".join(pseudonymise_text(part) for part in path.split("/"))


def ui_url(experiment_id: str | None = None, host: str = "127.0.0.1", port: int = 5000) -> str:
    """Address of the MLflow UI that opens the model-training view (of one experiment, when given)."""
    page = f"experiments/{experiment_id}" if experiment_id else "experiments"
    return f"http://{host}:{port}/#/{page}?{ML_WORKFLOW_QUERY}"


# before ``mlflow ui``: no background job consumers, so that stopping the UI stops everything it started
_UI_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false"


def ui_command(tracking_uri: str, port: int = 5000) -> str:
    """A shell command that starts the MLflow UI on a store, runnable as printed in a fresh shell from any folder
    (the ``mlflow`` executable of this Python environment, by absolute path). It runs one server (one web worker,
    no job consumers): Ctrl+C, or ``kill`` of its process id, stops all of it."""
    mlflow_bin = Path(sys.executable).absolute().with_name("mlflow")
    return (
        f"{_UI_ENV} {shlex.quote(str(mlflow_bin))} ui --backend-store-uri {shlex.quote(tracking_uri)} "
        f"--host 127.0.0.1 --port {port} --workers 1"
    )


def merged(*mappings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The union of config dicts, later ones winning (for tags composed in bundle configs)."""
    out: dict[str, Any] = {}
    for mapping in mappings:
        out.update(mapping or {})
    return out
