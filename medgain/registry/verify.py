"""``medgain verify``: strict check of a partner package (zip or unpacked folder) against its signed manifest.

Order of the checks, each failure naming the file and the reason:

1. the container: no duplicate entry names, no links or special files, no absolute, ``..`` or odd paths;
2. the Ed25519 signature over the raw bytes of ``manifest.json`` (required unless ``allow_unsigned``), before
   the manifest is parsed;
3. the manifest: no duplicate or unknown keys, the package format, every file with its sha256 and size;
4. the listing: every entry of the container is listed, every listed file is present with the listed size;
5. every file's sha256, streamed in chunks and never read past its listed size.

With ``extract_to`` the files are copied, while they are hashed, into a new private folder: what runs afterwards
is what was hashed. The check lives in medgain, outside the package: the package's own configs take no part in it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "MANIFEST",
    "PACKAGE_FORMAT",
    "SIGNATURE",
    "PackageVerificationError",
    "load_private_key",
    "load_public_key",
    "parse_manifest",
    "public_key_id",
    "verify_package",
]

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
PACKAGE_FORMAT = "medgain-partner-package/2"
#: files a partner package must list: the inference config, the bundle metadata and the model
REQUIRED_FILES = ("configs/inference.yaml", "configs/metadata.json", "models/model.pt")
_MANIFEST_KEYS = {
    "format": str, "model": str, "version": str, "alias": (str, type(None)), "promoted": bool, "bundle": str,
    "bundle_version": str, "review_sha256": str, "medgain_version": str, "python": str, "dependencies": dict,
    "files": dict, "signing_key": str,
}
_REQUIRED_KEYS = {"format", "model", "version", "files"}
_MAX_MANIFEST = 1 << 20
_MAX_SIGNATURE = 1 << 10
_CHUNK = 1 << 20
_PART = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*")

logger = logging.getLogger(__name__)


class PackageVerificationError(ValueError):
    """The package differs from its manifest, is malformed, or its signature does not verify."""


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


def _check_name(where: Path, name: str) -> None:
    """Refuse absolute, ``..``, empty, backslash or otherwise unusual path names."""
    parts = name.split("/")
    if not all(_PART.fullmatch(part) for part in parts):
        raise PackageVerificationError(f"{where}: unsafe path {name!r} (absolute, '..', or unusual characters)")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise PackageVerificationError(f"{MANIFEST}: key {repeated[0]!r} is repeated")
    return dict(pairs)


def parse_manifest(raw: bytes, where: Path) -> dict[str, Any]:
    """The manifest as a dict, refusing duplicate or unknown keys, another package format and bad file entries.

    Args:
        raw: the bytes of ``manifest.json``.
        where: the package, named in errors.

    Returns:
        the manifest; ``files`` maps each path to ``{"sha256": hex, "size": bytes}``.

    Raises:
        PackageVerificationError: naming the manifest and what is wrong.
    """
    try:
        manifest = json.loads(raw, object_pairs_hook=_no_duplicates)
    except PackageVerificationError as err:
        raise PackageVerificationError(f"{where}: {err}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise PackageVerificationError(f"{where}: {MANIFEST} is not JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise PackageVerificationError(f"{where}: {MANIFEST} is not a JSON object")
    unknown = sorted(set(manifest) - set(_MANIFEST_KEYS))
    missing = sorted(_REQUIRED_KEYS - set(manifest))
    if unknown or missing:
        what = f"unknown key {unknown[0]!r}" if unknown else f"no {missing[0]!r}"
        raise PackageVerificationError(f"{where}: {MANIFEST} has {what}")
    for key, kind in _MANIFEST_KEYS.items():
        if key in manifest and not isinstance(manifest[key], kind):
            raise PackageVerificationError(f"{where}: {MANIFEST} key {key!r} has the wrong type")
    if manifest["format"] != PACKAGE_FORMAT:
        raise PackageVerificationError(
            f"{where}: {MANIFEST} format {manifest['format']!r}; this medgain reads {PACKAGE_FORMAT!r} (re-package)"
        )
    for name, entry in manifest["files"].items():
        _check_name(where, name)
        if (
            name in (MANIFEST, SIGNATURE)
            or not isinstance(entry, dict)
            or set(entry) != {"sha256", "size"}
            or not re.fullmatch(r"[0-9a-f]{64}", str(entry["sha256"]))
            or not isinstance(entry["size"], int) or isinstance(entry["size"], bool) or entry["size"] < 0
        ):
            raise PackageVerificationError(f"{where}: {MANIFEST} entry {name!r} is not {{sha256, size}}")
    absent = [name for name in REQUIRED_FILES if name not in manifest["files"]]
    if absent:
        raise PackageVerificationError(f"{where}: {MANIFEST} does not list {absent[0]}; not a partner package")
    return manifest


class _Container:
    """The entries of a zip or a folder: ``sizes`` (path -> size of each regular file), ``folders`` and ``open``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sizes: dict[str, int] = {}
        self.folders: set[str] = set()
        self.archive: zipfile.ZipFile | None = None
        self._infos: dict[str, zipfile.ZipInfo] = {}
        if path.is_dir() and not path.is_symlink():
            self._scan_folder()
        elif path.is_file() and zipfile.is_zipfile(path):
            self._scan_zip()
        else:
            raise PackageVerificationError(f"{path}: neither a zip file nor a folder (a link to a folder is refused)")

    def _add(self, name: str, size: int | None) -> None:
        if name in self.sizes or name in self.folders:
            raise PackageVerificationError(f"{self.path}: {name} appears twice")
        _check_name(self.path, name)
        if size is None:
            self.folders.add(name)
        else:
            self.sizes[name] = size

    def _scan_folder(self) -> None:
        def refuse(err: OSError) -> None:
            raise PackageVerificationError(f"{self.path}: unreadable folder ({err})")

        for root, dirs, files in os.walk(self.path, onerror=refuse):
            for entry in sorted(dirs) + sorted(files):
                full = Path(root, entry)
                info = os.lstat(full)
                name = full.relative_to(self.path).as_posix()
                if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
                    raise PackageVerificationError(f"{self.path}: {name} is a link or a special file")
                self._add(name, info.st_size if stat.S_ISREG(info.st_mode) else None)

    def _scan_zip(self) -> None:
        try:
            self.archive = zipfile.ZipFile(self.path)
            infos = self.archive.infolist()
        except (zipfile.BadZipFile, OSError) as err:
            raise PackageVerificationError(f"{self.path}: unreadable zip ({err})") from None
        for info in infos:
            kind = stat.S_IFMT(info.external_attr >> 16)
            name = info.filename.removesuffix("/") if info.is_dir() else info.filename
            if kind not in (0, stat.S_IFDIR if info.is_dir() else stat.S_IFREG):
                raise PackageVerificationError(f"{self.path}: {name} is a link or a special file")
            if info.flag_bits & 0x1:
                raise PackageVerificationError(f"{self.path}: {name} is encrypted")
            self._add(name, None if info.is_dir() else info.file_size)
            if not info.is_dir():
                self._infos[name] = info

    def open(self, name: str) -> IO[bytes]:
        """A binary reader of the regular file ``name``."""
        if self.archive is not None:
            return self.archive.open(self._infos[name])
        fd = os.open(self.path / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        return os.fdopen(fd, "rb")

    def read_small(self, name: str, limit: int) -> bytes | None:
        """The whole of a small file (None when absent), refused above ``limit`` bytes."""
        if name not in self.sizes:
            return None
        if self.sizes[name] > limit:
            raise PackageVerificationError(f"{self.path}: {name} is larger than {limit} bytes")
        kept = bytearray()
        self.stream(name, self.sizes[name], kept.extend)
        return bytes(kept)

    def stream(self, name: str, size: int, sink: Callable[[bytes], Any] | None) -> str:
        """Read ``name`` in chunks into ``sink``, never past ``size + 1`` bytes; returns its sha256.

        Raises:
            PackageVerificationError: when it is longer or shorter than ``size`` or unreadable.
        """
        digest, total = hashlib.sha256(), 0
        try:
            with self.open(name) as source:
                while chunk := source.read(min(_CHUNK, size + 1 - total)):
                    total += len(chunk)
                    if total > size:
                        raise PackageVerificationError(f"{self.path}: {name} is larger than its manifest size {size}")
                    digest.update(chunk)
                    if sink is not None:
                        sink(chunk)
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as err:  # bad CRC, truncated, unsupported
            raise PackageVerificationError(f"{self.path}: {name} is unreadable ({err})") from None
        if total != size:
            raise PackageVerificationError(f"{self.path}: {name} is shorter than its manifest size {size}")
        return digest.hexdigest()

    def check(self, name: str, entry: dict[str, Any], sink: Callable[[bytes], Any] | None) -> None:
        """Hash ``name`` against its manifest ``entry`` (passing its bytes to ``sink`` when given)."""
        if self.stream(name, entry["size"], sink) != entry["sha256"]:
            raise PackageVerificationError(f"{self.path}: {name} differs from the manifest (sha256 mismatch)")

    def close(self) -> None:
        """Close the zip file, if any."""
        if self.archive is not None:
            self.archive.close()


def _check_signature(where: Path, raw: bytes, signature: bytes | None, public_key: str | os.PathLike) -> None:
    key = load_public_key(public_key)
    if signature is None:
        raise PackageVerificationError(f"{where}: {SIGNATURE} is missing; the package is not signed")
    try:
        key.verify(base64.b64decode(signature.strip(), validate=True), raw)
    except (InvalidSignature, ValueError):
        raise PackageVerificationError(
            f"{where}: {SIGNATURE} does not verify {MANIFEST} with the public key {public_key} "
            f"(key id {public_key_id(key)})"
        ) from None


def verify_package(
    package: str | os.PathLike,
    public_key: str | os.PathLike | None = None,
    allow_unsigned: bool = False,
    extract_to: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Strictly check a package against its signed manifest (see the module docstring for the order).

    Args:
        package: the zip written by :func:`medgain.registry.package.build_package`, or its unpacked folder (which
            must then hold nothing else: no outputs, no extra file).
        public_key: the signer's Ed25519 public key (PEM); required unless ``allow_unsigned``.
        allow_unsigned: check the hashes only (no public key; the signature, if any, is not checked). Whoever
            changes the package can then also change its manifest: callers must say so loudly.
        extract_to: a folder that does not exist yet: created (mode 0700) and filled with the listed files as
            they are hashed. Removed again when a check fails.

    Returns:
        the manifest.

    Raises:
        PackageVerificationError: naming the first entry that is duplicated, a link, unsafe, unlisted, missing,
            of another size or content, or the signature that is missing or does not verify.
        ValueError: when both or neither of ``public_key`` and ``allow_unsigned`` are given, or the key is unusable.
    """
    if (public_key is None) != allow_unsigned:
        raise ValueError(
            "give the signer's public key, or allow_unsigned=True to check the hashes only (not both)"
            if public_key is not None else
            "a signature is required: give the signer's public key (or allow unsigned packages explicitly)"
        )
    path = Path(package).absolute()
    if not path.exists():
        raise PackageVerificationError(f"{path}: package not found")
    container = _Container(path)
    try:
        raw = container.read_small(MANIFEST, _MAX_MANIFEST)
        if raw is None:
            raise PackageVerificationError(f"{path}: no {MANIFEST}; not a medgain partner package")
        if public_key is not None:
            _check_signature(path, raw, container.read_small(SIGNATURE, _MAX_SIGNATURE), public_key)
        else:
            logger.warning("%s: UNSIGNED check: the hashes are checked, not who made the package", path)
        manifest = parse_manifest(raw, path)
        files: dict[str, dict[str, Any]] = manifest["files"]
        parents = {"/".join(n.split("/")[:i]) for n in files for i in range(1, n.count("/") + 1)}
        for name in sorted(container.sizes) + sorted(container.folders):
            if name not in files and name not in (MANIFEST, SIGNATURE) and name not in parents:
                raise PackageVerificationError(f"{path}: {name} is not listed in the manifest")
        for name, entry in sorted(files.items()):
            if name not in container.sizes:
                raise PackageVerificationError(f"{path}: {name} is missing")
            if container.sizes[name] != entry["size"]:
                raise PackageVerificationError(
                    f"{path}: {name} holds {container.sizes[name]} bytes, the manifest says {entry['size']}"
                )
        _hash_all(container, files, manifest_raw=raw, extract_to=extract_to)
    finally:
        container.close()
    return manifest


def _hash_all(
    container: _Container, files: dict[str, dict[str, Any]], manifest_raw: bytes, extract_to: str | os.PathLike | None
) -> None:
    """Hash every listed file; with ``extract_to``, write the files (and the manifest) there as they are read."""
    if extract_to is None:
        for name, entry in sorted(files.items()):
            container.check(name, entry, None)
        return
    dest = Path(extract_to)
    dest.mkdir(mode=0o700)
    try:
        for name, entry in sorted(files.items()):
            target = dest / name
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "wb") as sink:
                container.check(name, entry, sink.write)
        (dest / MANIFEST).write_bytes(manifest_raw)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise

