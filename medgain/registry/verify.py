"""``medgain verify``: check a partner package (zip or unpacked folder) against its manifest — the sha256 of every
file and, with the signer's public key, the Ed25519 signature over ``manifest.json``.

The package's own inference config runs :func:`verify_package` first, so a package that fails verification
does not run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "MANIFEST",
    "SIGNATURE",
    "PackageVerificationError",
    "load_private_key",
    "load_public_key",
    "public_key_id",
    "verify_package",
]

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"

logger = logging.getLogger(__name__)


class PackageVerificationError(ValueError):
    """The package differs from its manifest, or its signature does not verify."""


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (unencrypted PKCS#8, e.g. ``openssl genpkey -algorithm ed25519``)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as err:
        raise ValueError(f"{path}: not an unencrypted PEM private key ({err})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (``openssl pkey -in key.pem -pubout``)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (ValueError, TypeError, OSError) as err:
        raise ValueError(f"{path}: not a PEM public key ({err})") from err
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key ({type(key).__name__})")
    return key


def public_key_id(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw public key (names the key in the manifest)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _reader(path: Path) -> tuple[Callable[[str], bytes | None], set[str] | None]:
    """A function reading a package member (None when missing) and, for a zip, the set of its file names."""
    if path.is_dir():
        def read(name: str) -> bytes | None:
            file = path / name
            return file.read_bytes() if file.is_file() else None

        return read, None
    if not zipfile.is_zipfile(path):
        raise PackageVerificationError(f"{path}: neither a zip file nor a folder")
    archive = zipfile.ZipFile(path)
    names = {i.filename for i in archive.infolist() if not i.is_dir()}

    def read_member(name: str) -> bytes | None:
        return archive.read(name) if name in names else None

    return read_member, names


def verify_package(
    package: str | os.PathLike, public_key: str | os.PathLike | None = None, require_signature: bool = False
) -> dict[str, Any]:
    """Check every file of a package against ``manifest.json``, then the signature.

    Args:
        package: the zip written by :func:`medgain.registry.package.build_package`, or its unpacked folder (files
            not in the manifest are allowed there: outputs written beside it).
        public_key: the signer's Ed25519 public key (PEM); the signature must then be present and verify.
        require_signature: refuse a package without a verifying signature even when no key is given.

    Returns:
        the manifest.

    Raises:
        PackageVerificationError: naming the first file that is missing, differs, or is not in the manifest (in
            a zip), or the signature that does not verify.
    """
    path = Path(package).absolute()
    if not path.exists():
        raise PackageVerificationError(f"{path}: package not found")
    read, names = _reader(path)
    raw = read(MANIFEST)
    if raw is None:
        raise PackageVerificationError(f"{path}: no {MANIFEST}; not a medgain partner package")
    try:
        manifest = json.loads(raw)
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as err:
        raise PackageVerificationError(f"{path}: {MANIFEST} is unreadable ({err!r})") from err
    for name, expected in sorted(files.items()):
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts:
            raise PackageVerificationError(f"{path}: {MANIFEST} lists an unsafe path {name!r}")
        content = read(name)
        if content is None:
            raise PackageVerificationError(f"{path}: {name} is missing")
        if hashlib.sha256(content).hexdigest() != expected:
            raise PackageVerificationError(f"{path}: {name} differs from the manifest (sha256 mismatch)")
    if names is not None:
        extra = sorted(names - set(files) - {MANIFEST, SIGNATURE})
        if extra:
            raise PackageVerificationError(f"{path}: {extra[0]} is not listed in the manifest")
    signature = read(SIGNATURE)
    if public_key is not None:
        if signature is None:
            raise PackageVerificationError(f"{path}: {SIGNATURE} missing; the package is not signed")
        key = load_public_key(public_key)
        try:
            key.verify(base64.b64decode(signature.strip(), validate=True), raw)
        except (InvalidSignature, ValueError):
            raise PackageVerificationError(
                f"{path}: {SIGNATURE} does not verify {MANIFEST} with the public key {public_key}"
            ) from None
    elif require_signature:
        raise PackageVerificationError(f"{path}: a signature check was required but no public key was given")
    elif signature is not None:
        logger.warning("%s: signed, but no public key given: the file hashes are checked, not who signed", path)
    return manifest
