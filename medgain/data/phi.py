"""Pseudonyms for frames and studies: what leaves the hospital (MLflow, review reports, partner packages) names a
frame or a study by a salted hash, never by its file path, study id or DICOM identifiers.

The salt is a site secret: ``MEDGAIN_PHI_SALT`` when set, otherwise the content of the file named by
``MEDGAIN_PHI_SALT_FILE`` (default ``~/.config/medgain/phi_salt``), created with 32 random bytes (mode 0600) on
first use. Without the salt a pseudonym cannot be traced back by hashing guessed names; with it, the site that
holds the data can map a pseudonym back to its frame (:func:`frame_ref` of each of its files).

Free text bound for tracking (error messages, descriptions, notes, tags, artifact names) goes through
:func:`pseudonymise_text`: paths, data file names and DICOM person names in it become the same pseudonyms.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

__all__ = ["DATA_EXTENSIONS", "frame_ref", "phi_salt", "pseudonym", "pseudonymise_text", "study_ref"]

#: extensions of patient data files: a bare file name with one of these is an identifier in free text (PNG, CSV
#: and JSON are left out: medgain's own artifacts use them; a data file of those kinds is named with its folder)
DATA_EXTENSIONS = (
    "dcm", "dicom", "ima", "nii", "nii.gz", "nrrd", "mha", "mhd", "svs", "ndpi", "mrxs", "scn", "vms", "bif",
    "tif", "tiff", "jpg", "jpeg", "bmp", "npy", "npz", "h5", "hdf5",
)
_TOKEN = re.compile(r"[^\s'\"`<>|,;()\[\]{}]+")
_KEPT_SCHEMES = re.compile(r"^(runs|models|https?|mlflow-artifacts|s3|gs|dbfs):/", re.IGNORECASE)
_FILE_NAME = re.compile(r"^.+\.[A-Za-z][A-Za-z0-9]{0,4}(\.gz)?$")
_DATA_NAME = re.compile(r"^[^/\\]+\.(" + "|".join(re.escape(e) for e in DATA_EXTENSIONS) + r")$", re.IGNORECASE)

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


def _pseudonymise_token(token: str) -> str:
    core = token.rstrip(".:!?")
    tail = token[len(core):]
    if not core or _KEPT_SCHEMES.match(core):
        return token
    path = re.sub(r"^(file|sqlite):/*", "/", core, flags=re.IGNORECASE)
    is_path = ("/" in path or "\\" in path) and re.search(r"[A-Za-z]", path) is not None
    if _DATA_NAME.match(core) or (is_path and _FILE_NAME.match(re.split(r"[/\\]", path)[-1])):
        return frame_ref(path) + tail
    if is_path:
        return pseudonym(os.path.normpath(os.path.abspath(path)), "d") + tail
    if "^" in core:
        return study_ref(core) + tail
    return token


def pseudonymise_text(text: str) -> str:
    """``text`` with every identifier-like word replaced by its salted pseudonym: what medgain writes as free text
    to tracking (error tags, descriptions, notes, warnings, artifact names) goes through here.

    Words are split at white space, quotes, brackets, ``,``, ``;`` and ``|`` (trailing ``.:!?`` are kept). A path
    (a word with ``/`` or ``\\`` and a letter, ``file:`` / ``sqlite:`` URIs included) becomes :func:`frame_ref` of
    it when its last part has a file extension, else the folder pseudonym ``pseudonym(abspath, "d")`` (as the
    bundles log ``dataset_dir``); a bare data file name (:data:`DATA_EXTENSIONS`) becomes its :func:`frame_ref`;
    a DICOM person name (a word with ``^``) becomes :func:`study_ref` of it. URIs of the registry and of servers
    (``runs:/``, ``models:/``, ``http(s)://``, ``mlflow-artifacts:/``, ``s3://``, ``gs://``, ``dbfs:/``) are kept.
    Pseudonyms themselves are kept, so the function can be applied twice.
    """
    return _TOKEN.sub(lambda m: _pseudonymise_token(m.group(0)), text)
