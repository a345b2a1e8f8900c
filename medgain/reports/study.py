"""The study report: one self-contained HTML page per capsule study, ranked for the physician who reads it.

A study is a video: the frames of one multi-frame file (a clip), or the single-frame files of one folder whose
names follow ``<video>_<frame number>`` (``<video>_frame012.png``, ``<video>_f12.png``, ``<video>_12.png``:
one study per ``<video>``), or the other files of one folder (one study per folder). Its frames are in data
order (files sorted by path, a clip's frames in order); the *frame index* of the report is the position along
that order.

The page shows the score along the video (an inline SVG: the operating point as a line, runs of flagged frames
shaded); the counts (frames scored, flagged, refused with the reasons of ``errors.csv``); the model and its
operating point with what its false-alarm rate is known to be; the flagged frames grouped into findings (a run of
consecutive flagged frames is one lesion seen over several frames) ranked by their best score, each finding's best
frame first; and, when no frame is flagged, the ``top_k`` most suspicious frames. Overlays are embedded (JPEG,
base64): the page needs no network, no server and no other file.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from medgain.metrics.confidence import operating_point_words
from medgain.outputs import write_atomic

__all__ = [
    "DEFAULT_TOP_K",
    "Finding",
    "FrameResult",
    "StudyIndex",
    "StudyReport",
    "build_study_report",
    "flagged_runs",
    "render_study_report",
    "score_plot_svg",
    "write_study_reports",
]

DEFAULT_TOP_K = 12
"""Frames shown (and given heatmaps) as the most suspicious of a study beside its flagged ones."""

_FRAME_NAME = re.compile(r"^(.+)_(?:frame|f)?\d+$", re.IGNORECASE)


class StudyIndex:
    """Which study each input file belongs to (see the module docstring for the rule).

    Args:
        items: the inference items, ``{"image": path, "frame": i}`` one per frame
            (:func:`medgain.data.scan_folder`); a file with several items is a clip, a study of its own.
        root: the input folder; study names are relative to it (the folder's own name for its top-level files).
        image_key: item key of the file path.
    """

    def __init__(self, items: Sequence[Mapping[str, Any]], root: str | os.PathLike, image_key: str = "image") -> None:
        self.root = Path(root)
        counts = Counter(str(item[image_key]) for item in items)
        self._clips = {path for path, n in counts.items() if n > 1}

    def of(self, path: str) -> str:
        """The study of the file ``path`` (as the items name it)."""
        rel = Path(os.path.relpath(path, self.root))
        if rel.parts and rel.parts[0] == "..":
            rel = Path(path).resolve()
        if str(path) in self._clips:
            return rel.with_suffix("").as_posix()
        folder = rel.parent.as_posix()
        match = _FRAME_NAME.match(rel.stem)
        if match:
            return match.group(1) if folder == "." else f"{folder}/{match.group(1)}"
        return (self.root.resolve().name or "input") if folder == "." else folder


@dataclass(frozen=True)
class FrameResult:
    """One scored frame: source file and frame within it, log-odds, p(ill), decision (1 ill, 0 not, None when
    the model has no operating point) and its overlay PNG (None when none was written)."""

    file: str
    frame: int
    score: float
    probability: float
    decision: int | None
    overlay: Path | None = None


@dataclass(frozen=True)
class Finding:
    """A run of consecutive flagged frames: positions ``start`` … ``end`` (inclusive) along the study, and
    ``ranked``, the run's positions by decreasing score (the best frame first)."""

    start: int
    end: int
    ranked: tuple[int, ...]


@dataclass(frozen=True)
class StudyReport:
    """What the page of one study shows.

    Attributes:
        study: study name.
        frames: its scored frames in data order (position = frame index of the report).
        refused: ``(file, reason)`` of its inputs that got no score (``errors.csv`` rows).
        threshold: decision threshold on the log-odds; None when the model has no operating point.
        findings: the runs of flagged frames, by decreasing best score.
        suspicious: when nothing is flagged, the positions of the ``top_k`` highest scores (decreasing); else ().
    """

    study: str
    frames: tuple[FrameResult, ...]
    refused: tuple[tuple[str, str], ...]
    threshold: float | None
    findings: tuple[Finding, ...]
    suspicious: tuple[int, ...]

    @property
    def flagged(self) -> int:
        """Number of flagged frames."""
        return sum(1 for f in self.frames if f.decision == 1)


def flagged_runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """The ``(start, end)`` positions (inclusive) of each run of consecutive True values."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i - 1))
            start = None
    return runs


def _by_score(frames: Sequence[FrameResult], positions: Sequence[int]) -> tuple[int, ...]:
    """Positions by decreasing score, ties by position (deterministic)."""
    return tuple(sorted(positions, key=lambda i: (-frames[i].score, i)))


def build_study_report(
    study: str,
    frames: Sequence[FrameResult],
    refused: Sequence[tuple[str, str]] = (),
    threshold: float | None = None,
    top_k: int = DEFAULT_TOP_K,
) -> StudyReport:
    """Group the flagged frames of one study into findings and rank them.

    Args:
        study: study name.
        frames: its scored frames in data order.
        refused: ``(file, reason)`` of its inputs that got no score.
        threshold: the decision threshold on the log-odds (None: the model takes no decision).
        top_k: frames shown as the most suspicious when none is flagged.

    Raises:
        ValueError: for a negative ``top_k``.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"study report: top_k must be a non-negative integer, got {top_k!r}")
    frames = tuple(frames)
    findings = [
        Finding(start, end, _by_score(frames, range(start, end + 1)))
        for start, end in flagged_runs([f.decision == 1 for f in frames])
    ]
    findings.sort(key=lambda g: (-frames[g.ranked[0]].score, g.start))
    suspicious = () if findings else _by_score(frames, range(len(frames)))[:top_k]
    return StudyReport(study, frames, tuple(refused), threshold, tuple(findings), suspicious)


def _nice_step(n: int, most: int = 8) -> int:
    """The smallest step of 1, 2 or 5 times a power of ten that puts at most ``most`` ticks on ``n`` frames."""
    power = 1
    while True:
        for factor in (1, 2, 5):
            if n <= factor * power * most:
                return factor * power
        power *= 10


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = (hi - lo) / max(n - 1, 1)
    return [lo + i * step for i in range(n)]


def score_plot_svg(
    scores: Sequence[float],
    threshold: float | None,
    runs: Sequence[tuple[int, int]] = (),
    width: int = 1000,
    height: int = 240,
) -> str:
    """The score along the video as an inline SVG: frame index on x, log-odds on y (ticks also in p(ill)), the
    operating point as a dashed red line, runs of flagged frames shaded. A long study is drawn as the per-pixel
    minimum and maximum of its scores, so that no single high frame is lost.

    Args:
        scores: log-odds of the frames in data order.
        threshold: the operating point on the log-odds, or None.
        runs: ``(start, end)`` positions of the flagged runs.
        width: picture width in pixels.
        height: picture height in pixels.
    """
    left, right, top, bottom = 130, 20, 14, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    n = len(scores)
    values = [*scores, *([threshold] if threshold is not None else [])]
    lo, hi = (min(values), max(values)) if values else (-1.0, 1.0)
    pad = (hi - lo) * 0.08 if hi > lo else 0.5
    lo, hi = lo - pad, hi + pad

    def x_at(position: float) -> float:
        return left + plot_w * position / max(n, 1)

    def y_at(score: float) -> float:
        return top + plot_h * (hi - score) / (hi - lo)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'role="img" aria-label="score along the video">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#999"/>',
    ]
    for start, end in runs:
        x0, x1 = x_at(start), x_at(end + 1)
        parts.append(f'<rect class="run" x="{x0:.1f}" y="{top}" width="{max(x1 - x0, 4.0):.1f}" height="{plot_h}" '
                     'fill="#f4a259" fill-opacity="0.55"/>')
    for value in _ticks(lo, hi):
        y = y_at(value)
        p = 1.0 / (1.0 + math.exp(-max(min(value, 700.0), -700.0)))
        parts.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#666"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{value:.3g} '
                     f'(p {p:.3g})</text>')
    for value in range(0, n, _nice_step(n)):
        x = x_at(value + 0.5)
        parts.append(f'<line x1="{x:.1f}" y1="{top + plot_h}" x2="{x:.1f}" y2="{top + plot_h + 4}" stroke="#666"/>'
                     f'<text x="{x:.1f}" y="{top + plot_h + 16}" font-size="11" text-anchor="middle">{value}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 3}" font-size="12" text-anchor="middle">'
                 'frame index</text>')
    if n:
        bins = max(1, min(n, plot_w))
        points = []
        for b in range(bins):
            chunk = scores[b * n // bins : (b + 1) * n // bins] or scores[b * n // bins : b * n // bins + 1]
            x = x_at((b + 0.5) * n / bins)
            points += [f"{x:.1f},{y_at(max(chunk)):.1f}"] + ([f"{x:.1f},{y_at(min(chunk)):.1f}"] if len(chunk) > 1
                                                              else [])
        parts.append(f'<polyline fill="none" stroke="#1f4e79" stroke-width="1.2" points="{" ".join(points)}"/>')
    if threshold is not None:
        y = y_at(threshold)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#c00" '
                     'stroke-dasharray="6 4" stroke-width="1.5"/>'
                     f'<text x="{left + plot_w - 4}" y="{y - 4:.1f}" font-size="11" fill="#c00" text-anchor="end">'
                     'operating point</text>')
    parts.append("</svg>")
    return "".join(parts)


def _embedded(path: Path | None) -> str:
    """An overlay as a ``data:`` URI (JPEG, quality 90), or "" when there is none."""
    if path is None or not path.is_file():
        return ""
    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _decision_words(decision: int | None) -> str:
    return {1: "ill: above the operating point", 0: "below the operating point"}.get(decision, "no decision")


def _frame_card(report: StudyReport, position: int, rank: str, embed: bool) -> str:
    frame = report.frames[position]
    src = _embedded(frame.overlay) if embed else ""
    picture = (f'<img src="{src}" alt="overlay of frame {position}">' if src
               else '<div class="noimg">no overlay written for this frame</div>')
    source = html.escape(Path(frame.file).name) + (f", frame {frame.frame}" if frame.frame else "")
    return (f'<div class="card{" best" if rank.endswith("best") else ""}">{picture}<div class="meta">'
            f'<b>{html.escape(rank)}</b><br>frame index <b>{position}</b><br>p(ill) <b>{frame.probability:.4g}</b> '
            f'(log-odds {frame.score:.3g})<br>{_decision_words(frame.decision)}<br>'
            f'<span class="src">{source}</span></div></div>')


_STYLE = """
body{font-family:system-ui,Arial,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
table.counts td{padding:2px 14px 2px 0} table.counts td:first-child{white-space:nowrap} .note{color:#555;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px} .card{border:1px solid #ccc;padding:6px;width:300px;font-size:13px}
.card.best{border:2px solid #c00} .card img{width:100%;height:auto;display:block}
.noimg{width:100%;height:60px;background:#eee;color:#777;font-size:12px;padding:6px;box-sizing:border-box}
.src{color:#777;font-size:11px;word-break:break-all} table.refused td{padding:2px 10px;vertical-align:top}
.finding{margin-bottom:18px}
"""


def render_study_report(
    report: StudyReport,
    model: str,
    operating_point: Mapping[str, Any] | None,
    max_images: int = 120,
) -> str:
    """The HTML page of one study (see the module docstring).

    Args:
        report: what to show (:func:`build_study_report`).
        model: the model used, in words (name and version, or the model file's checksum).
        operating_point: the model file's operating point (:func:`medgain.model_file.load_operating_point`),
            or None when it has none; its false-alarm bound is stated with
            :func:`~medgain.metrics.confidence.operating_point_words`.
        max_images: overlays embedded at most (by rank); further frames are listed without their picture.
    """
    e = html.escape
    n_flagged = report.flagged
    if report.threshold is None:
        point_text = "none: this model takes no decision, frames are only ranked by score"
    else:
        p = 1.0 / (1.0 + math.exp(-report.threshold))
        point_text = f"log-odds ≥ {report.threshold:.4g} (p(ill) ≥ {p:.4g})"
        if operating_point is not None:
            point_text += f"; {operating_point_words(operating_point)}"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Study report: {e(report.study)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Study {e(report.study)}</h1>",
        "<p class='note'>Research and development only, not a medical device. Frames are ranked by the model's "
        "score; every frame the model did not flag is still part of the study.</p>",
        "<table class='counts'>",
        f"<tr><td>frames read</td><td><b>{len(report.frames) + len(report.refused)}</b></td></tr>",
        f"<tr><td>frames scored</td><td><b>{len(report.frames)}</b></td></tr>",
        f"<tr><td>flagged ill</td><td><b>{n_flagged}</b> in <b>{len(report.findings)}</b> finding(s)</td></tr>",
        f"<tr><td>refused (no score)</td><td><b>{len(report.refused)}</b></td></tr>",
        f"<tr><td>model</td><td>{e(model)}</td></tr>",
        f"<tr><td>operating point</td><td>{e(point_text)}</td></tr></table>",
        "<h2>Score along the video</h2>",
        score_plot_svg([f.score for f in report.frames], report.threshold,
                       [(g.start, g.end) for g in report.findings]),
        "<p class='note'>Blue: the score of each frame (log-odds of ill; p(ill) in brackets). Dashed red: the "
        "operating point. Shaded: runs of flagged frames.</p>",
    ]
    shown = 0
    if report.findings:
        parts.append(f"<h2>Findings ({len(report.findings)}), by best score</h2>")
        for number, finding in enumerate(report.findings, 1):
            length = finding.end - finding.start + 1
            best = report.frames[finding.ranked[0]]
            span = f"frame {finding.start}" if length == 1 else f"frames {finding.start}–{finding.end}"
            parts.append(f"<div class='finding'><h3>Finding {number}: {span} ({length} frame"
                         f"{'s' if length > 1 else ''}), best p(ill) {best.probability:.4g}</h3><div class='cards'>")
            for rank, position in enumerate(finding.ranked):
                label = f"finding {number}, best" if rank == 0 else f"finding {number}, #{rank + 1}"
                parts.append(_frame_card(report, position, label, shown < max_images))
                shown += 1
            parts.append("</div></div>")
    elif report.suspicious:
        why = "No frame is above the operating point" if report.threshold is not None else "No decision is taken"
        parts.append(f"<h2>No finding: the {len(report.suspicious)} most suspicious frames</h2>"
                     f"<p class='note'>{why}; these are the highest scores of the study, for a look.</p>"
                     "<div class='cards'>")
        for rank, position in enumerate(report.suspicious, 1):
            parts.append(_frame_card(report, position, f"#{rank} by score", shown < max_images))
            shown += 1
        parts.append("</div>")
    if report.refused:
        parts.append(f"<h2>Refused inputs ({len(report.refused)})</h2><table class='refused'>")
        parts += [f"<tr><td>{e(Path(file).name)}</td><td>{e(reason)}</td></tr>" for file, reason in report.refused]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _slug(study: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", study).strip("._") or "study"
    slug, n = base, 1
    while slug in taken:
        n += 1
        slug = f"{base}-{n}"
    taken.add(slug)
    return slug


def write_study_reports(
    output_dir: str | os.PathLike,
    studies: StudyIndex,
    model: str,
    operating_point: Mapping[str, Any] | None,
    overlay: Callable[[str, int], Path | None] | None = None,
    predictions_filename: str = "predictions.csv",
    errors_filename: str = "errors.csv",
    reports_dirname: str = "studies",
    top_k: int = DEFAULT_TOP_K,
    max_images: int = 120,
) -> dict[str, Path]:
    """Write ``output_dir/<reports_dirname>/<study>/study_report.html`` for every study of an inference run.

    Args:
        output_dir: the run's output folder (predictions and errors files).
        studies: the study of each input file.
        model: the model used, in words.
        operating_point: the model file's operating point, or None when it has none.
        overlay: the overlay PNG of ``(file, frame)``, or None when it has none; None: no overlays.
        predictions_filename: predictions CSV (``file, frame, score, probability, decision``).
        errors_filename: CSV of the refused inputs (``file, reason``).
        reports_dirname: folder of the reports inside ``output_dir``.
        top_k: frames shown as the most suspicious of a study without a flagged frame.
        max_images: overlays embedded per page at most.

    Returns:
        The page of each study, by study name. Each page is written through a temporary file and a rename.

    Raises:
        ValueError: naming the predictions file when a row lacks a column or holds a value that is not a number.
    """
    out = Path(output_dir)
    predictions = out / predictions_filename
    threshold = None if operating_point is None else operating_point.get("threshold")
    frames: dict[str, list[FrameResult]] = {}
    for line, row in enumerate(_read_csv(predictions), 2):
        try:
            file, frame = row["file"], int(row["frame"])
            decision = None if (row.get("decision") or "") == "" else int(row["decision"])
            result = FrameResult(file, frame, float(row["score"]), float(row["probability"]), decision,
                                 overlay(file, frame) if overlay is not None else None)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{predictions}: line {line} is not a prediction row ({err!r})") from None
        frames.setdefault(studies.of(file), []).append(result)
    refused: dict[str, list[tuple[str, str]]] = {}
    for row in _read_csv(out / errors_filename):
        refused.setdefault(studies.of(row.get("file", "")), []).append((row.get("file", ""), row.get("reason", "")))
    pages: dict[str, Path] = {}
    taken: set[str] = set()
    for study in sorted(set(frames) | set(refused)):
        report = build_study_report(study, frames.get(study, []), refused.get(study, []),
                                    None if threshold is None else float(threshold), top_k)
        content = render_study_report(report, model, operating_point, max_images).encode("utf-8")
        page = out / reports_dirname / _slug(study, taken) / "study_report.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        pages[study] = write_atomic(page, lambda f, c=content: f.write(c))
    return pages
