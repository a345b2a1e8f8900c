"""Shared benchmark plumbing: argument parsing, device choice, side-by-side timing, and per-image prediction
tables with paired bootstrap intervals of the differences between methods."""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from medgain.metrics.bootstrap import cluster_indices, weighted_auc
from medgain.metrics.roc import checked_scores
from medgain.model_file import atomic_write

PAIRED_METRICS = ("auc", "accuracy")


def parser(description: str, batch_size: int) -> argparse.ArgumentParser:
    """Common options: sizes, repetitions, device and AMP."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    return p


def machine(device: str) -> str:
    """One line naming the machine the figures come from."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def alternate(
    candidates: dict[str, Callable[[], None]], rounds: int, device: str, warm_up: bool = True
) -> dict[str, float]:
    """Median seconds per call of each candidate, measured in alternation after one warm-up call each (skipped
    with ``warm_up=False``, for callers that warm up on a smaller input)."""
    def timed(fn: Callable[[], None]) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in candidates.values() if warm_up else ():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


def write_prediction_table(
    path: str | os.PathLike,
    ids: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    scores: Mapping[str, Sequence[float] | np.ndarray],
    extra: Mapping[str, Sequence[object]] | None = None,
) -> None:
    """Write a per-image CSV atomically: ``id, label``, the ``extra`` columns (e.g. ``group``, ``split``), then
    one score column per method.

    Args:
        path: the CSV.
        ids: one id per image: a synthetic index or a pseudonym, never a file name.
        labels: 0/1 ground truth.
        scores: method name → (N,) scores.
        extra: further columns, written between the label and the scores.

    Raises:
        ValueError: for columns of different lengths or a method named like another column.
    """
    extra = dict(extra or {})
    columns = {"id": list(ids), "label": [int(v) for v in labels], **{k: list(v) for k, v in extra.items()}}
    clash = sorted(set(columns) & set(scores))
    if clash:
        raise ValueError(f"{path}: method name(s) {clash} clash with the table's columns")
    columns |= {name: [f"{float(v):.6g}" for v in values] for name, values in scores.items()}
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{path}: columns of different lengths {lengths}")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(list(columns))
    writer.writerows(zip(*columns.values()))
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def read_prediction_tables(
    paths: Sequence[str | os.PathLike], reserved: Sequence[str] = ("id", "label", "group", "split")
) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Join per-image CSVs (:func:`write_prediction_table`) on ``id``: every file must list the same images with
    the same labels; its score columns (all but ``reserved``) become methods.

    Returns:
        ``(ids, labels, scores)`` in the first file's row order.

    Raises:
        ValueError: naming the file for a missing ``id`` / ``label`` column, a repeated id, images or labels that
            differ from the first file's, a method named twice, or a score that is not a number.
    """
    ids: list[str] = []
    labels = np.zeros(0)
    scores: dict[str, np.ndarray] = {}
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            missing = [c for c in ("id", "label") if c not in fields]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; found {fields}")
            rows = list(reader)
        by_id = {row["id"]: row for row in rows}
        if len(by_id) != len(rows):
            raise ValueError(f"{path}: an id is listed twice")
        if not ids:
            ids = [row["id"] for row in rows]
            labels = np.asarray([float(row["label"]) for row in rows])
        elif set(by_id) != set(ids):
            raise ValueError(f"{path}: lists other images than {paths[0]}")
        elif any(float(by_id[i]["label"]) != y for i, y in zip(ids, labels)):
            raise ValueError(f"{path}: labels differ from {paths[0]}")
        for name in (c for c in fields if c not in reserved):
            if name in scores:
                raise ValueError(f"{path}: method {name!r} is already in an earlier table")
            try:
                scores[name] = np.asarray([float(by_id[i][name]) for i in ids])
            except ValueError as err:
                raise ValueError(f"{path}: column {name!r}: {err}") from None
    return ids, labels, scores


def _weighted_metric(metric: str, ranks: tuple[np.ndarray, int], correct: np.ndarray, y: np.ndarray,
                     w: np.ndarray) -> float:
    if metric == "auc":
        return weighted_auc(ranks[0], y, w, ranks[1])
    return float((w * correct).sum() / w.sum())


def paired_bootstrap_differences(
    labels: Sequence[int] | np.ndarray,
    scores: Mapping[str, Sequence[float] | np.ndarray],
    reference: str,
    metrics: Sequence[str] = ("auc",),
    threshold: float = 0.0,
    groups: Sequence[object] | None = None,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[dict[str, object]]:
    """Each method's metric minus the reference's, with a paired percentile bootstrap interval.

    Every resample draws images (or whole ``groups``, e.g. patients) once and scores all methods on it, so the
    interval is that of the difference on the same images. Resamples holding a single class are drawn again
    (as :func:`medgain.metrics.bootstrap_auc` does).

    Args:
        labels: (N,) 0/1 ground truth with both classes.
        scores: method name → (N,) scores, higher meaning positive.
        reference: the method the others are compared with.
        metrics: ``"auc"`` and/or ``"accuracy"`` (decision ``score >= threshold``).
        threshold: decision threshold of the accuracy (0 for log-odds, 0.5 for probabilities).
        groups: (N,) cluster ids for a cluster bootstrap; None resamples images.
        n_bootstrap: number of resamples.
        confidence: level of the interval in (0, 1).
        seed: resampling seed.

    Returns:
        one row per (method other than the reference, metric): ``method, reference, metric, value,
        reference_value, difference, ci_low, ci_high, n, n_positive``.

    Raises:
        ValueError: for an unknown metric or reference, invalid scores or labels, a single class, or
            ``n_bootstrap`` / ``confidence`` out of range.
    """
    unknown = sorted(set(metrics) - set(PAIRED_METRICS))
    if unknown:
        raise ValueError(f"paired_bootstrap_differences: unknown metric(s) {unknown}; known {list(PAIRED_METRICS)}")
    if reference not in scores:
        raise ValueError(f"paired_bootstrap_differences: reference {reference!r} is not among {sorted(scores)}")
    if not 0.0 < confidence < 1.0 or n_bootstrap < 1:
        raise ValueError(
            f"paired_bootstrap_differences: needs 0 < confidence < 1 and n_bootstrap >= 1, got {confidence}, "
            f"{n_bootstrap}"
        )
    checked = {name: checked_scores(values, labels, f"paired_bootstrap_differences ({name})")
               for name, values in scores.items()}
    y = checked[reference][1]
    if y.sum() in (0, y.size):
        raise ValueError("paired_bootstrap_differences: needs both classes")
    ranks = {}
    correct = {}
    for name, (s, _) in checked.items():
        values, inverse = np.unique(s, return_inverse=True)
        ranks[name] = (inverse, values.size)
        correct[name] = ((s >= threshold) == (y == 1)).astype(np.float64)
    cluster = cluster_indices(groups, y.size, "paired_bootstrap_differences")
    n_clusters = int(cluster.max()) + 1
    methods = [name for name in scores if name != reference]
    rng = np.random.default_rng(seed)
    samples = {(m, metric): np.empty(n_bootstrap) for m in methods for metric in metrics}
    done = 0
    while done < n_bootstrap:
        w = np.bincount(rng.integers(0, n_clusters, n_clusters), minlength=n_clusters).astype(np.float64)[cluster]
        if (w * y).sum() == 0 or (w * (1.0 - y)).sum() == 0:
            continue
        for metric in metrics:
            ref = _weighted_metric(metric, ranks[reference], correct[reference], y, w)
            for m in methods:
                samples[(m, metric)][done] = _weighted_metric(metric, ranks[m], correct[m], y, w) - ref
        done += 1
    alpha = (1.0 - confidence) / 2.0
    ones = np.ones_like(y)
    rows = []
    for m in methods:
        for metric in metrics:
            value = _weighted_metric(metric, ranks[m], correct[m], y, ones)
            ref_value = _weighted_metric(metric, ranks[reference], correct[reference], y, ones)
            low, high = np.quantile(samples[(m, metric)], [alpha, 1.0 - alpha])
            rows.append({
                "method": m, "reference": reference, "metric": metric, "value": value, "reference_value": ref_value,
                "difference": value - ref_value, "ci_low": float(low), "ci_high": float(high),
                "n": int(y.size), "n_positive": int(y.sum()),
            })
    return rows


def differences_table(rows: Sequence[Mapping[str, object]], confidence: float = 0.95) -> str:
    """Markdown table of :func:`paired_bootstrap_differences` rows; a row's optional ``where`` (e.g. the seed and
    split) heads its line."""
    lines = [
        f"| where | comparison | metric | method | reference | difference ({confidence:.0%} CI) | n (positive) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.get('where', '')} | {r['method']} − {r['reference']} | {r['metric']} | {float(r['value']):.3f} | "
            f"{float(r['reference_value']):.3f} | {float(r['difference']):+.3f} "
            f"({float(r['ci_low']):+.3f} to {float(r['ci_high']):+.3f}) | {r['n']} ({r['n_positive']}) |"
        )
    return "\n".join(lines)
