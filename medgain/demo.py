"""End-to-end demo: synthetic capsule data → GAIN training → test evaluation, all through ``monai.bundle run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CAPSULE_BUNDLE", "bundle_run", "run_capsule_demo"]

#: the capsule-endoscopy bundle shipped in the repository
CAPSULE_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "capsule_endoscopy_gain"


def bundle_run(
    run_id: str,
    configs: Sequence[str],
    bundle: str | os.PathLike = CAPSULE_BUNDLE,
    bundle_root: str | os.PathLike | None = None,
    capture_output: bool = False,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike | None = None,
    **overrides: Any,
) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run <run_id>`` on a bundle in a subprocess (the users' entry point).

    Args:
        run_id: config id to run ("training", "evaluate", "inference").
        configs: config file names under ``<bundle>/configs``, merged in order (e.g. train.yaml, evaluate.yaml).
        bundle: bundle folder.
        bundle_root: value of the ``bundle_root`` variable (outputs, models); default: the bundle folder.
        capture_output: return stdout / stderr as text instead of printing them.
        check: raise when the run fails.
        env: environment variables added to this process's for the run (e.g. ``CUDA_VISIBLE_DEVICES``).
        log_path: append the run's stdout and stderr to this file instead of printing them.
        overrides: further config variables, passed as ``--name value``.

    Raises:
        FileNotFoundError: when the bundle folder has no ``configs/metadata.json``.
        subprocess.CalledProcessError: when ``check`` and the run fails.
    """
    bundle = Path(bundle)
    meta = bundle / "configs" / "metadata.json"
    if not meta.is_file():
        raise FileNotFoundError(f"not a MONAI bundle (no configs/metadata.json): {bundle}")
    files = [str(bundle / "configs" / name) for name in configs]
    command = [
        sys.executable, "-m", "monai.bundle", "run", run_id,
        "--bundle_root", str(bundle_root or bundle),
        "--meta_file", str(meta),
        "--config_file", files[0] if len(files) == 1 else json.dumps(files),
        "--logging_file", str(bundle / "configs" / "logging.conf"),
    ]
    for name, value in overrides.items():
        command += [f"--{name}", json.dumps(value) if isinstance(value, list | tuple) else str(value)]
    environment = {**os.environ, **env} if env else None
    if log_path is None:
        return subprocess.run(command, check=check, capture_output=capture_output, text=True, env=environment)
    with open(log_path, "a") as log:
        return subprocess.run(command, check=check, stdout=log, stderr=subprocess.STDOUT, text=True, env=environment)


#: bundle overrides that read, check and resize the training and validation frames once, into memory (a few MB at
#: the demo's sizes), instead of in every epoch; the random augmentation still runs every epoch
_CACHED = {"train#dataset#_target_": "CacheDataset", "validate#dataset#_target_": "CacheDataset"}


def run_capsule_demo(
    out: str | os.PathLike,
    n_frames: int = 900,
    frame_size: int = 96,
    image_size: int = 64,
    max_epochs: int = 14,
    network: str = "small_cnn",
    seed: int = 0,
) -> dict[str, Any]:
    """Generate a synthetic capsule data set under ``out``, train with GAIN and evaluate on the test split.

    The defaults take about 220 CPU-seconds on one thread (docs/benchmarks.md, "Demos") and still find the lesions
    (test AUC 0.99, attention IoU 0.36); ``small_cnn``: the bundle's MobileNetV2 default needs a GPU or far more
    epochs to learn from scratch. Each step says what it does; data generation prints a line every 10 %.

    Returns:
        the test metrics (``out/run/outputs/evaluation/metrics.json``), the notes on figures the test split cannot
        resolve, the model file's ``operating_point`` (with its ``statement`` in words), ``tracking_uri`` and the
        paths.
    """
    from medgain.model_file import load_operating_point
    from medgain.synth.capsule import make_capsule_dataset
    from medgain.synth.progress import print_progress

    out = Path(out).resolve()
    print(f"[1/3] {n_frames} synthetic capsule frames ({frame_size}²) -> {out / 'data'}", flush=True)
    datalist = make_capsule_dataset(
        out / "data", n_frames, seed=seed, size=frame_size, prevalence=0.3,
        progress=print_progress("synthetic capsule frames", stream=sys.stdout),
    )
    root = out / "run"
    common = {"dataset_dir": datalist.parent, "seed": seed, "num_workers": 0}
    train = {"image_size": image_size, "network": network, "max_epochs": max_epochs, **_CACHED}
    print(f"[2/3] GAIN training: {network} at {image_size}², {max_epochs} epochs -> {root}", flush=True)
    bundle_run("training", ["train.yaml"], bundle_root=root, **common, **train)
    print("[3/3] evaluation of the best checkpoint on the test split", flush=True)
    bundle_run("evaluate", ["train.yaml", "evaluate.yaml"], bundle_root=root, **common)
    evaluation = root / "outputs" / "evaluation"
    notes_file = evaluation / "metrics_notes.json"
    return {
        "metrics": json.loads((evaluation / "metrics.json").read_text()),
        "notes": json.loads(notes_file.read_text()) if notes_file.is_file() else {},
        "operating_point": load_operating_point(root / "models" / "model.pt"),
        "tracking_uri": f"sqlite:///{root / 'outputs' / 'mlflow.db'}",
        "checkpoint": str(root / "models" / "model.pt"),
        "evaluation": str(evaluation),
    }
