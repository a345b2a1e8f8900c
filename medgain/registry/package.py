"""``medgain package``: a registered, reviewed model version as a MONAI bundle zip that a hospital runs offline —
without MLflow, the training data or medgain's source tree.

Layout of the zip::

    configs/inference.yaml      standalone inference (run by ``medgain infer`` after it verified the package)
    configs/train.yaml, configs/evaluate.yaml, configs/logging.conf, configs/metadata.json (version bumped)
    models/model.pt             weights, model spec, operating point (torch.load(weights_only=True))
    models/model.ts             TorchScript export of the network (logits of a [0, 1] RGB batch [, metadata])
    docs/README.md, docs/model_card.md, docs/review_report.html
    LICENSE                     medgain's licence
    requirements.txt            pinned medgain and dependency versions
    wheels/medgain-*.whl        medgain itself (unless left out)
    manifest.json               sha256 and size of every file, versions; manifest.sig: Ed25519 signature (--sign-key)

The package does not verify itself: ``medgain infer`` (:mod:`medgain.partner`) verifies it, outside its control.
A version that holds no promoted alias (``champion`` / ``production``) is packaged only when asked explicitly
(``unpromoted=True``), and its model card and manifest say so.

Nothing of the training data is inside: the model file keeps only the weights, the spec, the operating point and
the registry name / version; the review report names frames by salted pseudonyms.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml

from medgain.model_file import build_network, load_checkpoint, load_model_weights
from medgain.registry.gate import load_review
from medgain.registry.review import (
    REVIEW_ARTIFACTS,
    bundle_folder,
    fetch_checkpoint,
    registry_client,
    resolve_version,
)
from medgain.registry.verify import MANIFEST, PACKAGE_FORMAT, SIGNATURE, load_private_key, public_key_id

__all__ = ["PACKAGE_FORMAT", "PROMOTED_ALIASES", "build_package", "parse_model_ref", "standalone_inference_config"]

#: aliases that make a version "promoted": packaging any other version needs ``unpromoted=True``
PROMOTED_ALIASES = ("champion", "production")
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)  # fixed member times: the same inputs give the same zip


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``NAME@ALIAS`` or ``NAME@VERSION`` (digits) as ``(name, version, alias)``."""
    name, sep, which = ref.rpartition("@")
    if not sep or not name or not which:
        raise ValueError(f"--model must be NAME@ALIAS or NAME@VERSION (e.g. capsule_endoscopy_gain@champion), got {ref!r}")
    return (name, which, None) if which.isdigit() else (name, None, which)


def standalone_inference_config(bundle: Path) -> dict[str, Any]:
    """The bundle's ``inference.yaml`` made to run from the package: its model file is the package's
    ``models/model.pt``; ``run`` (MONAI's default run id, which :func:`medgain.partner.run_partner_inference` and
    ``python -m monai.bundle run`` run) does the inference, as in the repository's bundle. It holds no verification
    step: a check inside a file of the package is one its editor removes; ``medgain infer`` verifies the package
    before it reads this file."""
    config = yaml.safe_load((bundle / "configs" / "inference.yaml").read_text())
    for key in ("imports", "initialize", "run", "checkpoint", "input_dir", "output_dir"):
        if key not in config or (key in ("imports", "initialize", "run") and not isinstance(config[key], list)):
            raise ValueError(f"{bundle}/configs/inference.yaml: needs '{key}' to be packaged")
    config["checkpoint"] = "$os.path.join(@bundle_root, 'models', 'model.pt')"
    return config


def _license() -> bytes:
    """medgain's LICENSE: from the source checkout, else from the installed distribution's metadata."""
    source = Path(__file__).resolve().parents[2] / "LICENSE"
    if source.is_file():
        return source.read_bytes()
    for file in importlib.metadata.distribution("medgain").files or []:
        if file.name == "LICENSE":
            return Path(file.locate()).read_bytes()
    raise ValueError("medgain's LICENSE file is found neither in the source tree nor in the installed distribution")


def _requirements() -> dict[str, str]:
    names = ["medgain", "cryptography"]
    for requirement in importlib.metadata.requires("medgain") or []:
        if "extra ==" not in requirement:
            names.append(re.split(r"[<>=!;\[ ]", requirement, maxsplit=1)[0])
    return {name: importlib.metadata.version(name) for name in dict.fromkeys(names)}


def _build_wheel(dest: Path) -> Path:
    source = Path(__file__).resolve().parents[2]
    if not (source / "pyproject.toml").is_file():
        raise ValueError("medgain is not a source checkout here: give --wheel PATH or --no-wheel")
    with tempfile.TemporaryDirectory() as tmp:  # built from a copy: setuptools writes build/ into the source
        copy = Path(tmp) / "medgain"
        shutil.copytree(source / "medgain", copy / "medgain", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy2(source / name, copy / name)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest),
             str(copy)],
            check=True, capture_output=True, text=True,
        )
    (wheel,) = dest.glob("medgain-*.whl")
    return wheel


def _model_files(checkpoint_path: Path, name: str, version: str) -> tuple[bytes, bytes]:
    checkpoint = load_checkpoint(checkpoint_path)
    point = checkpoint.get("operating_point") or {}
    threshold = point.get("threshold")
    if threshold is None or not math.isfinite(float(threshold)):
        raise ValueError(
            f"{name} version {version}: its model file has no finite operating threshold "
            f"({point.get('reason', 'none stored')}); a partner package ships the threshold its decisions use. "
            "Train until validation sets one (more epochs, or more validation positives), then review and package."
        )
    spec = checkpoint["model_spec"]
    network = build_network(spec, logits_only=True)  # the form MONAI's ckpt_export exports: logits only
    load_model_weights(network, checkpoint_path)
    network.eval()
    kept = {
        "model": {k: v.detach().cpu().clone() for k, v in network.state_dict().items()},
        "model_spec": spec,
        "operating_point": checkpoint["operating_point"],
        "epoch": checkpoint.get("epoch"),
        "provenance": {"model_name": name, "model_version": version},
    }
    weights = io.BytesIO()
    torch.save(kept, weights)
    script = io.BytesIO()
    torch.jit.save(torch.jit.script(network), script)  # scripted, as ckpt_export does: no input-dependent trace
    return weights.getvalue(), script.getvalue()


def _bump(version: str) -> str:
    parts = version.split(".")
    if not parts[-1].isdigit():
        raise ValueError(f"bundle version {version!r} does not end in a number; cannot bump it")
    return ".".join(parts[:-1] + [str(int(parts[-1]) + 1)])


def _readme(meta: dict[str, Any], card: dict[str, Any], model: str, alias: str | None, promoted: bool) -> str:
    status = "" if promoted else (
        "\n**Not promoted:** this version holds no promoted alias (champion / production); it was packaged with "
        "`--unpromoted` (see the model card).\n"
    )
    return f"""# {meta.get('name', card['bundle'])} — {model} version {card['version']}

{meta.get('description', '')}

**Intended use:** {card['intended_use']}
{status}
**Operating point:** {card['operating_point']}. The threshold, network ({card['network']}), input size
({card['input_size']}), normalisation and class names ({card['class_names']}) are stored in `models/model.pt`;
nothing has to be given on the command line.

## Install (offline)

```
python3.11 -m venv venv
venv/bin/pip install --no-index --find-links wheels wheels/medgain-*.whl   # with the dependency wheels beside it
# or, with a package index: venv/bin/pip install wheels/medgain-*.whl -r requirements.txt
```

## Run: `medgain infer`, one command

```
venv/bin/medgain infer partner_bundle.zip --public-key signer.pub.pem --input FRAMES --output OUT
```

`medgain infer` is the check; it lives in the installed medgain, not in this package. Before it reads a single
input it checks the signature over `manifest.json` with the signer's public key, then that every file of the
zip is listed there with its size and sha256 (no extra, missing, duplicated or linked file, no `..` path). It
copies the files into a new private folder as it hashes them and runs `configs/inference.yaml` from that copy,
without putting the package on Python's import path. On any failure it exits non-zero naming the file and the
reason, and writes nothing. An unsigned package is refused unless `--allow-unsigned` is given: the hashes are then
checked, not who made them, and `OUT/UNSIGNED_PACKAGE.txt` says so.

It writes `OUT/predictions.csv` (file, frame, log-odds score, probability, decision at the operating point),
heat maps under `OUT/heatmaps/` and `OUT/errors.csv` for unreadable files. These name your files: they stay with
you. `--pseudonymise-outputs` adds `OUT/shareable/`, a copy keyed by salted pseudonyms that can be sent back;
the mapping to your files stays in `OUT/pseudonym_map.csv`.

## What `python -m monai.bundle run` on the unzipped folder does not do

This folder is a MONAI bundle and `python -m monai.bundle run --config_file configs/inference.yaml ...` runs it,
but that path checks nothing: `configs/inference.yaml` holds no verification step, and MONAI puts the current
folder and the bundle folder on Python's import path. Whoever can change the folder can change what runs (an
edited config, an extra `yaml.py` beside it). Use it only on a folder you verified and no one else can write to
(`medgain verify FOLDER --public-key KEY` refuses any file not in the manifest), and prefer `medgain infer`.

`models/model.ts` is the TorchScript network (logits of RGB frames in [0, 1] at the input size; a fused model
also takes the encoded metadata vector, as `models/model.pt`'s spec encodes it).

The model card is `docs/model_card.md`; the review report (figures with confidence intervals, operating points,
attention gallery) is `docs/review_report.html`{' (alias ' + alias + ')' if alias else ''}. `LICENSE` is medgain's
licence.
"""


def build_package(
    model: str,
    out: str | os.PathLike,
    tracking_uri: str | None = None,
    sign_key: str | os.PathLike | None = None,
    wheel: str | os.PathLike | None = None,
    include_wheel: bool = True,
    bundles_dir: str | os.PathLike | None = None,
    unpromoted: bool = False,
) -> dict[str, Any]:
    """Write the partner package of ``model`` (``NAME@ALIAS`` / ``NAME@VERSION``) to the zip ``out``.

    Args:
        model: the registered model and alias or version.
        out: zip file written.
        tracking_uri: MLflow tracking / registry URI (default ``MLFLOW_TRACKING_URI``).
        sign_key: Ed25519 private key (PEM) signing the manifest.
        wheel: a medgain wheel to include; default: one built from this source tree.
        include_wheel: False leaves the wheel out (``requirements.txt`` pins medgain).
        bundles_dir: folder holding the bundle folders.
        unpromoted: package a version that holds no promoted alias (:data:`PROMOTED_ALIASES`); recorded in the
            model card and the manifest.

    Returns:
        the manifest.

    Raises:
        ValueError: when the version has no review of its own model file or no finite operating threshold, holds
            no promoted alias without ``unpromoted`` (or one with it), or a key / bundle is unusable.
    """
    name, version, alias = parse_model_ref(model)
    client = registry_client(tracking_uri)
    mv = resolve_version(client, name, version, alias)
    held = sorted(a for a, v in client.get_registered_model(name).aliases.items()
                  if a in PROMOTED_ALIASES and str(v) == str(mv.version))
    if not held and not unpromoted:
        raise ValueError(
            f"{name} version {mv.version} holds no promoted alias ({' / '.join(PROMOTED_ALIASES)}): promote it "
            "first, or give --unpromoted to package it anyway (recorded in its model card)"
        )
    if held and unpromoted:
        raise ValueError(f"{name} version {mv.version} holds {held[0]!r}: it is promoted; drop --unpromoted")
    review = load_review(client, name, str(mv.version))
    bundle = bundle_folder(review["model_card"]["bundle"], bundles_dir)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights, script = _model_files(fetch_checkpoint(client, mv, tmp), name, str(mv.version))
        folder = REVIEW_ARTIFACTS.format(version=mv.version)
        files["docs/review_report.html"] = Path(client.download_artifacts(mv.run_id, f"{folder}/report.html", tmp)).read_bytes()
        if include_wheel:
            built = Path(wheel) if wheel is not None else _build_wheel(Path(tmp) / "wheel")
            if not built.is_file() or built.suffix != ".whl":
                raise ValueError(f"{built}: not a wheel file")
            files[f"wheels/{built.name}"] = built.read_bytes()
    requirements = _requirements()
    new_version = _bump(str(meta.get("version", "0.0.0")))
    card = review["model_card"]
    meta["version"] = new_version
    meta["changelog"] = {
        new_version: f"{name} version {mv.version}{' (' + alias + ')' if alias else ''}, reviewed {review['time']} on "
        f"data {review['data_hash']}; {card['operating_point']}",
        **meta.get("changelog", {}),
    }
    meta.setdefault("required_packages_version", {})["medgain"] = requirements["medgain"]
    files["configs/metadata.json"] = (json.dumps(meta, indent=4) + "\n").encode()
    header = (f"# Standalone inference of {name} version {mv.version}, packaged by medgain: runs the model of\n"
              "# models/model.pt on every frame of input_dir. It verifies nothing itself: run it with\n"
              "# `medgain infer PACKAGE --public-key KEY --input DIR --output OUT` (see docs/README.md).\n")
    files["configs/inference.yaml"] = (header + yaml.safe_dump(standalone_inference_config(bundle), sort_keys=False)).encode()
    for config in ("train.yaml", "evaluate.yaml", "logging.conf"):
        files[f"configs/{config}"] = (bundle / "configs" / config).read_bytes()
    files["models/model.pt"] = weights
    files["models/model.ts"] = script
    card_lines = [f"# Model card: {name} version {mv.version}", ""]
    card_lines += [f"- **{k}**: {v}" for k, v in card.items() if k != "training_params"]
    card_lines.append(f"- **promotion**: {', '.join(held)}" if held else
                      "- **promotion**: NOT PROMOTED: holds no champion / production alias; packaged with --unpromoted")
    card_lines += ["", "## Training parameters", ""] + [f"- {k}: {v}" for k, v in sorted(card.get("training_params", {}).items())]
    files["docs/model_card.md"] = ("\n".join(card_lines) + "\n").encode()
    files["docs/README.md"] = _readme(meta, card, name, alias, bool(held)).encode()
    files["LICENSE"] = _license()
    files["requirements.txt"] = "".join(f"{k}=={v}\n" for k, v in requirements.items()).encode()
    manifest: dict[str, Any] = {
        "format": PACKAGE_FORMAT,
        "model": name,
        "version": str(mv.version),
        "alias": alias,
        "promoted": bool(held),
        "bundle": bundle.name,
        "bundle_version": new_version,
        "review_sha256": mv.tags.get("review.sha256", ""),
        "medgain_version": requirements["medgain"],
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "dependencies": requirements,
        "files": {
            path: {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content)}
            for path, content in sorted(files.items())
        },
    }
    key = load_private_key(sign_key) if sign_key is not None else None
    if key is not None:
        manifest["signing_key"] = public_key_id(key.public_key())
    raw = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    files[MANIFEST] = raw
    if key is not None:
        files[SIGNATURE] = base64.b64encode(key.sign(raw)) + b"\n"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, content in sorted(files.items()):
            info = zipfile.ZipInfo(path, _ZIP_TIME)
            info.external_attr = 0o644 << 16
            archive.writestr(info, content, zipfile.ZIP_DEFLATED)
    os.replace(partial, out)
    return manifest
