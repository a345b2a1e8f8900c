"""Finding protected health information where it must not be: the identifiers of DICOM headers and the names of
data files, searched in every byte of an MLflow store (database and artifact folders) or a partner package
(zip members included, decompressed)."""

from __future__ import annotations

import os
import sqlite3
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import pydicom

__all__ = ["PHI_TAGS", "dicom_identifiers", "scan_for_identifiers", "store_locations"]

#: DICOM attributes that identify a patient, a study or a place (PS3.15 Annex E, the ones capsule exports carry)
PHI_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StudyID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "StationName",
    "DeviceSerialNumber",
)


def dicom_identifiers(path: str | os.PathLike, min_length: int = 4) -> set[str]:
    """The non-empty :data:`PHI_TAGS` values of a DICOM file's header (person names also in their parts)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    found: set[str] = set()
    for tag in PHI_TAGS:
        value = ds.get(tag)
        if value is None or value == "":
            continue
        values = list(value) if isinstance(value, pydicom.multival.MultiValue) else [value]
        for v in values:
            text = str(v)
            found.add(text)
            found.update(part for part in text.replace("^", " ").split() if part)
    return {v for v in found if len(v) >= min_length}


def _member_bytes(path: Path) -> Iterable[tuple[str, bytes]]:
    data = path.read_bytes()
    yield str(path), data
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    yield f"{path}!{info.filename}", archive.read(info)


def scan_for_identifiers(roots: Sequence[str | os.PathLike], identifiers: Iterable[str]) -> list[tuple[str, str]]:
    """Every ``(file, identifier)`` where an identifier occurs (case-insensitive, as UTF-8 or UTF-16-LE bytes)
    in a file under ``roots`` (files or folders; zip files are searched member by member as well)."""
    needles = {i for i in identifiers if i}
    patterns = [(i, enc) for i in needles for enc in {i.lower().encode(), i.lower().encode("utf-16-le")}]
    hits = []
    files: list[Path] = []
    for root in roots:
        root = Path(root)
        files.extend(sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root])
    for file in files:
        for name, data in _member_bytes(file):
            lower = data.lower()
            hits.extend((name, needle) for needle, pattern in patterns if pattern in lower)
    return sorted(set(hits))


def store_locations(tracking_uri: str) -> list[Path]:
    """The local files of an MLflow store: the SQLite database and every experiment's artifact folder.

    Raises:
        ValueError: for a store that is not a local SQLite database.
    """
    if not tracking_uri.startswith("sqlite:///"):
        raise ValueError(f"store_locations: only local SQLite stores can be scanned, got {tracking_uri!r}")
    db = Path(tracking_uri[len("sqlite:///"):])
    paths = [db]
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT artifact_location FROM experiments").fetchall()
    for (location,) in rows:
        local = location[len("file://"):] if location.startswith("file://") else location
        if local and not location.startswith(("s3:", "gs:", "http:", "https:", "mlflow-artifacts:")):
            paths.append(Path(local))
    return [p for p in paths if p.exists()]
