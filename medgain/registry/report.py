"""The reviewer's report as ONE self-contained HTML file: every image inlined (base64 PNG), no script, no
stylesheet or font from elsewhere, so it opens offline in any browser and can be archived as it is."""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from medgain.metrics import roc_curve

__all__ = ["metric_words", "render_report"]

_STYLE = """
body{font-family:sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}.bad{color:#b00;font-weight:bold}.good{color:#070}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #ccc;padding:4px;font-size:12px}
.note{color:#666;font-size:12px}img.plot{max-width:640px;margin-right:12px}
.warn{background:#fff3cd;border:1px solid #e0b800;padding:6px 10px;font-size:13px}
abbr{text-decoration:none;border-bottom:1px dotted #888;cursor:help}
"""

_WORDS = {
    "auc": "area under the ROC curve (AUC)",
    "iou": "overlap of attention and lesion (IoU)",
    "attention_in_mask": "share of attention on the lesion",
    "attention_outside_fov": "share of attention outside the field of view",
    "sensitivity": "sensitivity at the stored operating point",
    "specificity": "specificity at the stored operating point",
    "fpr_above_bound": "false-alarm rate above the operating point's stored bound",
    "operating_point_fpr_upper": "stored upper bound on the false-alarm rate",
    "comparison": "comparison",
}
_BUDGET = re.compile(r"(retuned_)?tpr_at_fpr_([0-9.e-]+)")


def _esc(value: Any) -> str:
    return html.escape(str(value))


def metric_words(key: str, split: str | None = None) -> str:
    """A metric key in words, e.g. ``test_tpr_at_fpr_0.0005`` → "sensitivity at 0.05 % false alarms".

    Args:
        key: the metric's key, with or without the ``<split>_`` prefix.
        split: the prefix to strip.

    Returns:
        the words; an unknown key with its underscores as spaces.
    """
    name = key[len(split) + 1 :] if split and key.startswith(f"{split}_") else key
    match = _BUDGET.fullmatch(name)
    if match:
        words = f"sensitivity at {100.0 * float(match.group(2)):g} % false alarms"
        return words + (" (threshold re-tuned on this split)" if match.group(1) else "")
    return _WORDS.get(name, name.replace("_", " "))


def _named(key: str, split: str | None = None) -> str:
    """The metric in words, its key in a tooltip."""
    return f"<abbr title='{_esc(key)}'>{_esc(metric_words(key, split))}</abbr>"


def _plural(unit: str) -> str:
    return unit[:-1] + "ies" if unit.endswith("y") and unit[-2:-1] not in "aeiou" else unit + "s"


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _esc(value)


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _img_file(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    head = "".join(f"<th class='l'>{_esc(h)}</th>" if i < left else f"<th>{_esc(h)}</th>" for i, h in enumerate(header))
    body = ""
    for row in rows:
        body += "<tr>" + "".join(f"<td class='l'>{c}</td>" if i < left else f"<td>{c}</td>" for i, c in enumerate(row))
        body += "</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _roc_plot(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], points: Mapping[str, tuple[float, float]]) -> str:
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots(gridspec_kw={"left": 0.11, "right": 0.97, "bottom": 0.12, "top": 0.92})
    for name, (score, label) in curves.items():
        if 0 < label.sum() < label.size:
            fpr, tpr, _ = roc_curve(score, label)
            ax.step(np.asarray(fpr), np.asarray(tpr), where="post", label=name)
    for name, (fpr, tpr) in points.items():
        ax.plot([fpr], [tpr], "*", markersize=12, label=name)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set(xlabel="false-positive rate (symlog)", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.02), title="ROC")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def _calibration_plot(bins: Sequence[Mapping[str, Any]]) -> str:
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.subplots(gridspec_kw={"left": 0.15, "right": 0.96, "bottom": 0.12, "top": 0.92})
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], "o-", label="model")
    ax.set(xlabel="mean predicted p(ill)", ylabel="observed fraction ill", xlim=(0, 1), ylim=(0, 1),
           title="calibration")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def _confusion_plot(counts: Mapping[str, int]) -> str:
    fig = Figure(figsize=(3.8, 3.4))
    ax = fig.subplots(gridspec_kw={"left": 0.2, "right": 0.95, "bottom": 0.17, "top": 0.9})
    grid = np.asarray([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]])
    ax.imshow(grid, cmap="Blues")
    for (r, c), value in np.ndenumerate(grid):
        ax.text(c, r, str(value), ha="center", va="center", fontsize=14,
                color="white" if value > grid.max() / 2 else "black")
    ax.set_xticks([0, 1], ["healthy", "ill"])
    ax.set_yticks([0, 1], ["healthy", "ill"])
    ax.set(xlabel="decision", ylabel="truth", title="at the stored operating point")
    return _png(fig)


def _metrics_section(figures: Mapping[str, Mapping[str, float]], split: str) -> str:
    rows = [[_named(f"{split}_{name}", split), _num(f["value"]), f"[{_num(f['low'])}, {_num(f['high'])}]"]
            for name, f in figures.items()]
    return _table(["metric", "value", "95 % CI"], rows)


def _colour_bar(scale: float) -> str:
    fig = Figure(figsize=(5.0, 0.95))
    ax = fig.subplots(gridspec_kw={"left": 0.04, "right": 0.96, "bottom": 0.6, "top": 0.92})
    fig.colorbar(ScalarMappable(norm=Normalize(0.0, scale), cmap=matplotlib.colormaps["jet"]), cax=ax,
                 orientation="horizontal", label="Grad-CAM, one scale for all gallery frames")
    return _png(fig)


#: gallery categories: title, key of their count in the confusion table, which frames are shown
_KINDS = {
    "true_positive": ("True positives (lesions found)", "tp", "most confident"),
    "false_negative": ("False negatives (missed lesions)", "fn", "lowest-scored"),
    "false_positive": ("False positives (false alarms)", "fp", "most confident"),
}


def _gallery(gallery: Mapping[str, Any], folder: Path) -> str:
    parts = []
    counts = gallery.get("counts") or {}
    for kind, (title, key, which) in _KINDS.items():
        cards = []
        for frame in gallery.get(kind, []):
            iou = "" if frame["iou"] is None else f" · IoU {frame['iou']:.3f}"
            cards.append(
                f"<div class='card'><img alt='{_esc(frame['ref'])}' src='{_img_file(folder / (frame['ref'] + '.png'))}'>"
                f"<br>{_esc(frame['ref'])}<br>p(ill) {frame['probability']:.4f}{iou}</div>"
            )
        body = "".join(cards) or "<p class='note'>none</p>"
        total = counts.get(key, len(cards))
        shown = f"; the {len(cards)} {which} shown" if len(cards) < total else ""
        parts.append(f"<h3>{_esc(title)}: {total}{shown}</h3><div class='gallery'>{body}</div>")
    note = f"<p class='note'>{_esc(gallery['note'])}</p>" if gallery.get("note") else ""
    if gallery.get("scale") is not None:
        note += (f"<p class='note'>Left: the frame; right: its Grad-CAM, {_esc(gallery['scale_note'])}. White line: "
                 "the lesion mask; grey line: the field of view.</p>"
                 f"<img class='plot' alt='colour bar' src='{_colour_bar(float(gallery['scale']))}'>")
    return note + "".join(parts)


def _fov_section(fov: Mapping[str, Any] | None, split: str) -> str:
    if fov is None:
        return "<p class='note'>This model's bundle defines no field of view: not measured.</p>"
    out = []
    mean = 100.0 * fov["mean_outside"]
    if fov["high"]:
        out.append(f"<p class='warn'>On average {mean:.0f} % of the attention on the {_esc(split)} split lies outside "
                   f"the field of view (above {100.0 * fov['warning_level']:.0f} %): the model looks at the dark "
                   "border, where there is no tissue. Treat its attention maps as artefacts, not findings.</p>")
    else:
        out.append(f"<p>On average {mean:.1f} % of the attention lies outside the field of view.</p>")
    n, rows = fov["n_peak_outside"], fov["peak_outside"]
    out.append(f"<h3>Frames whose attention peak lies outside the field of view: {n} of {fov['n_frames']}"
               f"{'; the ' + str(len(rows)) + ' with the most attention outside shown' if len(rows) < n else ''}</h3>")
    if rows:
        out.append(_table(["frame", "label", "p(ill)", "attention outside"],
                          [[_esc(r["ref"]), "ill" if r["label"] else "healthy", _num(r["probability"]),
                            f"{100.0 * r['outside']:.0f} %"] for r in rows]))
    return "".join(out)


def render_report(review: Mapping[str, Any], work: Path) -> str:
    """The HTML text of a review (see :func:`medgain.registry.review.review_model`).

    Args:
        review: the review dict (model card, figures, tables, comparison), as written to ``review.json``.
        work: the review's work folder: ``candidate/`` (and ``champion/``) with ``records.csv`` scores already in
            ``review`` and the gallery images under ``candidate/gallery/``.
    """
    card, split = review["model_card"], review["split"]
    title = f"Review of {card['model']} version {card['version']}"
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_esc(title)}</title>",
           f"<style>{_STYLE}</style></head><body><h1>{_esc(title)}</h1>",
           f"<p class='note'>Split <b>{_esc(split)}</b> of data {_esc(review['data_hash'])}, reviewed "
           f"{_esc(review['time'])}. Frames and studies are named by salted pseudonyms.</p>"]
    out.append("<h2>Model card</h2>")
    out.append(_table(["field", "value"], [[_esc(k), _esc(v)] for k, v in card.items() if k != "training_params"], 2))
    params = card.get("training_params", {})
    if params:
        out.append("<details><summary>training parameters</summary>")
        rows = [[_esc(k), _esc(v)] for k, v in sorted(params.items())]
        out.append(_table(["parameter", "value"], rows, 2) + "</details>")
    out.append("<h2>Metrics (95 % bootstrap confidence intervals)</h2>")
    out.append(_metrics_section(review["figures"], split))
    out.append(f"<p class='note'>Resampled by {_esc(review['resampled_by'])}; {review['n_bootstrap']} resamples. "
               f"{review['counts']['frames']} frames, {review['counts']['positives']} ill.</p>")
    for name, note in review.get("notes", {}).items():
        out.append(f"<p class='note'>{_named(name, split)}: {_esc(note)}</p>")
    out.append("<h2>Operating points</h2>")
    stored = review.get("stored_operating_point")
    if stored:
        cls = "note" if stored["backed"] else "bad"
        out.append(f"<p class='{cls}'>Stored operating point: {_esc(stored['statement'])}.</p>")
    rows = [[_esc(r["budget"]), _num(r["threshold"]), _num(r["probability"], 6), _num(r["sensitivity"]),
             _num(r["specificity"]), _num(r["false_alarms_per_1000"], 2), _num(r["false_alarms_per_study"], 2),
             _esc(r["note"] or "")] for r in review["operating_points"]]
    out.append(_table(["false-alarm budget", "threshold (log-odds)", "p(ill)", "sensitivity", "specificity",
                       "false alarms / 1,000", f"false alarms / {review.get('unit', 'study')}", "note"], rows))
    out.append("<p class='note'>Budget rows choose the threshold on this split (optimistic); the stored operating "
               "point is the one that ships with the model.</p>")
    scores = {name: (np.asarray(v["score"]), np.asarray(v["label"])) for name, v in review["curves"].items()}
    points = {f"{name} operating point": tuple(p) for name, p in review.get("curve_points", {}).items()}
    plots = [_roc_plot(scores, points), _calibration_plot(review["calibration"]["bins"])]
    if review.get("confusion"):
        plots.append(_confusion_plot(review["confusion"]))
    out.append("<h2>ROC, calibration, confusion matrix</h2><div>")
    out.extend(f"<img class='plot' alt='plot' src='{src}'>" for src in plots)
    out.append(f"</div><p class='note'>Expected calibration error {review['calibration']['ece']:.4f}.</p>")
    out.append("<h2>Attention gallery</h2>")
    out.append(_gallery(review["gallery"], work / "candidate" / "gallery"))
    out.append("<h2>Attention outside the field of view</h2>")
    out.append(_fov_section(review.get("attention_fov"), split))
    out.append("<h2>Subgroups</h2>")
    sub = review["subgroups"]
    if sub["level"] is not None:
        f = sub["level"]["figures"]
        unit = review.get("unit", "study")
        out.append(f"<h3>{unit.capitalize()} level ({f['n']} {_plural(unit)}, {f['positives']} with lesions; a {unit} "
                   "scores its highest frame)</h3>")
        out.append(_table(["AUC", "sensitivity", "specificity"],
                          [[_num(f["auc"]), _num(f.get("sensitivity")), _num(f.get("specificity"))]], left=0))
        rows = [[_esc(u["unit"]), u["frames"], u["positives"], u["detected"], u["false_alarms"]]
                for u in sub["level"]["units"][:50]]
        out.append(_table([unit, "frames", "ill frames", "detected", "false alarms"], rows))
    for field, table in sub["subgroups"].items():
        rows = [[_esc(level), f["n"], f["positives"], _num(f["auc"]), _num(f.get("sensitivity")),
                 _num(f.get("specificity"))] for level, f in table.items()]
        out.append(f"<h3>{_esc(field)}</h3>" + _table([field, "frames", "ill", "AUC", "sensitivity", "specificity"], rows))
    if sub["level"] is None and not sub["subgroups"]:
        out.append("<p class='note'>The datalist carries no subgroup field.</p>")
    comparison = review.get("comparison")
    if comparison:
        out.append(f"<h2>Against {_esc(comparison['alias'])} (version {_esc(comparison['version'])})</h2>")
        rows = []
        for name, f in comparison["figures"].items():
            worse = f["high"] < 0
            cls = "bad" if worse else ("good" if f["low"] > 0 else "")
            rows.append([_named(f"{split}_{name}", split), _num(f["candidate"]), _num(f["champion"]),
                         f"<span class='{cls}'>{_num(f['value'])}</span>", f"[{_num(f['low'])}, {_num(f['high'])}]"])
        out.append(_table(["metric", "candidate", "champion", "difference", "95 % CI"], rows))
        if not comparison.get("decisions", True):
            out.append(f"<p class='warn'>{_esc(comparison['note'])}</p>")
        else:
            yes = {0: "healthy", 1: "ILL"}
            rows = [[_esc(d["ref"]), yes[d["label"]], _num(d["candidate_probability"]), yes[d["candidate_decision"]],
                     _num(d["champion_probability"]), yes[d["champion_decision"]]] for d in comparison["disagreements"]]
            n_dis = comparison["n_disagreements"]
            out.append(f"<h3>Frames where the two decide differently: {n_dis}"
                       f"{'; the first ' + str(len(rows)) + ' shown' if len(rows) < n_dis else ''}</h3>")
            if rows:
                out.append(_table(["frame", "truth", "candidate p(ill)", "candidate decision", "champion p(ill)",
                                   "champion decision"], rows))
    out.append("</body></html>")
    return "\n".join(out)
