"""The study report: per configuration the mean and a 95 % bootstrap CI of each metric over seeds and test
samples, paired differences against the reference configuration, plots, as Markdown + CSV.

The CI resamples at two levels, as the spread comes from both: runs (seed × data seed) with replacement, then
each drawn run's test samples with replacement. Metrics that need per-sample values (AUC, sensitivity at the
locked operating point, TPR at a false-alarm rate) use the run's ``predictions.csv``; attention metrics exist per
run only (``metrics.json``), so their CI is over runs. Differences are paired: the same runs (seed, data seed)
and the same test samples are drawn for both configurations.

A study with ``data_variants`` trains every method on each data variant; the report adds each method's penalty
(a variant minus the first, e.g. confounded minus clean), paired by run and test sample. With ``marker_probe`` it
adds the marker-reliance probe (:mod:`medgain.study.probe`) per test frame, so its figures resample like AUC.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medgain.data import expand_frames, load_datalist
from medgain.metrics import min_negatives, weighted_auc
from medgain.model_file import load_checkpoint
from medgain.study.probe import run_marker_probe, run_twin_probe
from medgain.study.runner import RESULT_FILE
from medgain.study.spec import VARIANT_SEPARATOR, RunKey, StudySpec

__all__ = [
    "MetricDef",
    "RunData",
    "bootstrap_gap_closed",
    "bootstrap_mean",
    "bootstrap_paired_difference",
    "load_runs",
    "probe_metrics",
    "metric_value",
    "study_metrics",
    "write_report",
]


@dataclass
class RunData:
    """One finished run: its test predictions and its metrics file.

    Args:
        key: the run.
        ids: (N,) sample ids (``file#frame``, the file relative to the data set), in the order of the arrays.
        scores: (N,) float64 ranking scores (log-odds).
        labels: (N,) 0/1 ground truth as floats.
        decisions: (N,) 0/1 decisions at the stored operating point; NaN where the model has none.
        metrics: the evaluation's ``metrics.json``.
        epoch: the epoch of the shipped model file (None when it does not say).
        probe: the marker-reliance probe per sample, in the order of ``ids`` (``delta``: marked minus clean
            log-odds; ``alarm_clean`` / ``alarm_marked``: 0/1 decisions at the shipped threshold, NaN without one;
            ``marker_attention``), or None.
    """

    key: RunKey
    ids: list[str]
    scores: np.ndarray
    labels: np.ndarray
    decisions: np.ndarray
    metrics: dict[str, float]
    epoch: int | None = None
    probe: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        values, self.inverse = np.unique(self.scores, return_inverse=True)
        self.n_values = values.size

    @property
    def n_negatives(self) -> int:
        """Negative test samples."""
        return int((self.labels == 0).sum())


@dataclass(frozen=True)
class MetricDef:
    """A study metric: ``value(run, weights)`` with ``weights`` the (N,) bootstrap counts of the run's samples.

    Args:
        name: column name.
        value: the metric of a run under sample weights (NaN when undefined).
        per_sample: whether the samples are resampled (False: a per-run figure, CI over runs only).
        max_fpr: for TPR at FPR, the budget (the metric is reported only with enough negatives).
    """

    name: str
    value: Callable[[RunData, np.ndarray], float]
    per_sample: bool = True
    max_fpr: float | None = None


def _auc(run: RunData, w: np.ndarray) -> float:
    return weighted_auc(run.inverse, run.labels, w, run.n_values)


def _sensitivity(run: RunData, w: np.ndarray) -> float:
    positives = (w * run.labels).sum()
    if positives == 0 or np.isnan(run.decisions).any():
        return math.nan
    return float((w * run.labels * run.decisions).sum() / positives)


def _tpr_at(max_fpr: float) -> Callable[[RunData, np.ndarray], float]:
    def value(run: RunData, w: np.ndarray) -> float:
        pos = np.bincount(run.inverse, weights=w * run.labels, minlength=run.n_values)[::-1]
        neg = np.bincount(run.inverse, weights=w * (1.0 - run.labels), minlength=run.n_values)[::-1]
        if pos.sum() == 0 or neg.sum() == 0:
            return math.nan
        tpr = np.concatenate([[0.0], np.cumsum(pos) / pos.sum()])  # thresholds from +inf down, ties together
        fpr = np.concatenate([[0.0], np.cumsum(neg) / neg.sum()])
        return float(tpr[fpr <= max_fpr + 1e-12].max())

    return value


def _run_metric(name: str) -> Callable[[RunData, np.ndarray], float]:
    def value(run: RunData, w: np.ndarray) -> float:
        return float(run.metrics.get(name, math.nan))

    return value


def _probe_mean(key: str, label: int | None) -> Callable[[RunData, np.ndarray], float]:
    """Weighted mean of a probe column over the samples of a class (None: every sample)."""

    def value(run: RunData, w: np.ndarray) -> float:
        if run.probe is None:
            return math.nan
        weights = w if label is None else w * (run.labels == label)
        column = run.probe[key]
        if weights.sum() == 0 or np.isnan(column[weights > 0]).any():
            return math.nan
        return float((weights * column).sum() / weights.sum())

    return value


def probe_metrics() -> list[MetricDef]:
    """The marker-reliance probe's figures, per test sample: the mean change of the log-odds of being ill when the
    marker is burnt into clean frames (normal frames, lesion frames), the false-alarm rate on normal frames at the
    shipped threshold without and with the marker, and the marked frames' share of attention on the marker."""
    return [
        MetricDef("dlogodds_normal", _probe_mean("delta", 0)),
        MetricDef("dlogodds_lesion", _probe_mean("delta", 1)),
        MetricDef("false_alarms_clean", _probe_mean("alarm_clean", 0)),
        MetricDef("false_alarms_marked", _probe_mean("alarm_marked", 0)),
        MetricDef("marker_attention", _probe_mean("marker_attention", None)),
    ]


def study_metrics(split: str = "test", run_metrics: Sequence[str] = (), marker_probe: bool = False) -> list[MetricDef]:
    """The report's metrics: AUC, sensitivity at the stored operating point, TPR at FPR 0.05 % / 0.1 % (re-tuned
    on the split: optimistic), attention IoU and attention-in-mask, then each of ``run_metrics`` (a per-run figure
    of ``metrics.json`` named without the split prefix, e.g. ``froc``), then with ``marker_probe`` the
    :func:`probe_metrics`."""
    return [
        MetricDef("auc", _auc),
        MetricDef("sensitivity", _sensitivity),
        MetricDef("tpr_at_fpr_0.0005", _tpr_at(0.0005), max_fpr=0.0005),
        MetricDef("tpr_at_fpr_0.001", _tpr_at(0.001), max_fpr=0.001),
        MetricDef("iou", _run_metric(f"{split}_iou"), per_sample=False),
        MetricDef("attention_in_mask", _run_metric(f"{split}_attention_in_mask"), per_sample=False),
        *(MetricDef(name, _run_metric(f"{split}_{name}"), per_sample=False) for name in run_metrics),
        *(probe_metrics() if marker_probe else []),
    ]


def _read_predictions(path: Path, dataset_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"file", "score", "decision", "label"} - set(rows[0] if rows else {})
    if not rows or missing:
        raise ValueError(f"{path}: not an evaluation predictions.csv (no rows, or missing columns {sorted(missing)})")
    ids = [f"{_relative(r['file'], dataset_dir)}#{r.get('frame', '')}" for r in rows]
    scores = np.array([float(r["score"]) for r in rows], dtype=np.float64)
    labels = np.array([float(int(r["label"]) != 0) for r in rows])
    decisions = np.array([float(r["decision"]) if r["decision"] != "" else math.nan for r in rows])
    if not np.isfinite(scores).all():
        raise ValueError(f"{path}: non-finite scores")
    return ids, scores, labels, decisions


def _relative(file: str, dataset_dir: Path) -> str:
    """A sample's file relative to its run's data set, so runs on data sets of their own pair by file name."""
    try:
        return Path(os.path.abspath(file)).relative_to(os.path.abspath(dataset_dir)).as_posix()
    except ValueError:
        return file


def load_runs(spec: StudySpec) -> dict[str, list[RunData]]:
    """The finished runs of each configuration (runs without ``result.json`` are left out), with the shipped
    model's epoch and, for a study with ``marker_probe``, the probe (computed once per run, then cached).

    Raises:
        ValueError: naming the file when a result or predictions file is malformed, or when the probe's frames
            are not the evaluated ones.
    """
    out: dict[str, list[RunData]] = {c: [] for c in spec.configs}
    for key in spec.runs():
        folder = spec.run_dir(key)
        result_path = folder / RESULT_FILE
        if not result_path.is_file():
            continue
        result = json.loads(result_path.read_text())
        dataset_dir = spec.dataset_dir(key.data_seed, key.config)
        ids, scores, labels, decisions = _read_predictions(folder / result["predictions"], dataset_dir)
        model_file = folder / spec.checkpoint
        stored = load_checkpoint(model_file) if model_file.is_file() else {}
        epoch = stored.get("epoch") if isinstance(stored, dict) else None
        probe = _probe(spec, key, dataset_dir, ids) if spec.marker_probe else None
        out[key.config].append(RunData(key, ids, scores, labels, decisions, result["metrics"],
                                       None if epoch is None else int(epoch), probe))
    return out


def _probe(spec: StudySpec, key: RunKey, dataset_dir: Path, ids: list[str]) -> dict[str, np.ndarray]:
    """The marker probe of a run on its evaluated split (capsule: the marker burnt in; dermoscopy: the inked
    twins), in the order of ``ids``."""
    folder = spec.run_dir(key)
    if spec.data.get("synth") == "dermoscopy":
        probe = run_twin_probe(folder, spec.bundle, spec.evaluate_configs, spec.evaluation_overrides(key),
                               dataset_dir, spec.checkpoint)
    else:
        items = expand_frames(load_datalist(dataset_dir / "datalist.json", spec.split))
        probe = run_marker_probe(folder, items, dataset_dir, spec.checkpoint)
    position = {sample: i for i, sample in enumerate(probe["ids"])}
    if set(position) != set(ids):
        raise ValueError(f"{folder / 'marker_probe.json'}: the probe's frames are not those of the evaluation")
    order = np.array([position[s] for s in ids])
    clean, marked = np.asarray(probe["score_clean"])[order], np.asarray(probe["score_marked"])[order]
    threshold = probe["threshold"]
    alarms = (lambda s: (s >= threshold).astype(np.float64)) if threshold is not None else (
        lambda s: np.full(s.shape, math.nan))
    return {"delta": marked - clean, "alarm_clean": alarms(clean), "alarm_marked": alarms(marked),
            "marker_attention": np.asarray(probe["marker_attention"], dtype=np.float64)[order]}


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def _draw(rng: np.random.Generator, n: int, per_sample: bool) -> np.ndarray:
    return np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64) if per_sample else np.ones(n)


def bootstrap_mean(
    runs: Sequence[RunData], metric: MetricDef, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean over runs of a metric and its two-level percentile bootstrap CI (runs, then each run's samples).

    Returns:
        ``(mean, low, high)``; NaN when no run defines the metric.
    """
    point = np.array([metric.value(r, np.ones(r.labels.size)) for r in runs])
    if not np.isfinite(point).any():
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        picked = rng.integers(0, len(runs), len(runs))
        values = [metric.value(runs[i], _draw(rng, runs[i].labels.size, metric.per_sample)) for i in picked]
        replicates[b] = np.nanmean(values) if np.isfinite(values).any() else math.nan
    return (float(np.nanmean(point)), *_percentiles(replicates, confidence))


def _matched(runs: Sequence[RunData], *others: Sequence[RunData]) -> list[tuple[RunData, list[tuple[RunData, np.ndarray]]]]:
    """Each run with its counterpart in every other configuration (same data seed and seed) and the position of
    the run's samples in the counterpart's; runs lacking a counterpart are left out."""
    by_key = [{(r.key.data_seed, r.key.seed): r for r in group} for group in others]
    matched = []
    for run in runs:
        counterparts = [group.get((run.key.data_seed, run.key.seed)) for group in by_key]
        if any(c is None for c in counterparts):
            continue
        aligned = []
        for other in counterparts:
            position = {sample: i for i, sample in enumerate(other.ids)}
            if set(position) != set(run.ids):
                raise ValueError(f"runs {run.key.folder} and {other.key.folder} were evaluated on different samples")
            aligned.append((other, np.array([position[s] for s in run.ids])))
        matched.append((run, aligned))
    return matched


def _matched_values(
    rng: np.random.Generator | None, run: RunData, aligned: list[tuple[RunData, np.ndarray]], metric: MetricDef
) -> list[float]:
    """The metric of a run and of its counterparts under one draw of the run's samples (all ones without rng)."""
    w = _draw(rng, run.labels.size, metric.per_sample) if rng is not None else np.ones(run.labels.size)
    values = [metric.value(run, w)]
    for other, order in aligned:
        w_other = np.empty_like(w)
        w_other[order] = w
        values.append(metric.value(other, w_other))
    return values


def bootstrap_paired_difference(
    runs: Sequence[RunData],
    reference: Sequence[RunData],
    metric: MetricDef,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float, int]:
    """Mean paired difference ``metric(run) - metric(reference run)`` over runs sharing (data seed, seed), with a
    bootstrap CI drawing the same runs and the same test samples for both.

    Returns:
        ``(difference, low, high, n_pairs)``; NaN without pairs.

    Raises:
        ValueError: when paired runs were evaluated on different samples.
    """
    pairs = _matched(runs, reference)
    if not pairs:
        return math.nan, math.nan, math.nan, 0
    point = [a - b for a, b in (_matched_values(None, run, aligned, metric) for run, aligned in pairs)]
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_bootstrap)
    for k in range(n_bootstrap):
        values = [a - b for a, b in (_matched_values(rng, *pairs[i], metric)
                                     for i in rng.integers(0, len(pairs), len(pairs)))]
        replicates[k] = np.nanmean(values) if np.isfinite(values).any() else math.nan
    mean = float(np.nanmean(point)) if np.isfinite(point).any() else math.nan
    return (mean, *_percentiles(replicates, confidence), len(pairs))


def _gap_fraction(triples: list[list[float]]) -> float:
    """(mean(run) - mean(gap start)) / (mean(gap end) - mean(gap start)) over matched triples; NaN for no gap."""
    values = np.asarray(triples, dtype=np.float64)
    values = values[np.isfinite(values).all(axis=1)]
    if values.size == 0:
        return math.nan
    run, start, end = values.mean(axis=0)
    return float((run - start) / (end - start)) if end != start else math.nan


def bootstrap_gap_closed(
    runs: Sequence[RunData],
    start: Sequence[RunData],
    end: Sequence[RunData],
    metric: MetricDef,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float, int]:
    """The fraction of the gap between two configurations that a third closes, ``(m - m_start) / (m_end -
    m_start)`` of the means over runs sharing (data seed, seed) (e.g. GAIN between a shortcut-trained plain model
    and one trained on clean data: 0 = no better than the plain model, 1 = as good as clean training), with a
    bootstrap CI drawing the same runs and test samples for all three.

    Returns:
        ``(fraction, low, high, n_matched)``; NaN without matched runs.

    Raises:
        ValueError: when matched runs were evaluated on different samples.
    """
    triples = _matched(runs, start, end)
    if not triples:
        return math.nan, math.nan, math.nan, 0
    point = _gap_fraction([_matched_values(None, run, aligned, metric) for run, aligned in triples])
    rng = np.random.default_rng(seed)
    replicates = np.array([
        _gap_fraction([_matched_values(rng, *triples[i], metric) for i in rng.integers(0, len(triples), len(triples))])
        for _ in range(n_bootstrap)])
    return (point, *_percentiles(replicates, confidence), len(triples))


def _note(runs: Sequence[RunData], metric: MetricDef) -> str:
    if metric.max_fpr is not None:
        needed = min_negatives(metric.max_fpr)
        fewest = min(r.n_negatives for r in runs)
        if fewest < needed:
            return f"n/a: {fewest} negatives, {needed} needed for one false alarm at FPR {metric.max_fpr:g}"
    if metric.name == "sensitivity" and any(np.isnan(r.decisions).any() for r in runs):
        return "n/a: a model without an operating point"
    return "" if metric.per_sample else "CI over runs only (a per-run figure)"


def _fmt(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3f}"


def _plots(spec: StudySpec, runs: dict[str, list[RunData]], rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    configs = [c for c in spec.configs if runs[c]]
    for metric in study_metrics(spec.split, spec.run_metrics, spec.marker_probe):
        summary = {r["config"]: r for r in rows if r["metric"] == metric.name}
        if all(not math.isfinite(summary[c]["mean"]) for c in configs):
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(configs) + 1.5), 3.6))
        for i, config in enumerate(configs):
            dots = [metric.value(r, np.ones(r.labels.size)) for r in runs[config]]
            ax.scatter(np.full(len(dots), i) + np.linspace(-0.12, 0.12, len(dots)), dots, s=14, color="0.55",
                       zorder=2, label="one run" if i == 0 else None)
            row = summary[config]
            if math.isfinite(row["mean"]):
                low, high = row["ci_low"], row["ci_high"]
                err = [[row["mean"] - low], [high - row["mean"]]] if math.isfinite(low) else None
                ax.errorbar(i, row["mean"], yerr=err, fmt="o", color="C0", capsize=4, zorder=3,
                            label="mean, 95 % CI" if i == 0 else None)
        ax.set_xticks(range(len(configs)), configs, rotation=30, ha="right")
        ax.set_ylabel(metric.name)
        ax.set_title(f"{spec.name}: {metric.name} ({spec.split} split)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = out / f"{metric.name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        if spec.x_axis:
            given = {c: spec.configs[c].get(spec.x_axis, spec.train.get(spec.x_axis)) for c in configs}
            xs = [(float(x), summary[c]) for c, x in given.items() if isinstance(x, int | float)]
            if len(xs) >= 2:
                xs.sort(key=lambda t: t[0])
                fig, ax = plt.subplots(figsize=(4.8, 3.6))
                x = [t[0] for t in xs]
                ax.plot(x, [t[1]["mean"] for t in xs], "o-", color="C0", label="mean")
                ax.fill_between(x, [t[1]["ci_low"] for t in xs], [t[1]["ci_high"] for t in xs], alpha=0.2,
                                color="C0", label="95 % CI")
                ax.set_xscale("log" if min(x) > 0 and max(x) / min(x) >= 10 else "linear")
                ax.set_xlabel(spec.x_axis)
                ax.set_ylabel(metric.name)
                ax.set_title(f"{metric.name} vs {spec.x_axis}")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
                fig.tight_layout()
                path = out / f"{metric.name}_vs_{spec.x_axis}.png"
                fig.savefig(path, dpi=110)
                plt.close(fig)
                written.append(path)
    return written


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_report(
    spec: StudySpec, out: str | Path | None = None, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Path:
    """Write ``study.md``, ``summary.csv``, ``differences.csv``, ``runs.csv`` and the plots into ``out``
    (default ``<output_dir>/report``) and log them to the study's MLflow parent run.

    Returns:
        the Markdown file.

    Raises:
        RuntimeError: when no run of the study has finished.
    """
    out = Path(out) if out is not None else spec.output_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(spec)
    if not any(runs.values()):
        raise RuntimeError(f"study {spec.path}: no finished run under {spec.output_dir / 'runs'}; run it first")
    metrics = study_metrics(spec.split, spec.run_metrics, spec.marker_probe)
    summary, differences, per_run = [], [], []
    for config, config_runs in runs.items():
        reference = spec.reference_of(config)
        for run in config_runs:
            per_run.append({"config": config, "data_seed": run.key.data_seed, "seed": run.key.seed,
                            "n_test": run.labels.size, "n_negatives": run.n_negatives,
                            "shipped_epoch": "" if run.epoch is None else run.epoch}
                           | {m.name: metric_value(m, run) for m in metrics})
        for metric in metrics:
            if not config_runs:
                summary.append({"config": config, "metric": metric.name, "runs": 0, "mean": math.nan,
                                "ci_low": math.nan, "ci_high": math.nan, "note": "no finished run"})
                continue
            note = _note(config_runs, metric)
            mean, low, high = (math.nan,) * 3 if note.startswith("n/a") else bootstrap_mean(
                config_runs, metric, n_bootstrap, confidence, seed)
            summary.append({"config": config, "metric": metric.name, "runs": len(config_runs), "mean": mean,
                            "ci_low": low, "ci_high": high, "note": note})
            if config != reference and runs[reference] and not note.startswith("n/a"):
                diff, d_low, d_high, n = bootstrap_paired_difference(
                    config_runs, runs[reference], metric, n_bootstrap, confidence, seed)
                differences.append({"config": config, "reference": reference, "metric": metric.name,
                                    "pairs": n, "difference": diff, "ci_low": d_low, "ci_high": d_high})
    gaps = _gaps(spec, runs, metrics, n_bootstrap, confidence, seed)
    penalties = _penalties(spec, runs, metrics, n_bootstrap, confidence, seed)
    _write_csv(out / "summary.csv", summary)
    _write_csv(out / "runs.csv", per_run)
    if differences:
        _write_csv(out / "differences.csv", differences)
    if gaps:
        _write_csv(out / "gap.csv", gaps)
    if penalties:
        _write_csv(out / "penalty.csv", penalties)
    plots = _plots(spec, runs, summary, out)
    markdown = out / "study.md"
    text = _markdown(spec, runs, summary, differences, gaps, plots, n_bootstrap, confidence)
    markdown.write_text(text + _design_markdown(spec, runs, penalties, metrics, confidence))
    _log_report(spec, out)
    return markdown


def _gaps(spec: StudySpec, runs: dict[str, list[RunData]], metrics: list[MetricDef], n_bootstrap: int,
          confidence: float, seed: int) -> list[dict[str, Any]]:
    """With ``gap: [start, end]``: the fraction of that gap each other configuration closes, per metric."""
    if spec.gap is None:
        return []
    start, end = spec.gap
    rows = []
    for config, config_runs in runs.items():
        if config in (start, end) or not config_runs or not runs[start] or not runs[end]:
            continue
        for metric in metrics:
            if _note(config_runs, metric).startswith("n/a"):
                continue
            fraction, low, high, n = bootstrap_gap_closed(config_runs, runs[start], runs[end], metric,
                                                          n_bootstrap, confidence, seed)
            rows.append({"config": config, "start": start, "end": end, "metric": metric.name, "matched": n,
                         "fraction": fraction, "ci_low": low, "ci_high": high})
    return rows


def _penalties(spec: StudySpec, runs: dict[str, list[RunData]], metrics: list[MetricDef], n_bootstrap: int,
               confidence: float, seed: int) -> list[dict[str, Any]]:
    """With ``data_variants``: per method, each variant minus the first (e.g. confounded minus clean), paired by
    run (data seed, seed) and test sample."""
    if not spec.variants:
        return []
    base, *others = spec.variants
    rows = []
    for method in spec.methods:
        baseline = runs[f"{method}{VARIANT_SEPARATOR}{base}"]
        for variant in others:
            variant_runs = runs[f"{method}{VARIANT_SEPARATOR}{variant}"]
            if not baseline or not variant_runs:
                continue
            for metric in metrics:
                if _note(variant_runs + baseline, metric).startswith("n/a"):
                    continue
                diff, low, high, n = bootstrap_paired_difference(variant_runs, baseline, metric, n_bootstrap,
                                                                 confidence, seed)
                rows.append({"method": method, "variant": variant, "baseline": base, "metric": metric.name,
                             "pairs": n, "penalty": diff, "ci_low": low, "ci_high": high})
    return rows


def _marked_frames(spec: StudySpec, runs: dict[str, list[RunData]]) -> list[str]:
    """Markdown rows: the marked frames per split of each data set the finished runs used (``dataset.json``)."""
    rows, seen = [], set()
    for config, config_runs in runs.items():
        _, variant = spec.split_config(config)
        for run in config_runs:
            folder = spec.dataset_dir(run.key.data_seed, config)
            if folder in seen or not (folder / "dataset.json").is_file():
                continue
            seen.add(folder)
            summary = json.loads((folder / "dataset.json").read_text())
            splits = summary.get("splits") or _fold_splits(summary.get("folds") or {}, int(spec.train.get("fold", 0)))
            counts = " | ".join(f"{splits.get(s, {}).get('shortcuts', 'n/a')} / "
                                f"{splits.get(s, {}).get('frames', 'n/a')}" for s in ("training", "validation", "test"))
            rows.append(f"| `{variant or config}` | {run.key.data_seed} | {counts} |")
    return rows


def _fold_splits(folds: dict[str, dict[str, int]], validation: int) -> dict[str, dict[str, int]]:
    """Marked / all images per split from a dermoscopy data set's per-fold counts (``dataset.json`` ``folds``):
    fold -1 is the test split, ``validation`` the validation fold, the other folds train."""
    out: dict[str, dict[str, int]] = {}
    for fold, counts in folds.items():
        split = "test" if int(fold) == -1 else "validation" if int(fold) == validation else "training"
        total = out.setdefault(split, {"shortcuts": 0, "frames": 0})
        total["shortcuts"] += int(counts["ink_markings"])
        total["frames"] += int(counts["images"])
    return out


def _design_markdown(spec: StudySpec, runs: dict[str, list[RunData]], penalties: list[dict[str, Any]],
                     metrics: list[MetricDef], confidence: float) -> str:
    """The sections of a shortcut study: shipped epochs, marked frames per split, the probe, the penalty table."""
    lines = ["", "## Shipped epochs", "", "The epoch of each run's shipped model file (chosen on validation).", "",
             "| configuration | epoch per run (\"d1 s0: 7\": data seed 1, seed 0, epoch 7) |", "| --- | --- |"]
    for config, config_runs in runs.items():
        if config_runs:
            lines.append(f"| `{config}` | " + ", ".join(
                f"d{r.key.data_seed} s{r.key.seed}: {'n/a' if r.epoch is None else r.epoch}" for r in config_runs) + " |")
    marked = _marked_frames(spec, runs) if spec.data.get("synth") else []
    if marked:
        lines += ["", "## Marked frames per split", "",
                  "Frames carrying the marker / frames, from each data set's `dataset.json`: a clean validation split "
                  "chooses the checkpoint and the operating point without the marker.", "",
                  "| data | data seed | training | validation | test |", "| --- | --- | --- | --- | --- |", *marked]
    if spec.marker_probe:
        marker = ("The ink markings of the shortcut (`medgain synth dermoscopy --ink-probe`: each clean test image "
                  "rendered again with its ink)" if spec.data.get("synth") == "dermoscopy" else
                  "The marker (`medgain synth capsule --shortcut-rate`) burnt into every clean test frame")
        lines += ["", "## Marker-reliance probe", "",
                  marker + ": "
                  "`dlogodds_*` is the mean change of the log-odds of being ill (marked minus clean) on normal / "
                  "lesion frames; `false_alarms_clean` / `false_alarms_marked` the fraction of normal frames at or "
                  "above the shipped threshold without / with the marker; `marker_attention` the share of the "
                  "marked frames' Grad-CAM (lesion class) on the marker's pixels"
                  + _chance(spec, runs) + ". Per-frame values, so their CI resamples runs and frames."]
    if penalties:
        names = [m.name for m in metrics]
        base = next(iter(spec.variants))
        level = f"{confidence:.0%}"
        lines += ["", f"## Shortcut penalty per method: variant minus `{base}` ({level} CI)", "",
                  "Each method trained on each data variant; the same seeds, data seeds and test frames for both.", "",
                  "| method | variant | pairs | " + " | ".join(names) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for method in spec.methods:
            for variant in list(spec.variants)[1:]:
                rows = {r["metric"]: r for r in penalties if r["method"] == method and r["variant"] == variant}
                if not rows:
                    continue
                cells = [f"{rows[n]['penalty']:+.3f} [{rows[n]['ci_low']:+.3f}, {rows[n]['ci_high']:+.3f}]"
                         if n in rows and math.isfinite(rows[n]["penalty"]) else "n/a" for n in names]
                lines.append(f"| `{method}` | `{variant}` | {max(r['pairs'] for r in rows.values())} | "
                             + " | ".join(cells) + " |")
        lines += ["", "The penalty table as CSV: `penalty.csv`."]
    return "\n".join(lines) + "\n"


def _chance(spec: StudySpec, runs: dict[str, list[RunData]]) -> str:
    """The marker's share of the input (the ``marker_attention`` of a uniform map), from a run's probe file."""
    for config_runs in runs.values():
        for run in config_runs:
            path = spec.run_dir(run.key) / "marker_probe.json"
            if path.is_file():
                return f" (a uniform map: {json.loads(path.read_text())['marker_area']:.3f})"
    return ""


def metric_value(metric: MetricDef, run: RunData) -> float:
    """A metric of one run on all its test samples."""
    return metric.value(run, np.ones(run.labels.size))


def _markdown(
    spec: StudySpec,
    runs: dict[str, list[RunData]],
    summary: list[dict[str, Any]],
    differences: list[dict[str, Any]],
    gaps: list[dict[str, Any]],
    plots: list[Path],
    n_bootstrap: int,
    confidence: float,
) -> str:
    names = [m.name for m in study_metrics(spec.split, spec.run_metrics, spec.marker_probe)]
    level = f"{confidence:.0%}"
    lines = [
        f"# Study `{spec.name}`",
        "",
        f"Bundle `{spec.bundle.name}`, split `{spec.split}`; seeds {spec.seeds} × data seeds {spec.data_seeds}; "
        f"mean over runs and {level} CI ({n_bootstrap} two-level bootstrap draws: runs, then test samples). "
        f"Reference configuration: `{spec.reference}`.",
        "",
        "| configuration | runs | " + " | ".join(names) + " |",
        "| --- | --- | " + " | ".join("---" for _ in names) + " |",
    ]
    notes: dict[str, str] = {}
    for config in spec.configs:
        cells = []
        for name in names:
            row = next(r for r in summary if r["config"] == config and r["metric"] == name)
            cells.append(_fmt(row["mean"]) if not math.isfinite(row["ci_low"])
                         else f"{_fmt(row['mean'])} [{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}]")
            if row["note"] and runs[config]:  # a configuration without runs shows 0 runs, not a note
                notes.setdefault(name, row["note"])
        lines.append(f"| `{config}` | {len(runs[config])} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *[f"- `{name}`: {note}" for name, note in notes.items()]]
    if differences:
        same = " on the same data variant" if spec.variants else ""
        lines += ["", f"## Paired differences against `{spec.reference}`{same} ({level} CI)", "",
                  "| configuration | pairs | " + " | ".join(names) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for config in spec.configs:
            rows = {r["metric"]: r for r in differences if r["config"] == config}
            if not rows:
                continue
            cells = [f"{rows[n]['difference']:+.3f} [{rows[n]['ci_low']:+.3f}, {rows[n]['ci_high']:+.3f}]"
                     if n in rows and math.isfinite(rows[n]["difference"]) else "n/a" for n in names]
            pairs = max(r["pairs"] for r in rows.values())
            lines.append(f"| `{config}` | {pairs} | " + " | ".join(cells) + " |")
    if gaps:
        start, end = gaps[0]["start"], gaps[0]["end"]
        lines += ["", f"## Fraction of the gap from `{start}` (0) to `{end}` (1) closed ({level} CI)", "",
                  "| configuration | runs | " + " | ".join(names) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for config in spec.configs:
            rows = {r["metric"]: r for r in gaps if r["config"] == config}
            if rows:
                cells = [f"{_fmt(rows[n]['fraction'])} [{_fmt(rows[n]['ci_low'])}, {_fmt(rows[n]['ci_high'])}]"
                         if n in rows and math.isfinite(rows[n]["fraction"]) else "n/a" for n in names]
                lines.append(f"| `{config}` | {max(r['matched'] for r in rows.values())} | " + " | ".join(cells)
                             + " |")
    if plots:
        lines += ["", "## Plots", "", "PNG files beside this report (in MLflow: the study run's `report/` folder), "
                  "each metric per configuration with every run as a dot; a viewer that shows no images lists their "
                  "names here."]
        for plot in plots:
            lines += ["", f"![{plot.stem}]({plot.name})"]
    lines += ["", "Per-run figures: `runs.csv`; these tables as CSV: `summary.csv`, `differences.csv`"
              + (", `gap.csv`" if gaps else "") + ".", ""]
    return "\n".join(lines)


def _log_report(spec: StudySpec, out: Path) -> None:
    state = spec.output_dir / "study.json"
    if not state.is_file():
        return
    import mlflow

    run_id = json.loads(state.read_text())["parent_run_id"]
    mlflow.MlflowClient(spec.tracking_uri).log_artifacts(run_id, str(out), "report")
