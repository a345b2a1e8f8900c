"""``medgain review``: evaluate one registered model version on a data split through its bundle's own
evaluate config, and write the reviewer's report (HTML, self-contained) and figures (``review.json``), logged on
the version's run and linked from the version.

A version is reviewable when its run holds ``checkpoint/model.pt`` (written by
:class:`medgain.handlers.BestModelSaver`) and its ``bundle`` tag names a bundle folder whose
``configs/{train,evaluate}.yaml`` define ``validate#evaluator`` (a Grad-CAM evaluator), ``checkpoint``,
``split``, ``tracking_uri`` and the data values of its layout (:mod:`medgain.registry.layouts`: a datalist JSON,
a whole-slide data set folder, a dermoscopy CSV); the capsule bundle is the template.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from medgain.data.phi import pseudonymise_text
from medgain.metrics import fpr_budget_note, operating_point_words, score_to_probability
from medgain.metrics.confidence import format_percent_upper
from medgain.model_file import load_checkpoint
from medgain.registry.figures import (
    RecordArrays,
    bootstrap_figures,
    calibration,
    compare_figures,
    confusion,
    operating_table,
    subgroup_figures,
)
from medgain.registry.layouts import DataLayout, data_layout
from medgain.registry.records import FrameRecordWriter
from medgain.registry.report import render_report

__all__ = [
    "FOV_WARNING",
    "REVIEW_ARTIFACTS",
    "attention_fov_summary",
    "compare_versions",
    "bundle_folder",
    "evaluate_checkpoint",
    "fetch_checkpoint",
    "model_card",
    "registry_client",
    "resolve_version",
    "review_model",
    "sha256_file",
]

#: artifact folder of a version's review on its run (``review/v<version>/report.html``, ``review.json``)
REVIEW_ARTIFACTS = "review/v{version}"
#: mean fraction of the attention mass outside the field of view above which the report warns
FOV_WARNING = 0.2
_REPO_BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


def registry_client(tracking_uri: str | None = None) -> MlflowClient:
    """An MLflow client on ``tracking_uri``, else on ``MLFLOW_TRACKING_URI``.

    Raises:
        ValueError: when neither is given.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("no tracking server: give --tracking-uri or set MLFLOW_TRACKING_URI")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def resolve_version(client: MlflowClient, name: str, version: str | None = None, alias: str | None = None) -> ModelVersion:
    """The model version ``name`` ``version`` (or the one holding ``alias``), with errors naming what is missing."""
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        what = f"alias {alias!r}" if alias is not None else f"version {version}"
        raise ValueError(f"registered model {name!r} has no {what} ({err.message})") from err


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_folder(name: str, bundles_dir: str | os.PathLike | None = None) -> Path:
    """The folder of bundle ``name``: under ``bundles_dir``, ``MEDGAIN_BUNDLES`` or the repository's bundles/.

    Raises:
        FileNotFoundError: when it has no ``configs/metadata.json``.
    """
    root = Path(bundles_dir or os.environ.get("MEDGAIN_BUNDLES") or _REPO_BUNDLES)
    folder = root / name
    if not (folder / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"{folder}: bundle {name!r} not found (no configs/metadata.json); give --bundles-dir")
    return folder


def fetch_checkpoint(client: MlflowClient, version: ModelVersion, dest: str | os.PathLike) -> Path:
    """Download the version's model file (``checkpoint/model.pt`` of its run) into ``dest``."""
    try:
        path = client.download_artifacts(version.run_id, "checkpoint/model.pt", str(dest))
    except (MlflowException, OSError) as err:
        raise ValueError(
            f"{version.name} version {version.version}: its run {version.run_id} holds no checkpoint/model.pt ({err})"
        ) from err
    return Path(path)


def evaluate_checkpoint(
    bundle: Path,
    checkpoint: Path,
    layout: DataLayout,
    split: str,
    tracking_uri: str,
    out_dir: Path,
    gallery_size: int = 8,
    evaluator_id: str = "validate#evaluator",
    overrides: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run the bundle's evaluate config on ``checkpoint`` (in this process, tracked on ``tracking_uri``) with a
    :class:`~medgain.registry.records.FrameRecordWriter` on its evaluator (with the config's ``attention_fov``,
    the field of view, when it defines one); returns the per-frame records.

    Args:
        layout: the data, given to the workflow as its layout's config values.
    """
    from monai.bundle import create_workflow

    configs = [str(bundle / "configs" / name) for name in ("train.yaml", "evaluate.yaml")]
    workflow = create_workflow(
        config_file=configs,
        meta_file=str(bundle / "configs" / "metadata.json"),
        run_id="evaluate",
        bundle_root=str(out_dir / "root"),
        checkpoint=str(checkpoint),
        split=split,
        tracking_uri=tracking_uri,
        num_workers=0,
        **{**layout.workflow_args(), **dict(overrides or {})},
    )
    layout.configure(workflow.parser)
    fov = workflow.parser.get_parsed_content("attention_fov") if workflow.parser.get("attention_fov") else None
    writer = FrameRecordWriter(str(out_dir), str(checkpoint), gallery_size, fov=fov)
    writer.attach(workflow.parser.get_parsed_content(evaluator_id))
    workflow.run()
    workflow.finalize()
    with open(out_dir / "records.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("iou", "attention_in_mask", "attention_outside_fov"):
            row[key] = float(row[key]) if row[key] else None
        row["peak_outside_fov"] = bool(int(row["peak_outside_fov"])) if row["peak_outside_fov"] else None
    return rows


def model_card(
    client: MlflowClient, version: ModelVersion, checkpoint: Mapping[str, Any], bundle: Path, layout: DataLayout
) -> dict[str, Any]:
    """What the version is: bundle, network, input, operating point, training data and parameters, commit."""
    run = client.get_run(version.run_id)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    spec, point = checkpoint.get("model_spec", {}), checkpoint.get("operating_point", {})
    trained_on = version.tags.get("data_hash") or run.data.tags.get("data_hash", "unknown")
    params = {k: v for k, v in run.data.params.items() if k not in layout.local_params}
    card: dict[str, Any] = {
        "model": version.name,
        "version": str(version.version),
        "bundle": bundle.name,
        "task": meta.get("task", ""),
        "intended_use": meta.get("intended_use", ""),
        "network": spec.get("network"),
        "input_size": "x".join(map(str, spec.get("image_size", []))),
        "normalization": spec.get("normalization"),
        "class_names": spec.get("class_names"),
        "grad_cam_layer": spec.get("target_layer"),
        "operating_point": "none: " + str(point.get("reason")) if point.get("threshold") is None else
        f"ill when log-odds >= {point['threshold']:.6g} (p >= {point.get('probability', float('nan')):.6g}), "
        f"chosen on validation for FPR <= {point.get('max_fpr')}; {operating_point_words(point)}",
        "operating_point_fpr_upper": point.get("fpr_upper"),
        "best_epoch": checkpoint.get("epoch"),
        "training_run": f"{run.info.run_name} ({version.run_id})",
        "training_data_hash": trained_on,
        "medgain_commit": run.data.tags.get("medgain_commit", "unknown"),
    }
    if layout.identity() == trained_on:
        card.update(layout.training_summary(params))
    else:
        card["training_data"] = "the reviewed data is not the training data (hash differs): counts unknown"
    card["training_params"] = params
    return card


def _disagreements(cand: RecordArrays, champ: RecordArrays, thresholds: tuple[float, float],
                   limit: int = 50) -> tuple[int, list[dict[str, Any]]]:
    champ = champ.reordered(cand.refs)
    da = [int(s >= thresholds[0]) for s in cand.score]
    db = [int(s >= thresholds[1]) for s in champ.score]
    rows = []
    for i, (a, b) in enumerate(zip(da, db)):
        if a != b:
            pa, pb = float(score_to_probability(cand.score[i])), float(score_to_probability(champ.score[i]))
            rows.append({"ref": cand.refs[i], "label": int(cand.label[i]), "candidate_probability": pa,
                         "candidate_decision": a, "champion_probability": pb, "champion_decision": b})
    rows.sort(key=lambda r: -abs(r["candidate_probability"] - r["champion_probability"]))
    return len(rows), rows[:limit]


def compare_versions(
    candidate: RecordArrays,
    champion: RecordArrays,
    thresholds: tuple[float | None, float | None],
    names: tuple[str, str],
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The paired comparison of two models on the same frames.

    Figures at an operating point (sensitivity, specificity) and the list of frames where the two decide
    differently are given only when BOTH models have an operating point: a model without one takes no decisions,
    and the comparison is then of scores only (AUC, sensitivity at fixed false-alarm budgets, attention), said in
    ``note``.

    Args:
        thresholds: the log-odds thresholds of the candidate and the champion (None: no operating point).
        names: how the candidate and the champion are called in the note.

    Returns:
        ``{"figures", "decisions", "note", "n_disagreements", "disagreements"}`` (the last two None without
        decisions).
    """
    figures = compare_figures(candidate, champion, thresholds, n_bootstrap, seed=seed)
    if thresholds[0] is not None and thresholds[1] is not None:
        n_dis, shown = _disagreements(candidate, champion, (thresholds[0], thresholds[1]))
        return {"figures": figures, "decisions": True, "note": "", "n_disagreements": n_dis, "disagreements": shown}
    without = [name for name, t in zip(names, thresholds) if t is None]
    note = (f"{' and '.join(without)} {'has' if len(without) == 1 else 'have'} no operating point and so "
            "take{} no decisions: only scores are compared (AUC, sensitivity at fixed false-alarm budgets and "
            "attention, paired on the same frames); there is no list of disagreeing decisions.")
    note = note.format("s" if len(without) == 1 else "")
    note = note[:1].upper() + note[1:]
    return {"figures": figures, "decisions": False, "note": note, "n_disagreements": None, "disagreements": None}


def attention_fov_summary(rows: list[dict[str, Any]], limit: int = 50) -> dict[str, Any] | None:
    """How much attention falls outside the field of view on a split, from the per-frame records.

    Args:
        rows: records with ``attention_outside_fov`` and ``peak_outside_fov`` (None without a field of view).
        limit: most frames listed.

    Returns:
        ``{"mean_outside", "n_frames", "n_peak_outside", "peak_outside": [{"ref", "label", "probability",
        "outside"}], "high", "warning_level"}``, the frames with the largest fraction first; ``high`` when the mean
        exceeds :data:`FOV_WARNING`. None when the records carry no field of view.
    """
    values = [float(r["attention_outside_fov"]) for r in rows if r.get("attention_outside_fov") is not None]
    if not values:
        return None
    flagged = sorted((r for r in rows if r.get("peak_outside_fov")), key=lambda r: -float(r["attention_outside_fov"]))
    mean = sum(values) / len(values)
    return {
        "mean_outside": mean,
        "n_frames": len(values),
        "n_peak_outside": len(flagged),
        "peak_outside": [{"ref": r["ref"], "label": int(r["label"]), "outside": float(r["attention_outside_fov"]),
                          "probability": float(score_to_probability(float(r["score"])))} for r in flagged[:limit]],
        "high": mean > FOV_WARNING,
        "warning_level": FOV_WARNING,
    }


def _bound_check(point: Mapping[str, Any], figures: Mapping[str, Any], split: str) -> tuple[dict[str, float], str]:
    """The gate values of the stored point's false-alarm bound, and a note when ``split``'s rate exceeds it.

    ``operating_point_fpr_upper`` is the bound (NaN when the model file predates it, so that a gate rule on it
    fails); ``<split>_fpr_above_bound`` is 1.0 when the false-alarm rate measured on ``split`` at the stored
    threshold exceeds the bound, 0.0 when not, NaN when either is unknown.
    """
    upper = point.get("fpr_upper")
    upper = math.nan if upper is None or point.get("threshold") is None else float(upper)
    specificity = figures.get("specificity", {}).get("value", math.nan)
    fpr = 1.0 - float(specificity) if specificity is not None else math.nan
    above = math.nan if math.isnan(upper) or math.isnan(fpr) else float(fpr > upper)
    note = ""
    if above == 1.0:
        note = (f"the {split} false-alarm rate at the stored threshold ({100.0 * fpr:.1f} %) is above the bound the "
                f"operating point was stored with (≤ {format_percent_upper(upper)}): it does not hold on this data")
    return {"operating_point_fpr_upper": upper, f"{split}_fpr_above_bound": above}, note


def _threshold(checkpoint: Mapping[str, Any]) -> float | None:
    value = checkpoint.get("operating_point", {}).get("threshold")
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _log_review(client: MlflowClient, version: ModelVersion, out_dir: Path, review: Mapping[str, Any]) -> str:
    folder = REVIEW_ARTIFACTS.format(version=version.version)
    client.log_artifact(version.run_id, str(out_dir / "report.html"), folder)
    client.log_artifact(version.run_id, str(out_dir / "review.json"), folder)
    link = f"runs:/{version.run_id}/{folder}/report.html"
    experiment = client.get_run(version.run_id).info.experiment_id
    page = f"#/experiments/{experiment}/runs/{version.run_id}/artifacts/{folder}/report.html"
    tags = {
        "review.report": link,
        "review.page": page,
        "review.sha256": sha256_file(out_dir / "review.json"),
        "review.split": review["split"],
        "review.data_hash": review["data_hash"],
        "review.time": review["time"],
        "review.against": "" if not review.get("comparison") else str(review["comparison"]["version"]),
    }
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)
    lines = [line for line in (version.description or "").splitlines() if not line.startswith("Review: ")]
    what = pseudonymise_text(f"{review['split']} split of data {review['data_hash']}, {review['time']}")
    # a markdown link relative to the MLflow UI: it opens the report's artifact page from the version's page
    review_line = f"Review: [report]({page}) ({what}; {link})"
    description = "\n".join(([pseudonymise_text("\n".join(lines))] if lines else []) + [review_line])
    client.update_model_version(version.name, version.version, description=description)
    return link


def review_model(
    name: str,
    version: str,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: str = "test",
    against: str | None = None,
    tracking_uri: str | None = None,
    n_bootstrap: int = 1000,
    gallery_size: int = 8,
    bundles_dir: str | os.PathLike | None = None,
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Review model ``name`` ``version`` on ``split`` of ``data``; writes ``out_dir/report.html`` and
    ``out_dir/review.json``, logs them on the version's run (``review/v<version>/``), tags the version
    (``review.*``) and links the report from its description.

    Args:
        name: registered model name.
        version: its version number.
        data: the data in its bundle's layout (:func:`~medgain.registry.layouts.data_layout`): a MONAI datalist
            JSON (paths relative to its folder), a whole-slide data set folder (``medgain wsi patches``) or a
            dermoscopy CSV / its folder (the split follows the version's training run, see
            :meth:`~medgain.registry.layouts.DataLayout.follow`).
        out_dir: output folder (the report, figures and per-model evaluation folders).
        split: data split evaluated.
        against: alias of the model compared with (e.g. ``champion``), evaluated on the same frames.
        tracking_uri: MLflow tracking / registry URI (default ``MLFLOW_TRACKING_URI``).
        n_bootstrap: bootstrap resamples of the confidence intervals.
        gallery_size: frames per gallery category.
        bundles_dir: folder holding the bundle folders (default: the repository's ``bundles/``).
        seed: bootstrap seed.
        overrides: further bundle config values for the evaluation (e.g. ``{"batch_size": 8}``).

    Returns:
        the review dict written to ``review.json``.
    """
    client = registry_client(tracking_uri)
    uri = client.tracking_uri
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    layout = data_layout(data)
    target = resolve_version(client, name, version)
    bundle_name = target.tags.get("bundle") or client.get_run(target.run_id).data.tags.get("bundle")
    if not bundle_name:
        raise ValueError(f"{name} version {version}: no 'bundle' tag on the version or its run; cannot evaluate it")
    bundle = bundle_folder(bundle_name, bundles_dir)
    layout.follow(client.get_run(target.run_id).data.params)
    evaluated: dict[str, tuple[ModelVersion, dict[str, Any], RecordArrays, Path]] = {}
    fields: dict[str, list[Any]] = {}
    champion = None
    if against is not None:
        try:
            champion = resolve_version(client, name, alias=against)
        except ValueError:
            champion = None
    notes = {}
    if against is not None and champion is None:
        notes["comparison"] = f"no version of {name} holds alias {against!r} yet: nothing to compare with"
    if champion is not None and str(champion.version) == str(target.version):
        notes["comparison"] = f"version {version} already holds alias {against!r}: nothing to compare with"
        champion = None
    for role, mv in [("candidate", target)] + ([("champion", champion)] if champion is not None else []):
        folder = out / role
        with tempfile.TemporaryDirectory() as tmp:
            path = fetch_checkpoint(client, mv, tmp)
            local = folder / "model.pt"
            folder.mkdir(parents=True, exist_ok=True)
            local.write_bytes(path.read_bytes())
        rows = evaluate_checkpoint(bundle, local, layout, split, uri, folder, gallery_size, overrides=overrides)
        if role == "candidate":
            fov_summary = attention_fov_summary(rows)
        fields = layout.join(rows, split)
        evaluated[role] = (mv, load_checkpoint(local), RecordArrays(rows), local)
    _, checkpoint, records, local = evaluated["candidate"]
    threshold = _threshold(checkpoint)
    frames_per_study = None
    if records.groups is not None:
        negatives = (records.label == 0).sum()
        frames_per_study = float(negatives / len(set(records.groups)))
    figures = bootstrap_figures(records, threshold, n_bootstrap, seed=seed)
    n_neg = int((records.label == 0).sum())
    for budget in (0.0005, 0.001):
        note = fpr_budget_note(n_neg, budget)
        if note:
            notes[f"{split}_tpr_at_fpr_{budget:g}"] = note
    point = checkpoint.get("operating_point", {})
    bound_values, bound_note = _bound_check(point, figures, split)
    if bound_note:
        notes[f"{split}_fpr_above_bound"] = bound_note
    review: dict[str, Any] = {
        "model": name,
        "version": str(target.version),
        "run_id": target.run_id,
        "checkpoint_sha256": sha256_file(local),
        "split": split,
        "data_hash": layout.identity(),
        "unit": layout.unit,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model_card": model_card(client, target, checkpoint, bundle, layout),
        "figures": figures,
        "gate_values": {**{f"{split}_{k}": v["value"] for k, v in figures.items()}, **bound_values},
        "resampled_by": layout.unit if records.groups is not None else "frame",
        "n_bootstrap": n_bootstrap,
        "counts": {"frames": int(records.label.size), "positives": int(records.label.sum())},
        "notes": notes,
        "stored_operating_point": {
            "statement": operating_point_words(point),
            "fpr_upper": bound_values["operating_point_fpr_upper"],
            "max_fpr": point.get("max_fpr"),
            "backed": bool(bound_values["operating_point_fpr_upper"] <= float(point.get("max_fpr") or 0.0)),
        },
        "operating_points": operating_table(records, threshold, frames_per_study),
        "calibration": calibration(records),
        "confusion": confusion(records, threshold),
        "subgroups": subgroup_figures(records, fields, threshold),
        "gallery": json.loads((out / "candidate" / "gallery.json").read_text()),
        "attention_fov": fov_summary,
        "curves": {f"version {target.version}": {"score": records.score.tolist(), "label": records.label.tolist()}},
        "curve_points": {},
        "comparison": None,
    }
    if threshold is not None:
        review["curve_points"][f"version {target.version}"] = [1.0 - figures["specificity"]["value"],
                                                               figures["sensitivity"]["value"]]
    review["gallery"]["counts"] = confusion(records, review["gallery"]["threshold"])  # the matrix's own counts
    if fov_summary is not None:
        review["gate_values"][f"{split}_attention_outside_fov"] = fov_summary["mean_outside"]
    if champion is not None:
        _, champ_ckpt, champ_records, _ = evaluated["champion"]
        names = (f"the candidate (version {target.version})", f"{against} (version {champion.version})")
        review["comparison"] = {
            "alias": against,
            "version": str(champion.version),
            "checkpoint_sha256": sha256_file(evaluated["champion"][3]),
            **compare_versions(records, champ_records, (threshold, _threshold(champ_ckpt)), names, n_bootstrap, seed),
        }
        review["curves"][f"{against} (version {champion.version})"] = {
            "score": champ_records.reordered(records.refs).score.tolist(), "label": records.label.tolist()}
    (out / "review.json").write_text(json.dumps(review, indent=1, allow_nan=True) + "\n")
    (out / "report.html").write_text(render_report(review, out))
    review["report_link"] = _log_review(client, target, out, review)
    return review
