"""Where a new MLflow store keeps its artifacts: beside its SQLite file, never in the working folder."""

from __future__ import annotations

from pathlib import Path

__all__ = ["artifact_root", "prepare_store"]

_SQLITE = "sqlite:///"


def artifact_root(tracking_uri: str) -> str | None:
    """``file://…/mlruns`` beside the database of a SQLite store (``sqlite:///DIR/mlflow.db`` → ``DIR/mlruns``),
    as an absolute URI; None for other stores."""
    if not tracking_uri.startswith(_SQLITE):
        return None
    return (Path(tracking_uri[len(_SQLITE):]).parent / "mlruns").resolve().as_uri()


def prepare_store(tracking_uri: str) -> None:
    """Create a SQLite store that does not exist yet with its default artifact root :func:`artifact_root`.

    MLflow creates a new store's "Default" experiment with its artifacts in ``./mlruns`` of the working folder
    (inside the repository when run from there); created here first, every experiment of the store, "Default"
    included, keeps its artifacts under the run's outputs. Existing stores and other URIs are left as they are.
    """
    root = artifact_root(tracking_uri)
    database = Path(tracking_uri[len(_SQLITE):]) if root else None
    if database is None or (database.is_file() and database.stat().st_size > 0):
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    database.parent.mkdir(parents=True, exist_ok=True)
    SqlAlchemyStore(tracking_uri, root)
