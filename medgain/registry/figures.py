"""The reviewer's figures from per-frame records: metrics with cluster-bootstrap confidence intervals, the
operating-point table, calibration, confusion matrix, subgroups and the paired comparison of two models.

Scores are the float64 log-odds of being ill (:func:`medgain.metrics.positive_score`); resampling is by study
(patient, slide) when the records carry one, so correlated frames move together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medgain.metrics import auc_score, bootstrap_auc, fpr_budget_note, score_to_probability

__all__ = [
    "FPR_BUDGETS",
    "GROUP_FIELDS",
    "SUBGROUP_FIELDS",
    "REVIEW_BUDGETS",
    "RecordArrays",
    "bootstrap_figures",
    "calibration",
    "compare_figures",
    "confusion",
    "operating_table",
    "point_figures",
    "subgroup_figures",
]

#: false-alarm budgets of the headline sensitivities (0.05 %, 0.1 %)
FPR_BUDGETS = (0.0005, 0.001)
#: budgets of the operating-point table
REVIEW_BUDGETS = (0.0005, 0.001, 0.005, 0.01, 0.05)
#: datalist fields whose values define subgroups (categorical; ages are banded)
SUBGROUP_FIELDS = ("site", "sex", "age_band", "anatom_site_general", "scanner")
#: datalist fields naming the unit frames belong to (resampled together; metrics at that level)
GROUP_FIELDS = ("study", "patient_id", "patient", "slide")


class RecordArrays:
    """Per-frame arrays of one model on one split, aligned by frame reference.

    Args:
        records: rows with ``ref``, ``label`` (0/1), ``score`` (log-odds), ``iou`` and ``attention_in_mask``
            (None where the frame has no lesion mask) and optionally ``group`` (a study pseudonym).
    """

    def __init__(self, records: Sequence[Mapping[str, Any]]) -> None:
        if not records:
            raise ValueError("RecordArrays: no records (the evaluated split is empty)")
        self.refs = [str(r["ref"]) for r in records]
        self.label = np.asarray([int(r["label"]) for r in records], dtype=np.float64)
        self.score = np.asarray([float(r["score"]) for r in records], dtype=np.float64)
        if not np.all(np.isfinite(self.score)):
            raise ValueError("RecordArrays: non-finite log-odds in the records")
        self.iou = np.asarray([math.nan if r.get("iou") is None else float(r["iou"]) for r in records])
        self.inside = np.asarray(
            [math.nan if r.get("attention_in_mask") is None else float(r["attention_in_mask"]) for r in records]
        )
        groups = [r.get("group") for r in records]
        self.groups = None if any(g is None for g in groups) else [str(g) for g in groups]
        cluster_names = self.groups if self.groups is not None else self.refs
        self.cluster = np.unique(np.asarray(cluster_names), return_inverse=True)[1]
        uniq, inverse = np.unique(-self.score, return_inverse=True)  # distinct thresholds, highest score first
        self.thresholds = -uniq
        self.rank = inverse

    def reordered(self, refs: Sequence[str]) -> RecordArrays:
        """The same records in the order of ``refs`` (which must name exactly the same frames)."""
        if sorted(refs) != sorted(self.refs):
            raise ValueError("the two evaluations did not score the same frames; compare on the same datalist split")
        index = {ref: i for i, ref in enumerate(self.refs)}
        order = [index[ref] for ref in refs]
        rows = []
        for i in order:
            rows.append(
                {
                    "ref": self.refs[i],
                    "label": self.label[i],
                    "score": self.score[i],
                    "iou": None if math.isnan(self.iou[i]) else self.iou[i],
                    "attention_in_mask": None if math.isnan(self.inside[i]) else self.inside[i],
                    "group": None if self.groups is None else self.groups[i],
                }
            )
        return RecordArrays(rows)


def _curve(a: RecordArrays, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted ROC points (fpr, tpr), starting at (0, 0), one per distinct threshold (highest first)."""
    n = a.thresholds.size
    tp = np.concatenate([[0.0], np.cumsum(np.bincount(a.rank, weights=w * a.label, minlength=n))])
    fp = np.concatenate([[0.0], np.cumsum(np.bincount(a.rank, weights=w * (1.0 - a.label), minlength=n))])
    return fp / fp[-1] if fp[-1] > 0 else fp * math.nan, tp / tp[-1] if tp[-1] > 0 else tp * math.nan


def _weighted_mean(values: np.ndarray, w: np.ndarray) -> float:
    keep = ~np.isnan(values) & (w > 0)
    return float((values[keep] * w[keep]).sum() / w[keep].sum()) if keep.any() else math.nan


def _figures(a: RecordArrays, w: np.ndarray, threshold: float | None) -> dict[str, float]:
    fpr, tpr = _curve(a, w)
    out = {"auc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))}
    for budget in FPR_BUDGETS:
        allowed = fpr <= budget + 1e-12
        out[f"tpr_at_fpr_{budget:g}"] = float(tpr[allowed].max()) if allowed.any() else math.nan
    out["iou"] = _weighted_mean(a.iou, w)
    out["attention_in_mask"] = _weighted_mean(a.inside, w)
    if threshold is not None:
        ill = (a.score >= threshold).astype(np.float64)
        pos, neg = (w * a.label).sum(), (w * (1.0 - a.label)).sum()
        out["sensitivity"] = float((w * a.label * ill).sum() / pos) if pos > 0 else math.nan
        out["specificity"] = float((w * (1.0 - a.label) * (1.0 - ill)).sum() / neg) if neg > 0 else math.nan
    return out


def point_figures(a: RecordArrays, threshold: float | None) -> dict[str, float]:
    """The figures of the records as they are: AUC, TPR at each :data:`FPR_BUDGETS`, mean IoU and attention in
    mask over the framed lesions, and sensitivity / specificity at ``threshold`` (log-odds) when given."""
    return _figures(a, np.ones_like(a.score), threshold)


def _resample_weights(a: RecordArrays, rng: np.random.Generator) -> np.ndarray:
    k = int(a.cluster.max()) + 1
    return np.bincount(rng.integers(0, k, k), minlength=k).astype(np.float64)[a.cluster]


def _interval(values: list[float], confidence: float) -> tuple[float, float]:
    finite = np.asarray([v for v in values if not math.isnan(v)])
    if finite.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_figures(
    a: RecordArrays, threshold: float | None, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, dict[str, float]]:
    """:func:`point_figures` with percentile cluster-bootstrap intervals: ``{name: {"value", "low", "high"}}``.

    The AUC interval is :func:`medgain.metrics.bootstrap_auc`'s (same clusters); the others resample clusters
    (studies when the records carry them, else frames) ``n_bootstrap`` times.
    """
    point = point_figures(a, threshold)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in point}
    for _ in range(n_bootstrap):
        for name, value in _figures(a, _resample_weights(a, rng), threshold).items():
            draws[name].append(value)
    out = {name: dict(zip(("low", "high"), _interval(draws[name], confidence))) | {"value": point[name]} for name in point}
    n_pos = int(a.label.sum())
    if 0 < n_pos < a.label.size:
        groups = a.groups if a.groups is not None else None
        _, low, high = bootstrap_auc(a.score, a.label, groups, n_bootstrap, confidence, seed)
        out["auc"].update(low=low, high=high)
    return out


def compare_figures(
    candidate: RecordArrays,
    champion: RecordArrays,
    thresholds: tuple[float | None, float | None],
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Paired differences candidate - champion on the same frames, each model at its own operating point:
    ``{name: {"value", "low", "high"}}`` from one shared cluster bootstrap."""
    champion = champion.reordered(candidate.refs)
    ones = np.ones_like(candidate.score)
    point_a, point_b = _figures(candidate, ones, thresholds[0]), _figures(champion, ones, thresholds[1])
    rng = np.random.default_rng(seed)
    names = [n for n in point_a if n in point_b]
    draws: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(n_bootstrap):
        w = _resample_weights(candidate, rng)
        fa, fb = _figures(candidate, w, thresholds[0]), _figures(champion, w, thresholds[1])
        for name in names:
            draws[name].append(fa[name] - fb[name])
    return {
        name: {"value": point_a[name] - point_b[name], "candidate": point_a[name], "champion": point_b[name]}
        | dict(zip(("low", "high"), _interval(draws[name], confidence)))
        for name in names
    }


def operating_table(
    a: RecordArrays, stored_threshold: float | None, frames_per_study: float | None, budgets: Sequence[float] = REVIEW_BUDGETS
) -> list[dict[str, Any]]:
    """One row per false-alarm budget (threshold chosen on these records: optimistic) and one for the stored
    operating point: threshold (log-odds), probability, sensitivity, specificity, false alarms per 1,000 healthy
    frames and per study (FPR x mean frames per study), and a note when the split has too few negatives."""
    fpr, tpr = _curve(a, np.ones_like(a.score))
    n_neg = int((a.label == 0).sum())
    rows = []
    for budget in budgets:
        allowed = np.flatnonzero(fpr <= budget + 1e-12)
        best = int(allowed[np.argmax(tpr[allowed])]) if allowed.size else 0
        threshold = float(a.thresholds[best - 1]) if best > 0 else math.inf
        rows.append(_row(a, f"FPR <= {budget * 100:g} %", threshold, frames_per_study, fpr_budget_note(n_neg, budget)))
    if stored_threshold is not None:
        rows.append(_row(a, "stored operating point (ships with the model)", stored_threshold, frames_per_study, None))
    return rows


def _row(a: RecordArrays, name: str, threshold: float, per_study: float | None, note: str | None) -> dict[str, Any]:
    ill = a.score >= threshold
    pos, neg = a.label == 1, a.label == 0
    fpr = float((ill & neg).sum() / neg.sum()) if neg.any() else math.nan
    return {
        "budget": name,
        "threshold": threshold if math.isfinite(threshold) else None,
        "probability": float(score_to_probability(threshold)) if math.isfinite(threshold) else None,
        "sensitivity": float((ill & pos).sum() / pos.sum()) if pos.any() else math.nan,
        "specificity": 1.0 - fpr,
        "false_alarms_per_1000": 1000.0 * fpr,
        "false_alarms_per_study": None if per_study is None else fpr * per_study,
        "note": note,
    }


def confusion(a: RecordArrays, threshold: float | None) -> dict[str, int] | None:
    """``{"tp", "fp", "fn", "tn"}`` at ``threshold`` (log-odds), None without one."""
    if threshold is None:
        return None
    ill, pos = a.score >= threshold, a.label == 1
    return {"tp": int((ill & pos).sum()), "fp": int((ill & ~pos).sum()), "fn": int((~ill & pos).sum()),
            "tn": int((~ill & ~pos).sum())}


def calibration(a: RecordArrays, n_bins: int = 10) -> dict[str, Any]:
    """Reliability of p(ill): per equal-width probability bin the mean predicted probability, the observed
    fraction of ill frames and the count, and the expected calibration error."""
    p = np.asarray(score_to_probability(a.score.copy()), dtype=np.float64)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    rows = []
    ece = 0.0
    for b in range(n_bins):
        inside = bins == b
        if not inside.any():
            continue
        predicted, observed = float(p[inside].mean()), float(a.label[inside].mean())
        rows.append({"low": b / n_bins, "high": (b + 1) / n_bins, "predicted": predicted, "observed": observed,
                     "count": int(inside.sum())})
        ece += inside.sum() / p.size * abs(predicted - observed)
    return {"bins": rows, "ece": float(ece)}


def _level_figures(label: np.ndarray, score: np.ndarray, threshold: float | None) -> dict[str, Any]:
    n_pos = int(label.sum())
    out: dict[str, Any] = {"n": int(label.size), "positives": n_pos}
    out["auc"] = auc_score(score, label) if 0 < n_pos < label.size else math.nan
    if threshold is not None:
        ill = score >= threshold
        out["sensitivity"] = float((ill & (label == 1)).sum() / n_pos) if n_pos else math.nan
        n_neg = label.size - n_pos
        out["specificity"] = float((~ill & (label == 0)).sum() / n_neg) if n_neg else math.nan
    return out


def subgroup_figures(
    a: RecordArrays, fields: Mapping[str, Sequence[Any]], threshold: float | None, max_levels: int = 12
) -> dict[str, Any]:
    """Metrics per subgroup and at the study level.

    Args:
        a: the records.
        fields: per datalist field (see :data:`SUBGROUP_FIELDS`), the value of each record (None: unknown).
        threshold: the stored operating point (log-odds).
        max_levels: fields with more distinct values are left out (not categorical).

    Returns:
        ``{"subgroups": {field: {value: figures}}, "level": {"unit", "figures", "units": [...]}}``; at the
        study level a unit is ill when any of its frames is, and scores its highest frame score.
    """
    out: dict[str, Any] = {"subgroups": {}, "level": None}
    for name, values in fields.items():
        levels = sorted({str(v) for v in values if v is not None})
        if not levels or len(levels) > max_levels:
            continue
        table = {}
        for level in levels:
            keep = np.asarray([str(v) == level for v in values])
            table[level] = _level_figures(a.label[keep], a.score[keep], threshold)
        out["subgroups"][name] = table
    if a.groups is not None:
        names = np.asarray(a.groups)
        units = []
        for unit in sorted(set(a.groups)):
            keep = names == unit
            ill = a.score[keep] >= threshold if threshold is not None else np.zeros(int(keep.sum()), bool)
            units.append({"unit": unit, "frames": int(keep.sum()), "positives": int(a.label[keep].sum()),
                          "detected": int((ill & (a.label[keep] == 1)).sum()),
                          "false_alarms": int((ill & (a.label[keep] == 0)).sum()),
                          "label": int(a.label[keep].max()), "score": float(a.score[keep].max())})
        label = np.asarray([u["label"] for u in units], dtype=np.float64)
        score = np.asarray([u["score"] for u in units])
        out["level"] = {"figures": _level_figures(label, score, threshold), "units": units}
    return out

