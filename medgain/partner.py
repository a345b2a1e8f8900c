"""The partner's one command, ``medgain infer``: verify a package, then run its inference, outside its control.

The whole path a hospital trusts, in one module:

1. argument checks (the input folder exists, the output folder is new or empty) — no input is read;
2. :func:`medgain.registry.verify.verify_package` on the zip or unpacked folder: the signature over the
   manifest first, then every entry listed and streamed through its sha256 with the listed size as a bound,
   copied while it is hashed into a new private folder (mode 0700). A failure stops here, before any input is
   read, naming the file and the reason;
3. the verified copy's ``configs/inference.yaml`` is loaded with MONAI's ``ConfigParser`` in this process and its
   ``initialize``, ``run`` and ``finalize`` expressions are evaluated. Neither the package nor the private copy is
   put on Python's import path (``python -m monai.bundle run`` puts the bundle folder there, and ``python -m``
   the current folder); medgain refuses to run when the package folder is already on it;
4. the predictions are written to a staging folder beside ``output`` and renamed to it at the end: nothing is
   half-written. ``allow_unsigned`` adds ``UNSIGNED_PACKAGE.txt``; ``pseudonymise_outputs`` adds a copy keyed by
   salted pseudonyms (``shareable/``) and the local mapping (``pseudonym_map.csv``).
"""

from __future__ import annotations

import csv
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from medgain.data.phi import frame_ref
from medgain.registry.verify import verify_package

__all__ = ["UNSIGNED_NOTICE", "run_partner_inference", "write_shareable_copy"]

UNSIGNED_NOTICE = "UNSIGNED_PACKAGE.txt"
_HEATMAP_SUFFIXES = (".png", ".nii.gz")


def _refuse_if_importable(package: Path) -> None:
    """Refuse when the package (folder or zip) is on ``sys.path``: its files could replace imported modules."""
    root = package.resolve()
    for entry in sys.path:
        where = Path(entry or os.getcwd()).resolve()
        if where == root or root in where.parents:
            raise ValueError(
                f"{package}: it is on Python's import path ({entry or 'the current folder'}); run the installed "
                "`medgain infer` from outside the package folder, not `python -m` inside it"
            )


def _run_bundle(bundle: Path, overrides: dict[str, Any]) -> None:
    """Evaluate the ``initialize``, ``run`` and ``finalize`` ids of ``bundle/configs/inference.yaml``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    for key, value in overrides.items():
        if key not in parser:
            raise ValueError(f"configs/inference.yaml of this package has no {key!r} to set")
        parser[key] = value
    if "run" not in parser:
        raise ValueError("configs/inference.yaml of this package has no 'run' id; not a medgain partner package")
    parser.parse(reset=True)
    for step in ("initialize", "run", "finalize"):
        if step in parser:
            parser.get_parsed_content(step)


def write_shareable_copy(output: str | os.PathLike) -> Path:
    """``output/shareable/``: the predictions, heat maps and errors of a ``medgain infer`` folder keyed by salted
    pseudonyms (:func:`medgain.data.phi.frame_ref`), and ``output/pseudonym_map.csv`` (kept local) mapping each
    pseudonym back to its file, frame and heat-map name.

    Args:
        output: a folder holding ``predictions.csv`` (``file``, ``frame``, ...) and, optionally, ``heatmaps/``
            (named by :class:`~medgain.handlers.HeatmapWriter`) and ``errors.csv`` (``file``, ``reason``).

    Returns:
        the ``shareable`` folder.

    Raises:
        ValueError: when ``predictions.csv`` is missing or has no ``file`` and ``frame`` columns.
    """
    from medgain.handlers.heatmap_writer import HeatmapWriter

    output = Path(output)
    table = output / "predictions.csv"
    if not table.is_file():
        raise ValueError(f"{table}: not found; --pseudonymise-outputs needs the predictions table")
    with table.open(newline="") as f:
        reader = csv.DictReader(f)
        rows, columns = list(reader), list(reader.fieldnames or [])
    if "file" not in columns or "frame" not in columns:
        raise ValueError(f"{table}: has no 'file' and 'frame' columns; cannot key it by pseudonym")
    share = output / "shareable"
    (share / "heatmaps").mkdir(parents=True)
    names = HeatmapWriter(str(output), num_threads=0)  # the writer's own naming, replayed in the rows' order
    mapping = []
    for row in rows:
        ref = frame_ref(row["file"], int(row["frame"]))
        stem = f"{names.file_stem(row['file'])}_f{row['frame']}"
        for suffix in _HEATMAP_SUFFIXES:
            if (output / "heatmaps" / f"{stem}{suffix}").is_file():
                shutil.copyfile(output / "heatmaps" / f"{stem}{suffix}", share / "heatmaps" / f"{ref}{suffix}")
        mapping.append({"ref": ref, "file": row["file"], "frame": row["frame"], "heatmap": stem})
        row["file"] = ref
    with (share / "predictions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["ref" if c == "file" else c for c in columns])
        writer.writeheader()
        writer.writerows({("ref" if k == "file" else k): v for k, v in row.items()} for row in rows)
    errors = output / "errors.csv"
    if errors.is_file():
        with errors.open(newline="") as f, (share / "errors.csv").open("w", newline="") as g:
            writer = csv.DictWriter(g, ["ref", "reason"])
            writer.writeheader()
            for row in csv.DictReader(f):
                ref, reason = frame_ref(row["file"]), row["reason"]
                for name in (row["file"], Path(row["file"]).name):  # the reason may quote the path or name
                    reason = reason.replace(name, ref) if name else reason
                writer.writerow({"ref": ref, "reason": reason})
                mapping.append({"ref": ref, "file": row["file"], "frame": "", "heatmap": ""})
    with (output / "pseudonym_map.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["ref", "file", "frame", "heatmap"])
        writer.writeheader()
        writer.writerows(mapping)
    return share


def run_partner_inference(
    package: str | os.PathLike,
    input_dir: str | os.PathLike,
    output: str | os.PathLike,
    public_key: str | os.PathLike | None = None,
    allow_unsigned: bool = False,
    pseudonymise_outputs: bool = False,
    input_csv: str | os.PathLike | None = None,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Verify ``package`` strictly, then run its inference on ``input_dir`` into the new folder ``output``.

    Args:
        package: the partner package zip, or its unpacked folder (holding nothing else).
        input_dir: folder of the images to score.
        output: folder written (must not exist, or be empty).
        public_key: the signer's Ed25519 public key (PEM); required unless ``allow_unsigned``.
        allow_unsigned: check the hashes only; ``output/UNSIGNED_PACKAGE.txt`` then says so.
        pseudonymise_outputs: also write ``output/shareable/`` and ``output/pseudonym_map.csv``
            (:func:`write_shareable_copy`).
        input_csv: the table of clinical metadata, for packages whose inference takes one (``input_csv``).
        num_workers: data loader workers (default: the package's).

    Returns:
        ``manifest`` (the verified manifest), ``output``, ``signed`` and ``shareable`` (a folder or None).

    Raises:
        PackageVerificationError: when the package fails verification (nothing is read or written).
        ValueError: on unusable arguments, or a package folder on Python's import path.
    """
    package, output, input_dir = Path(package).absolute(), Path(output).absolute(), Path(input_dir).absolute()
    if not input_dir.is_dir():
        raise ValueError(f"{input_dir}: input folder not found")
    if input_csv is not None and not Path(input_csv).is_file():
        raise ValueError(f"{input_csv}: input table not found")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"{output}: exists and is not an empty folder; give a new output folder")
    _refuse_if_importable(package)
    work = Path(tempfile.mkdtemp(prefix="medgain-infer-"))
    staging: Path | None = None
    try:
        bundle = work / "bundle"
        manifest = verify_package(package, public_key, allow_unsigned=allow_unsigned, extract_to=bundle)
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
        if allow_unsigned:
            (staging / UNSIGNED_NOTICE).write_text(
                f"UNSIGNED: {package.name} was run with --allow-unsigned. Its files matched its manifest, but no "
                "signature was checked: anyone could have made or changed this package and its manifest.\n"
            )
        overrides: dict[str, Any] = {
            "bundle_root": str(bundle), "input_dir": str(input_dir), "output_dir": str(staging),
        }
        if input_csv is not None:
            overrides["input_csv"] = str(Path(input_csv).absolute())
        if num_workers is not None:
            overrides["num_workers"] = num_workers
        _run_bundle(bundle, overrides)
        shareable = None
        if pseudonymise_outputs:
            shareable = write_shareable_copy(staging)
            if allow_unsigned:
                shutil.copyfile(staging / UNSIGNED_NOTICE, shareable / UNSIGNED_NOTICE)
        if output.exists():
            output.rmdir()
        os.replace(staging, output)
        staging = None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return {
        "manifest": manifest,
        "output": output,
        "signed": not allow_unsigned,
        "shareable": None if shareable is None else output / "shareable",
    }
