"""The attention-guided cropping pipeline for dermoscopy: full-image model → attention boxes on the originals →
crop model → ensemble weighted on out-of-fold predictions.

Stages (each skipped when its output exists, so an interrupted pipeline resumes where it stopped):

1. ``full``: the dermoscopy bundle trains one fused model per cross-validation fold (out-of-fold predictions in
   ``full/outputs/oof/fold<k>.csv``) and predicts the test split with each fold model; with
   ``attention_source: chipnet`` the stage ``chipnet`` then trains ChipNet the same way (``architecture: chipnet``
   of the bundle, ``chipnet/``);
2. ``crops``: every image's attention map (``gradcam``: the full-image model's Grad-CAM of the positive class;
   ``chipnet``: ChipNet's softmax chip grid; for a cross-validation image from the fold model that did not train
   on it, for a test image the mean over the fold models) becomes a square box on
   the full-resolution original (:func:`medgain.crop.attention_box`), cut and resized to CropNet's input size
   (``crops/crops``, ``crops/crop_masks``, box table ``crops/boxes.csv``, overlays ``crops/overlays``) with the
   original CSV's rows (``crops/train.csv``);
3. ``cropnet``: the same bundle on the crops, with the same folds (``folds.csv``);
4. ``ensemble``: the full-image model, CropNet and (when trained) ChipNet, weights chosen on the out-of-fold
   predictions (never on the test split; objective: the mean
   per-fold AUC, or the pooled AUC), per-model and ensemble AUC with bootstrap intervals, out of fold and on the
   test split (``ensemble/summary.json``).

MLflow: one parent run per pipeline, a child run per stage and, under the training stages, the bundle's runs of
each fold (training and test evaluation) as their children; crops, overlays and box table are artifacts of the
``crops`` stage run, the figures metrics of the ``ensemble`` stage run and of the parent. Nothing logged names a
data file or a patient: the fold and box tables are logged with an image's salted pseudonym
(:func:`medgain.data.phi.frame_ref`, column ``ref``) in place of its path and the patient's
(:func:`medgain.data.phi.study_ref`) in place of the patient id, crops and overlays as ``<ref>.png``. The local
outputs keep the real names; ``<output_dir>/pseudonym_map.csv`` (``ref``, ``name``; never logged) maps each
pseudonym back.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus

from medgain.bundle_variables import bundle_variables, unknown_variables
from medgain.config_yaml import load_yaml_file
from medgain.crop import box_overlay, write_attention_crops
from medgain.data.phi import frame_ref, pseudonymise_text, study_ref
from medgain.data.dermoscopy_splits import TEST_FOLD, dermoscopy_cv_items
from medgain.ensemble import ensemble_scores, search_ensemble_weights
from medgain.metrics import bootstrap_auc, oof_auc_summary
from medgain.model_file import atomic_write, load_checkpoint
from medgain.pipeline.attention_maps import model_attention_maps
from medgain.tracking.store import prepare_store
from medgain.transforms.io import read_frame

__all__ = ["DEFAULT_CONFIG", "load_pipeline_config", "read_predictions", "run_attention_crop"]

logger = logging.getLogger(__name__)

#: the configuration keys and their defaults (``pipelines/attention_crop/config.yaml`` documents them).
DEFAULT_CONFIG: dict[str, Any] = {
    "dataset_dir": "data/dermoscopy",
    "csv_name": "train.csv",
    "images": "images",
    "masks": "masks",
    "output_dir": "runs/attention_crop",
    "bundle": "bundles/dermoscopy_gain",
    "experiment_name": "attention_crop",
    "seed": 0,
    "n_folds": 5,
    "test_fraction": 0.2,
    "attention_source": "gradcam",
    "common": {},
    "full": {},
    "chipnet": {"chip_size": 32},
    "crop": {"size": 224, "threshold": 0.5, "margin": 0.15, "min_size": 0, "num_overlays": 16},
    "cropnet": {},
    "ensemble": {"step": 0.05, "n_bootstrap": 2000, "objective": "fold_mean"},
}
ATTENTION_SOURCES = ("gradcam", "chipnet")
STAGES = ("full", "chipnet", "crops", "cropnet", "ensemble")
#: sections of pipeline settings whose keys are all in :data:`DEFAULT_CONFIG` (the others are bundle variables)
_CLOSED_SECTIONS = ("crop", "ensemble")
#: the local table of pseudonyms (``ref``, ``name``) under ``output_dir``; never logged
PSEUDONYM_MAP = "pseudonym_map.csv"


def load_pipeline_config(path: str | os.PathLike | None = None, **overrides: Any) -> dict[str, Any]:
    """The pipeline configuration: :data:`DEFAULT_CONFIG`, updated by the YAML file at ``path`` and then by
    ``overrides`` (None values ignored); nested sections are merged key by key.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: naming the file for a repeated key, unknown keys (also in ``crop`` and ``ensemble``), a
            non-mapping section or an unknown attention source.
    """
    config = json.loads(json.dumps(DEFAULT_CONFIG))
    source = "the defaults"
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if path is not None:
        source = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: pipeline config not found")
        loaded = load_yaml_file(path) or {}
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path}: the pipeline config must be a mapping of settings")
        layers.append((source, loaded))
    layers.append(("the command line", {k: v for k, v in overrides.items() if v is not None}))
    for where, layer in layers:
        unknown = sorted(set(layer) - set(DEFAULT_CONFIG))
        if unknown:
            raise ValueError(f"{where}: unknown pipeline setting(s) {unknown}; known: {sorted(DEFAULT_CONFIG)}")
        for key, value in layer.items():
            if isinstance(DEFAULT_CONFIG[key], dict):
                if not isinstance(value, Mapping):
                    raise ValueError(f"{where}: {key!r} must be a mapping, got {value!r}")
                unknown = sorted(set(value) - set(DEFAULT_CONFIG[key])) if key in _CLOSED_SECTIONS else []
                if unknown:
                    raise ValueError(
                        f"{where}: unknown {key!r} setting(s) {unknown}; known: {sorted(DEFAULT_CONFIG[key])}"
                    )
                config[key].update(value)
            else:
                config[key] = value
    if config["attention_source"] not in ATTENTION_SOURCES:
        raise ValueError(
            f"{source}: attention_source must be one of {list(ATTENTION_SOURCES)}, got {config['attention_source']!r}"
        )
    return config


def read_predictions(paths: Sequence[str | os.PathLike]) -> dict[str, tuple[float, int | None]]:
    """Scores of prediction CSVs (``PredictionCSVWriter``: file, frame, score[, label]) keyed by the file's stem.

    Raises:
        ValueError: naming the file for a missing column or an image listed twice.
    """
    scores: dict[str, tuple[float, int | None]] = {}
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("file", "score") if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
            for row_number, row in enumerate(reader, start=2):
                key = Path(row["file"]).stem
                if key in scores:
                    raise ValueError(f"{path}, row {row_number}: image {key} already has a prediction")
                label = row.get("label")
                scores[key] = (float(row["score"]), int(label) if label not in (None, "") else None)
    return scores


def _record_pseudonyms(output_dir: Path, names: Mapping[str, str]) -> None:
    """Add ``pseudonym → real name`` pairs to the local table :data:`PSEUDONYM_MAP` of ``output_dir`` (written
    atomically, sorted by pseudonym)."""
    table = output_dir / PSEUDONYM_MAP
    known: dict[str, str] = {}
    if table.is_file():
        with table.open(newline="") as f:
            known = {row["ref"]: row["name"] for row in csv.DictReader(f)}
    known.update(names)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["ref", "name"])
    writer.writerows(sorted(known.items()))
    atomic_write(table, lambda f: f.write(text.getvalue().encode()))


def _shareable_table(source: Path, target: Path) -> dict[str, str]:
    """Write the copy of a fold or box table (columns ``image``, ``patient``, ...) that is logged: ``image``
    becomes ``ref``, the image's :func:`~medgain.data.phi.frame_ref`; ``patient`` the patient's
    :func:`~medgain.data.phi.study_ref`; ``crop`` (a local path; the crops are logged as ``<ref>.png``) is left
    out; any other cell goes through :func:`~medgain.data.phi.pseudonymise_text`.

    Returns:
        pseudonym → real name, of every image and patient of the table.
    """
    names: dict[str, str] = {}
    with source.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c for c in reader.fieldnames or [] if c != "crop"]
        rows = []
        for row in reader:
            shared = {}
            for column in columns:
                value = row[column]
                if column == "image":
                    shared["ref"] = frame_ref(value)
                    names[shared["ref"]] = value
                elif column == "patient" and value:
                    shared[column] = study_ref(value)
                    names[shared[column]] = value
                else:
                    shared[column] = pseudonymise_text(value)
            rows.append(shared)
    with target.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["ref" if c == "image" else c for c in columns])
        writer.writeheader()
        writer.writerows(rows)
    return names


def _log_table(client: MlflowClient, run_id: str, table: Path, artifact_path: str | None, output_dir: Path) -> None:
    """Log the shareable copy of a fold or box table (:func:`_shareable_table`, same file name) to a run, and add
    its pseudonyms to the local :data:`PSEUDONYM_MAP`."""
    with tempfile.TemporaryDirectory() as tmp:
        shared = Path(tmp) / table.name
        _record_pseudonyms(output_dir, _shareable_table(table, shared))
        client.log_artifact(run_id, str(shared), artifact_path)


class _Tracker:
    """The pipeline's MLflow parent run and its stage runs, remembered in ``pipeline.json`` for resuming."""

    def __init__(self, tracking_uri: str, experiment_name: str, state_path: Path, run_name: str) -> None:
        prepare_store(tracking_uri)  # the "Default" experiment's artifacts beside the store too
        self.client = MlflowClient(tracking_uri)
        experiment = self.client.get_experiment_by_name(experiment_name)
        artifacts = (state_path.parent / "mlruns").resolve().as_uri()  # beside the store, not in the working folder
        self.experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(experiment_name, artifacts)
        )
        self.state_path = state_path
        self.state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.is_file() else {}
        if "parent_run_id" not in self.state:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags={"pipeline": "attention_crop"})
            self.state = {"parent_run_id": run.info.run_id, "stages": {}}
            self._save()
        else:
            self.client.update_run(self.parent, status=RunStatus.to_string(RunStatus.RUNNING))

    @property
    def parent(self) -> str:
        return str(self.state["parent_run_id"])

    def _save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(json.dumps(self.state, indent=2) + "\n")

    def stage(self, name: str) -> str:
        """The run id of a stage (created as a child of the parent on first use)."""
        if name not in self.state["stages"]:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"stage-{name}",
                tags={"mlflow.parentRunId": self.parent, "pipeline_stage": name},
            )
            self.state["stages"][name] = run.info.run_id
            self._save()
        return str(self.state["stages"][name])

    def finish(self, run_id: str, failed: bool = False) -> None:
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


def _bundle_run(bundle: Path, run_id: str, configs: Sequence[str], overrides: Mapping[str, Any]) -> None:
    from monai.bundle import run

    files = [str(bundle / "configs" / name) for name in configs]
    run(
        run_id,
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=files if len(files) > 1 else files[0],
        logging_file=str(bundle / "configs" / "logging.conf"),
        **overrides,
    )


def _fold_progress(folder: Path) -> tuple[bool, Path | None]:
    """Whether a fold's training finished (the final ``checkpoint_last.pt`` holds the trainer state and the best
    model exists; after a failure it holds the model and optimizer only), and the newest per-epoch checkpoint to
    resume an unfinished one from."""
    last = folder / "checkpoint_last.pt"
    finished = last.is_file() and (folder / "model.pt").is_file() and "trainer" in load_checkpoint(last)
    epochs = sorted(folder.glob("checkpoint_epoch=*.pt"), key=lambda p: int(p.stem.split("=")[-1]))
    return finished, (epochs[-1] if epochs else None)


def _train_stage(
    name: str,
    config: Mapping[str, Any],
    tracker: _Tracker,
    data: Mapping[str, Any],
    overrides: Mapping[str, Any],
) -> Path:
    """Train every fold of a stage and predict the test split (when there is one) with each fold model; returns
    the stage folder."""
    out = Path(config["output_dir"]) / name
    stage_run = tracker.stage(name)
    bundle = Path(config["bundle"])
    base = {
        "bundle_root": str(out),
        "tracking_uri": data["tracking_uri"],
        "experiment_name": config["experiment_name"],
        "parent_run_id": stage_run,
        "folds_source": data["folds_csv"],
        "n_folds": config["n_folds"],
        "seed": config["seed"],
        "csv_path": data["csv_path"],
        "image_dir": data["image_dir"],
        "mask_dir": data["mask_dir"],
        "dataset_dir": data["dataset_dir"],
        **config["common"],
        **overrides,
    }
    for fold in range(int(config["n_folds"])):
        oof = out / "outputs" / "oof" / f"fold{fold}.csv"
        if not oof.is_file():
            finished, resume = _fold_progress(out / "models" / f"fold{fold}")
            if finished:
                logger.info("%s fold %d: trained; writing its out-of-fold predictions", name, fold)
                _bundle_run(bundle, "predict_oof", ["train.yaml"], {**base, "fold": fold})
            else:
                logger.info("%s fold %d: training%s", name, fold, f" (resuming from {resume})" if resume else "")
                extra = {"resume_from": str(resume)} if resume is not None else {}
                _bundle_run(bundle, "training", ["train.yaml"], {**base, "fold": fold, **extra})
        evaluation = out / "outputs" / f"fold{fold}" / "evaluation" / "predictions.csv"
        if data["splits"]["test"] and not evaluation.is_file():
            _bundle_run(bundle, "evaluate", ["train.yaml", "evaluate.yaml"], {**base, "fold": fold})
    tracker.finish(stage_run)
    return out


def _crop_stage(config: Mapping[str, Any], tracker: _Tracker, data: Mapping[str, Any], attention_dir: Path) -> Path:
    """Attention maps of the fold models in ``attention_dir`` (a training stage's folder) → boxes → crops, crop
    masks, box table, the crops' CSV and overlays."""
    out = Path(config["output_dir"]) / "crops"
    table = out / "boxes.csv"
    if table.is_file():
        return out
    stage_run = tracker.stage("crops")
    settings = config["crop"]
    items = data["splits"]["cv"] + data["splits"]["test"]
    maps: list[np.ndarray | None] = [None] * len(items)
    test_sum: list[np.ndarray] | None = None
    n_folds = int(config["n_folds"])
    test_rows = [i for i, item in enumerate(items) if item["fold"] == TEST_FOLD]
    for fold in range(n_folds):
        checkpoint = attention_dir / "models" / f"fold{fold}" / "model.pt"
        rows = [i for i, item in enumerate(items) if item["fold"] == fold]
        fold_maps = model_attention_maps(checkpoint, [items[i] for i in rows + test_rows])
        for i, amap in zip(rows, fold_maps[: len(rows)]):
            maps[i] = amap
        normalised = [_normalise(m) for m in fold_maps[len(rows) :]]
        test_sum = normalised if test_sum is None else [a + b for a, b in zip(test_sum, normalised)]
    for i, amap in zip(test_rows, test_sum or []):
        maps[i] = amap / n_folds
    shutil.rmtree(out, ignore_errors=True)  # an interrupted earlier attempt
    crop_items, partial = write_attention_crops(
        items,
        [m for m in maps if m is not None],
        out,
        int(settings["size"]),
        threshold=float(settings["threshold"]),
        margin=float(settings["margin"]),
        min_size=int(settings["min_size"]),
        filename=".boxes.partial.csv",
    )
    shutil.copyfile(data["csv_path"], out / "train.csv")
    overlays = out / "overlays"
    overlays.mkdir()
    for item in crop_items[: int(settings["num_overlays"])]:
        image = read_frame(item["source_image"])
        box_overlay(image, item["box"]).save(overlays / f"{Path(item['source_image']).stem}.png")
    os.replace(partial, table)  # the box table appears last: the stage is complete when it exists
    client = tracker.client
    output_dir = Path(config["output_dir"])
    _log_table(client, stage_run, table, "crops", output_dir)
    with tempfile.TemporaryDirectory() as tmp:  # crops and overlays logged as <ref>.png (ref: the original's)
        for folder in ("crops", "overlays"):
            (Path(tmp) / folder).mkdir()
        for index, item in enumerate(crop_items):
            ref, stem = frame_ref(item["source_image"]), Path(item["source_image"]).stem
            shutil.copyfile(item["image"], Path(tmp) / "crops" / f"{ref}.png")
            if index < int(settings["num_overlays"]):
                shutil.copyfile(overlays / f"{stem}.png", Path(tmp) / "overlays" / f"{ref}.png")
        client.log_artifacts(stage_run, str(Path(tmp) / "overlays"), "crops/overlays")
        client.log_artifacts(stage_run, str(Path(tmp) / "crops"), "crops/crops")
    client.log_batch(stage_run, params=[Param(f"crop_{k}", pseudonymise_text(str(v))) for k, v in settings.items()])
    tracker.finish(stage_run)
    return out


def _finite_or_null(value: Any) -> Any:
    """``value`` with NaN / infinite floats (e.g. the AUC of a single-class fold) replaced by None, for JSON."""
    if isinstance(value, Mapping):
        return {str(k): _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _normalise(amap: np.ndarray) -> np.ndarray:
    lo, hi = float(amap.min()), float(amap.max())
    return (amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap)


def _auc_with_ci(scores: np.ndarray, labels: np.ndarray, groups: Sequence[str], n_bootstrap: int, seed: int) -> dict:
    auc, low, high = bootstrap_auc(scores, labels, groups, n_bootstrap=n_bootstrap, seed=seed)
    return {"auc": auc, "ci_low": low, "ci_high": high, "n": int(labels.size), "n_positive": int(labels.sum())}


def _ensemble_stage(
    config: Mapping[str, Any], tracker: _Tracker, data: Mapping[str, Any], model_dirs: Mapping[str, Path]
) -> dict[str, Any]:
    """Weights on the out-of-fold predictions (``ensemble.objective``); AUCs out of fold and on the test split."""
    out = Path(config["output_dir"]) / "ensemble"
    summary_path = out / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    stage_run = tracker.stage("ensemble")
    n_folds, seed = int(config["n_folds"]), int(config["seed"])
    n_bootstrap = int(config["ensemble"]["n_bootstrap"])
    cv, test = data["splits"]["cv"], data["splits"]["test"]
    cv_keys = [Path(item["image"]).stem for item in cv]
    labels = np.asarray([item["label"] for item in cv])
    folds = np.asarray([item["fold"] for item in cv])
    patients = [item["patient"] for item in cv]
    oof: dict[str, np.ndarray] = {}
    tests: dict[str, np.ndarray] = {}
    test_keys = [Path(item["image"]).stem for item in test]
    for name, folder in model_dirs.items():
        found = read_predictions([folder / "outputs" / "oof" / f"fold{k}.csv" for k in range(n_folds)])
        absent = [k for k in cv_keys if k not in found]
        if absent:
            raise ValueError(f"{folder}: no out-of-fold prediction for {len(absent)} images, e.g. {absent[0]}")
        oof[name] = np.asarray([found[k][0] for k in cv_keys])
        if test:
            per_fold = []
            for k in range(n_folds):
                path = folder / "outputs" / f"fold{k}" / "evaluation" / "predictions.csv"
                fold_scores = read_predictions([path])
                per_fold.append([fold_scores[key][0] for key in test_keys])
            tests[name] = np.mean(np.asarray(per_fold), axis=0)  # mean log-odds of the fold models
    objective = config["ensemble"]["objective"]
    if objective not in ("fold_mean", "pooled"):
        raise ValueError(f"ensemble.objective must be 'fold_mean' or 'pooled', got {objective!r}")
    chosen = search_ensemble_weights(
        oof, labels, step=float(config["ensemble"]["step"]), groups=folds if objective == "fold_mean" else None
    )
    oof["ensemble"] = ensemble_scores(oof, chosen.weights)
    summary: dict[str, Any] = {
        "weights": chosen.weights,
        "objective": objective,
        "oof": {name: oof_auc_summary(s, labels, folds, patients, n_bootstrap, seed=seed) for name, s in oof.items()},
    }
    if test:
        tests["ensemble"] = ensemble_scores(tests, chosen.weights)
        test_labels = np.asarray([item["label"] for item in test])
        test_patients = [item["patient"] for item in test]
        summary["test"] = {
            name: _auc_with_ci(s, test_labels, test_patients, n_bootstrap, seed) for name, s in tests.items()
        }
    out.mkdir(parents=True, exist_ok=True)
    summary = _finite_or_null(summary)  # as it reads back from the file
    summary_path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    metrics = {f"weight_{k}": v for k, v in chosen.weights.items()}
    for name, figures in summary["oof"].items():
        metrics |= {f"oof_auc_{name}": figures["pooled"], f"oof_auc_{name}_ci_low": figures["ci_low"]}
        metrics[f"oof_auc_{name}_ci_high"] = figures["ci_high"]
    for name, figures in summary.get("test", {}).items():
        metrics |= {f"test_auc_{name}": figures["auc"], f"test_auc_{name}_ci_low": figures["ci_low"]}
        metrics[f"test_auc_{name}_ci_high"] = figures["ci_high"]
    stamp = int(time.time() * 1000)
    figures = [Metric(k, float(v), stamp, 0) for k, v in metrics.items() if v is not None]  # None: a NaN AUC
    for run_id in (stage_run, tracker.parent):
        tracker.client.log_batch(run_id, metrics=figures)
    tracker.client.log_artifact(stage_run, str(summary_path), "ensemble")
    tracker.finish(stage_run)
    return summary


def run_attention_crop(config_path: str | os.PathLike | None = None, **overrides: Any) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; see the module docstring and ``pipelines/attention_crop/README.md``.

    Args:
        config_path: the pipeline YAML (see :func:`load_pipeline_config`).
        overrides: top-level settings replacing the file's (e.g. ``output_dir``, ``dataset_dir``, ``seed``).

    Returns:
        the ensemble summary (``ensemble/summary.json``) with ``tracking_uri`` and ``parent_run_id`` added.

    Raises:
        ValueError: naming the config file, for what :func:`load_pipeline_config` refuses and for a variable of
            ``common``, ``full``, ``chipnet`` or ``cropnet`` that the bundle's ``train.yaml`` and ``evaluate.yaml``
            do not define.
    """
    config = load_pipeline_config(config_path, **overrides)
    out = Path(config["output_dir"]).resolve()
    config["output_dir"] = str(out)
    config["bundle"] = str(Path(config["bundle"]).resolve())
    known = bundle_variables(config["bundle"], ["train.yaml", "evaluate.yaml"])
    for section in ("common", "full", "chipnet", "cropnet"):
        unknown = unknown_variables(config[section], known)
        if unknown:
            raise ValueError(
                f"{config_path if config_path is not None else 'the pipeline settings'}: {section!r} sets {unknown}, "
                f"which the bundle {Path(config['bundle']).name} does not define"
            )
    dataset = Path(config["dataset_dir"]).resolve()
    mask_dir = dataset / config["masks"] if config["masks"] else None
    data: dict[str, Any] = {
        "dataset_dir": str(dataset),
        "csv_path": str(dataset / config["csv_name"]),
        "image_dir": str(dataset / config["images"]),
        "mask_dir": str(mask_dir) if mask_dir is not None and mask_dir.is_dir() else None,
        "tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
        "folds_csv": str(out / "folds.csv"),
    }
    out.mkdir(parents=True, exist_ok=True)
    data["splits"] = dermoscopy_cv_items(
        data["csv_path"],
        data["image_dir"],
        out,
        mask_dir=data["mask_dir"],
        n_folds=int(config["n_folds"]),
        seed=int(config["seed"]),
        test_fraction=float(config["test_fraction"]),
    )
    tracker = _Tracker(
        data["tracking_uri"],
        config["experiment_name"],
        out / "pipeline.json",
        f"attention-crop-{config['attention_source']}-seed{config['seed']}",
    )
    try:
        _log_table(tracker.client, tracker.parent, Path(data["folds_csv"]), None, out)
        full = _train_stage("full", config, tracker, data, config["full"])
        members = {"full": full}
        attention = full
        if config["attention_source"] == "chipnet":
            chipnet_overrides = {"architecture": "chipnet", "registered_model_name": "dermoscopy_gain_chipnet"}
            attention = _train_stage("chipnet", config, tracker, data, {**chipnet_overrides, **config["chipnet"]})
        crops = _crop_stage(config, tracker, data, attention)
        crop_data = {
            **data,
            "csv_path": str(crops / "train.csv"),
            "image_dir": str(crops / "crops"),
            "mask_dir": str(crops / "crop_masks") if (crops / "crop_masks").is_dir() else None,
            "dataset_dir": str(crops),
        }
        cropnet_overrides = {"image_size": int(config["crop"]["size"]), "registered_model_name": "dermoscopy_gain_crop"}
        cropnet = _train_stage("cropnet", config, tracker, crop_data, {**cropnet_overrides, **config["cropnet"]})
        members["crop"] = cropnet
        if config["attention_source"] == "chipnet":
            members["chipnet"] = attention
        summary = _ensemble_stage(config, tracker, data, members)
    except BaseException:
        tracker.finish(tracker.parent, failed=True)
        raise
    tracker.finish(tracker.parent)
    return {**summary, "tracking_uri": data["tracking_uri"], "parent_run_id": tracker.parent}
