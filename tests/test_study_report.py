"""The per-study HTML report: studies from the frame naming, findings, ranking, counts, self-contained page."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medgain.handlers import HeatmapWriter, StudyReportWriter
from medgain.reports import FrameResult, StudyIndex, build_study_report, flagged_runs, score_plot_svg

THRESHOLD = 2.0


def _frame(score: float, decision: int | None = None, file: str = "f.png", frame: int = 0) -> FrameResult:
    if decision is None:
        decision = int(score >= THRESHOLD)
    return FrameResult(file, frame, score, 1.0 / (1.0 + math.exp(-score)), decision)


def test_flagged_runs():
    assert flagged_runs([False, True, True, False, True]) == [(1, 2), (4, 4)]
    assert flagged_runs([]) == []
    assert flagged_runs([True, True]) == [(0, 1)]


def test_findings_group_consecutive_frames_best_first_ranked_by_best_score():
    # lesion A over frames 3-5 (best at 4), lesion B at frame 10 alone but higher than A's best
    scores = [-3.0, -2.5, 0.0, 2.5, 4.0, 3.0, -1.0, -2.0, -3.0, 1.9, 6.0, -4.0]
    report = build_study_report("s", [_frame(s) for s in scores], threshold=THRESHOLD)
    assert report.flagged == 4
    assert [(g.start, g.end) for g in report.findings] == [(10, 10), (3, 5)]
    assert report.findings[1].ranked == (4, 5, 3)
    assert report.suspicious == ()


def test_top_k_most_suspicious_when_nothing_is_flagged():
    scores = [-3.0, 1.5, -2.0, 1.9, 0.5, -1.0]
    report = build_study_report("s", [_frame(s) for s in scores], threshold=THRESHOLD, top_k=3)
    assert report.findings == ()
    assert report.suspicious == (3, 1, 4)
    with pytest.raises(ValueError, match="top_k"):
        build_study_report("s", [], top_k=-1)


def test_study_index_from_frame_naming_folders_and_clips(tmp_path):
    root = tmp_path / "in"
    items = [
        {"image": str(root / "study0001_frame000.png"), "frame": 0},
        {"image": str(root / "study0001_frame001.png"), "frame": 0},
        {"image": str(root / "study0002_f7.jpg"), "frame": 0},
        {"image": str(root / "patientX" / "img_a.png"), "frame": 0},
        {"image": str(root / "clip.dcm"), "frame": 0},
        {"image": str(root / "clip.dcm"), "frame": 1},
        {"image": str(root / "loose.png"), "frame": 0},
    ]
    index = StudyIndex(items, root)
    assert [index.of(i["image"]) for i in items] == [
        "study0001", "study0001", "study0002", "patientX", "clip", "clip", "in",
    ]


def test_score_plot_draws_threshold_runs_and_keeps_a_single_high_frame():
    scores = [-2.0] * 5000
    scores[2500] = 8.0
    svg = score_plot_svg(scores, THRESHOLD, [(2500, 2500)])
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count('class="run"') == 1 and "operating point" in svg
    points = re.search(r'points="([^"]+)"', svg).group(1).split()
    assert len(points) < 2 * 1000  # drawn per pixel, not per frame
    ys = [float(p.split(",")[1]) for p in points]
    assert min(ys) < max(ys) - 100  # the one high frame is still drawn


def _write_study_run(tmp_path: Path) -> tuple[Path, Path, list[dict], HeatmapWriter, Path]:
    """A run's outputs for three synthetic studies with known lesions, as the bundle's handlers write them."""
    root, out = tmp_path / "frames", tmp_path / "out"
    root.mkdir()
    lesions = {"study0001": [(4, 6), (15, 15)], "study0002": []}  # flagged runs (inclusive) per study
    scores = {"study0001": [-3.0 + 0.01 * i for i in range(20)], "study0002": [-3.0 + 0.1 * i for i in range(10)]}
    scores["study0001"][4:7] = [2.5, 5.0, 3.0]
    scores["study0001"][15] = 4.0
    scores["study0002"][7] = 1.5  # suspicious, not flagged
    items, rows = [], []
    writer = HeatmapWriter(str(out), num_threads=0)
    writer.output_dir.mkdir(parents=True)
    for study, values in scores.items():
        for i, score in enumerate(values):
            path = str(root / f"{study}_frame{i:03d}.png")
            items.append({"image": path, "frame": 0})
            decision = int(score >= THRESHOLD)
            rows.append([path, 0, repr(score), f"{1 / (1 + math.exp(-score)):.6g}", decision])
            Image.fromarray(np.full((8, 8, 3), 40 + 10 * i, np.uint8)).save(
                writer.output_dir / f"{writer.file_stem(path)}_f0.png")
    broken = str(root / "study0003_frame000.png")
    items_refused = [broken]
    with (out / "predictions.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["file", "frame", "score", "probability", "decision"], *rows])
    with (out / "errors.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["file", "reason"], *[[p, f"{p}: cannot read image header (truncated)"]
                                                         for p in items_refused]])
    checkpoint = tmp_path / "model.pt"
    torch.save({"model": {}, "epoch": 7, "provenance": {"model_name": "capsule", "model_version": "3"},
                "operating_point": {"threshold": THRESHOLD, "max_fpr": 0.001, "negatives": 3000, "false_alarms": 0,
                                    "unit": "normal frames"}}, checkpoint)
    assert lesions  # documented above: the runs the report must find
    return root, out, items, writer, checkpoint


def test_study_report_pages_rank_count_group_and_embed(tmp_path):
    root, out, items, writer, checkpoint = _write_study_run(tmp_path)
    handler = StudyReportWriter(str(out), StudyIndex(items, root), str(checkpoint), heatmap_writer=writer, top_k=3)
    pages = handler()
    assert sorted(pages) == ["study0001", "study0002", "study0003"]
    assert pages["study0001"] == out / "studies" / "study0001" / "study_report.html"

    one = pages["study0001"].read_text()
    assert "http://" not in one.replace("http://www.w3.org/2000/svg", "") and "https://" not in one
    assert re.search(r"frames read</td><td><b>20<", one) and re.search(r"flagged ill</td><td><b>4</b> in <b>2<", one)
    assert re.search(r"refused \(no score\)</td><td><b>0<", one)
    assert "capsule version 3, epoch 7, file sha256 " in one
    assert "within the 0.1 % budget" in one  # the operating point's false-alarm bound, in words
    # findings by best score: frames 4-6 (best 5.0 at frame 5) before frame 15 (4.0); best frame first
    assert one.index("Finding 1: frames 4–6") < one.index("Finding 2: frame 15 ")
    ranks = re.findall(r"<b>finding (\d), (best|#\d)</b><br>frame index <b>(\d+)</b>", one)
    assert ranks == [("1", "best", "5"), ("1", "#2", "6"), ("1", "#3", "4"), ("2", "best", "15")]
    assert one.count("data:image/jpeg;base64,") == 4 and one.count('class="run"') == 2

    two = pages["study0002"].read_text()
    assert "No finding: the 3 most suspicious frames" in two
    assert re.findall(r"<b>#(\d) by score</b><br>frame index <b>(\d+)</b>", two) == [("1", "7"), ("2", "9"),
                                                                                     ("3", "8")]
    three = pages["study0003"].read_text()
    assert re.search(r"frames read</td><td><b>1<", three) and re.search(r"refused \(no score\)</td><td><b>1<", three)
    assert "cannot read image header (truncated)" in three


def test_study_report_without_operating_point_ranks_without_deciding(tmp_path):
    root, out, items, writer, checkpoint = _write_study_run(tmp_path)
    torch.save({"model": {}, "operating_point": {"threshold": None, "reason": "one class"}}, checkpoint)
    pages = StudyReportWriter(str(out), StudyIndex(items, root), str(checkpoint), top_k=2)()
    page = pages["study0002"].read_text()
    assert "this model takes no decision" in page and "unregistered model" in page
    assert "no overlay written for this frame" in page  # no heatmap writer given: no picture
