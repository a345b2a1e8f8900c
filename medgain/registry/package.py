"""``medgain package``: a registered, reviewed model version as a MONAI bundle zip that a hospital runs offline —
without MLflow, the training data or medgain's source tree.

Layout of the zip::

    configs/inference.yaml      standalone; verifies the package (initialize) before anything runs
    configs/train.yaml, configs/evaluate.yaml, configs/logging.conf, configs/metadata.json (version bumped)
    models/model.pt             weights, model spec, operating point (torch.load(weights_only=True))
    models/model.ts             TorchScript export of the network (logits of a [0, 1] RGB batch [, metadata])
    docs/README.md, docs/model_card.md, docs/review_report.html
    requirements.txt            pinned medgain and dependency versions
    wheels/medgain-*.whl        medgain itself (unless left out)
    manifest.json               sha256 of every file, versions; manifest.sig: Ed25519 signature (--sign-key)

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
from medgain.registry.verify import MANIFEST, SIGNATURE, load_private_key, public_key_id

__all__ = ["PACKAGE_FORMAT", "build_package", "parse_model_ref", "standalone_inference_config"]

PACKAGE_FORMAT = "medgain-partner-package/1"
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)  # fixed member times: the same inputs give the same zip


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``NAME@ALIAS`` or ``NAME@VERSION`` (digits) as ``(name, version, alias)``."""
    name, sep, which = ref.rpartition("@")
    if not sep or not name or not which:
        raise ValueError(f"--model must be NAME@ALIAS or NAME@VERSION (e.g. capsule_endoscopy_gain@champion), got {ref!r}")
    return (name, which, None) if which.isdigit() else (name, None, which)


def standalone_inference_config(bundle: Path) -> dict[str, Any]:
    """The bundle's ``inference.yaml`` made to run from the package: its model file is the package's
    ``models/model.pt``, it verifies the package first (refusing to run when a file differs, or when
    ``public_key`` is given and the signature does not verify), and ``run`` (the default id of
    ``python -m monai.bundle run``) does the inference."""
    config = yaml.safe_load((bundle / "configs" / "inference.yaml").read_text())
    for key in ("imports", "initialize", "inference", "checkpoint"):
        if key not in config or (key != "checkpoint" and not isinstance(config[key], list)):
            raise ValueError(f"{bundle}/configs/inference.yaml: needs '{key}' to be packaged")
    config["checkpoint"] = "$os.path.join(@bundle_root, 'models', 'model.pt')"
    config["imports"] = list(config["imports"]) + ["$import medgain.registry"]
    config["public_key"] = None
    config["verify"] = "$medgain.registry.verify_package(@bundle_root, public_key=@public_key)"
    config["initialize"] = ["@verify"] + list(config["initialize"])
    config["run"] = list(config["inference"])
    return config


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
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), str(source)],
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
    network = build_network(spec)
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
    generator = torch.Generator().manual_seed(0)
    example: tuple[torch.Tensor, ...] = (torch.rand(1, spec["in_channels"], *spec["image_size"], generator=generator),)
    if getattr(network, "num_metadata", 0):  # a fused model: forward(image, metadata)
        example += (torch.rand(1, network.num_metadata, generator=generator),)
    with torch.no_grad():
        traced = torch.jit.trace(network, example)
    script = io.BytesIO()
    torch.jit.save(traced, script)
    return weights.getvalue(), script.getvalue()


def _bump(version: str) -> str:
    parts = version.split(".")
    if not parts[-1].isdigit():
        raise ValueError(f"bundle version {version!r} does not end in a number; cannot bump it")
    return ".".join(parts[:-1] + [str(int(parts[-1]) + 1)])


def _readme(meta: dict[str, Any], card: dict[str, Any], model: str, alias: str | None) -> str:
    return f"""# {meta.get('name', card['bundle'])} — {model} version {card['version']}

{meta.get('description', '')}

**Intended use:** {card['intended_use']}

**Operating point:** {card['operating_point']}. The threshold, network ({card['network']}), input size
({card['input_size']}), normalisation and class names ({card['class_names']}) are stored in `models/model.pt`;
nothing has to be given on the command line.

## Install (offline)

```
python3.11 -m venv venv
venv/bin/pip install --no-index --find-links wheels wheels/medgain-*.whl   # with the dependency wheels beside it
# or, with a package index: venv/bin/pip install wheels/medgain-*.whl -r requirements.txt
```

## Verify, then run

```
venv/bin/medgain verify partner_bundle.zip --public-key signer.pub.pem
unzip partner_bundle.zip -d bundle && cd bundle
../venv/bin/python -m monai.bundle run --config_file configs/inference.yaml --meta_file configs/metadata.json \\
    --input_dir FRAMES --output_dir OUT --public_key ../signer.pub.pem
```

Inference checks every file of this folder against `manifest.json` (and the signature with `--public_key`) and
refuses to run when one differs. It writes `OUT/predictions.csv` (file, frame, log-odds score, probability,
decision at the operating point), heat maps under `OUT/heatmaps/` and `OUT/errors.csv` for unreadable files.
`models/model.ts` is the TorchScript network (logits of RGB frames in [0, 1] at the input size; a fused model
also takes the encoded metadata vector, as `models/model.pt`'s spec encodes it).

The model card is `docs/model_card.md`; the review report (figures with confidence intervals, operating points,
attention gallery) is `docs/review_report.html`{' (alias ' + alias + ')' if alias else ''}.
"""


def build_package(
    model: str,
    out: str | os.PathLike,
    tracking_uri: str | None = None,
    sign_key: str | os.PathLike | None = None,
    wheel: str | os.PathLike | None = None,
    include_wheel: bool = True,
    bundles_dir: str | os.PathLike | None = None,
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

    Returns:
        the manifest.

    Raises:
        ValueError: when the version has no review of its own model file or no finite operating threshold, or a
            key / bundle is unusable.
    """
    name, version, alias = parse_model_ref(model)
    client = registry_client(tracking_uri)
    mv = resolve_version(client, name, version, alias)
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
    header = (f"# Standalone inference of {name} version {mv.version}, packaged by medgain: verifies the package, then\n"
              "# runs the model of models/model.pt on every frame of input_dir (see docs/README.md).\n")
    files["configs/inference.yaml"] = (header + yaml.safe_dump(standalone_inference_config(bundle), sort_keys=False)).encode()
    for config in ("train.yaml", "evaluate.yaml", "logging.conf"):
        files[f"configs/{config}"] = (bundle / "configs" / config).read_bytes()
    files["models/model.pt"] = weights
    files["models/model.ts"] = script
    card_lines = [f"# Model card: {name} version {mv.version}", ""]
    card_lines += [f"- **{k}**: {v}" for k, v in card.items() if k != "training_params"]
    card_lines += ["", "## Training parameters", ""] + [f"- {k}: {v}" for k, v in sorted(card.get("training_params", {}).items())]
    files["docs/model_card.md"] = ("\n".join(card_lines) + "\n").encode()
    files["docs/README.md"] = _readme(meta, card, name, alias).encode()
    files["requirements.txt"] = "".join(f"{k}=={v}\n" for k, v in requirements.items()).encode()
    manifest: dict[str, Any] = {
        "format": PACKAGE_FORMAT,
        "model": name,
        "version": str(mv.version),
        "alias": alias,
        "bundle": bundle.name,
        "bundle_version": new_version,
        "review_sha256": mv.tags.get("review.sha256", ""),
        "medgain_version": requirements["medgain"],
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "dependencies": requirements,
        "files": {path: hashlib.sha256(content).hexdigest() for path, content in sorted(files.items())},
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
