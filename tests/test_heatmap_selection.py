"""HeatmapWriter's frame selection: ``flagged`` keeps the frames at or above the operating point and each study's
top-K scores, ``all`` every frame, ``none`` no frame."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Engine

from medgain.handlers import HeatmapWriter
from medgain.reports import StudyIndex

THRESHOLD = 1.0


def _scores() -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(1)
    scores = {study: (torch.randn(20, generator=g) - 2.0).tolist() for study in ("studyA", "studyB")}
    scores["studyA"][5], scores["studyA"][6], scores["studyA"][17] = 2.0, 1.5, 3.0  # three flagged frames
    return scores  # studyB: none flagged (all below 1.0 with this seed)


def _run(writer: HeatmapWriter, batch: int = 4) -> list[str]:
    """An engine over both studies (frames interleaved in batches of ``batch``); returns the file paths."""
    scores = _scores()
    order = [(s, i) for i in range(20) for s in scores]  # studies interleaved: the top-K is per study anyway
    paths = [f"/in/{s}_frame{i:03d}.png" for s, i in order]
    values = [scores[s][i] for s, i in order]
    data = [
        {"image_path": paths[b : b + batch], "frame": torch.zeros(batch).long(),
         "score": torch.tensor(values[b : b + batch])}
        for b in range(0, len(paths), batch)
    ]

    def step(engine: Engine, batch_data: dict) -> dict[str, torch.Tensor]:
        n = len(batch_data["image_path"])
        pred = torch.stack([torch.zeros(n), batch_data["score"]], dim=1)  # log-odds of class 1 = the score
        return {"image": torch.rand(n, 3, 8, 8), "cam": torch.rand(n, 1, 8, 8), "pred": pred}

    engine = Engine(step)
    writer.attach(engine)
    engine.run(data)
    return paths


def _written(out: Path) -> set[str]:
    folder = out / "heatmaps"
    pngs = {p.name[: -len("_f0.png")] for p in folder.glob("*.png")} if folder.is_dir() else set()
    niftis = {p.name[: -len("_f0.nii.gz")] for p in folder.glob("*.nii.gz")} if folder.is_dir() else set()
    assert pngs == niftis
    return pngs


@pytest.mark.parametrize("num_threads", [0, 2])
def test_flagged_keeps_frames_above_the_operating_point_and_each_studys_top_k(tmp_path, num_threads):
    scores = _scores()
    assert max(scores["studyB"]) < THRESHOLD
    paths = _run(HeatmapWriter(str(tmp_path), num_threads=num_threads, select="flagged", threshold=THRESHOLD,
                               top_k=4, studies=StudyIndex([], "/in")))
    ranked = {s: sorted(range(20), key=lambda i: -v[i]) for s, v in scores.items()}
    expected = {f"{s}_frame{i:03d}" for s in scores for i in ranked[s][:4]}  # top-4 of each study
    expected |= {f"studyA_frame{i:03d}" for i in (5, 6, 17)}  # flagged (here already among studyA's top 4)
    assert _written(tmp_path) == expected
    assert len(paths) == 40


def test_flagged_keeps_every_flagged_frame_beyond_k(tmp_path):
    _run(HeatmapWriter(str(tmp_path), num_threads=0, select="flagged", threshold=THRESHOLD, top_k=1,
                       studies=StudyIndex([], "/in")))
    best_b = max(range(20), key=lambda i: _scores()["studyB"][i])
    assert _written(tmp_path) == {"studyA_frame005", "studyA_frame006", "studyA_frame017", f"studyB_frame{best_b:03d}"}


def test_all_and_none(tmp_path):
    _run(HeatmapWriter(str(tmp_path / "all"), num_threads=0, select="all"))
    _run(HeatmapWriter(str(tmp_path / "none"), num_threads=0, select="none"))
    assert len(_written(tmp_path / "all")) == 40
    assert _written(tmp_path / "none") == set()


@pytest.mark.parametrize("kwargs", [{"select": "some"}, {"top_k": -1}, {"threshold": 1.0, "checkpoint": "m.pt"}])
def test_selection_settings_are_checked(tmp_path, kwargs):
    with pytest.raises(ValueError, match="HeatmapWriter"):
        HeatmapWriter(str(tmp_path), **kwargs)
