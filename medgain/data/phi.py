"""Pseudonyms for frames and studies: what leaves the hospital (MLflow, review reports, partner packages) names a
frame or a study by a salted hash, never by its file path, study id or DICOM identifiers.

The salt is a site secret: ``MEDGAIN_PHI_SALT`` when set, otherwise the content of the file named by
``MEDGAIN_PHI_SALT_FILE`` (default ``~/.config/medgain/phi_salt``), created with 32 random bytes (mode 0600) on
first use. Without the salt a pseudonym cannot be traced back by hashing guessed names; with it, the site that
holds the data can map a pseudonym back to its frame (:func:`frame_ref` of each of its files).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

__all__ = ["frame_ref", "phi_salt", "pseudonym", "study_ref"]

_SALT_ENV = "MEDGAIN_PHI_SALT"
_SALT_FILE_ENV = "MEDGAIN_PHI_SALT_FILE"


def phi_salt() -> bytes:
    """The site salt (see the module docstring).

    Raises:
        ValueError: when the salt file exists but is empty.
    """
    value = os.environ.get(_SALT_ENV)
    if value:
        return value.encode()
    path = Path(os.environ.get(_SALT_FILE_ENV) or Path.home() / ".config" / "medgain" / "phi_salt")
    if not path.is_file():  # written whole, then linked: concurrent first users (DDP ranks) agree on one salt
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            with contextlib.suppress(FileExistsError):  # another process linked its salt first: read that one below
                os.link(tmp, path)
        finally:
            tmp.unlink()
    salt = path.read_text().strip()
    if not salt:
        raise ValueError(f"{path}: the pseudonym salt file is empty; delete it to create a new one")
    return salt.encode()


def pseudonym(value: str, prefix: str = "x") -> str:
    """``<prefix>-<16 hex digits>``: the salted HMAC-SHA256 of ``value`` (same value, same site: same name)."""
    digest = hmac.new(phi_salt(), value.encode(), hashlib.sha256).hexdigest()[:16]
    return f"{prefix}-{digest}"


def frame_ref(path: str | os.PathLike, frame: int = 0) -> str:
    """The pseudonym of one frame of an image file (``f-…``), from its absolute normalised path and index."""
    return pseudonym(f"{os.path.normpath(os.path.abspath(path))}#{int(frame)}", "f")


def study_ref(study: str) -> str:
    """The pseudonym of a study, patient or slide identifier (``s-…``)."""
    return pseudonym(str(study), "s")
