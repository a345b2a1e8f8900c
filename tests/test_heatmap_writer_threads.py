"""HeatmapWriter's thread pool: the same files as writing in the engine's thread, every one on disk at the end of
the run, write errors raised."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Engine

from medgain.handlers import HeatmapWriter


def _run(writer: HeatmapWriter, n_batches: int = 3, batch: int = 4) -> None:
    """An engine whose batches carry paths / frames and whose outputs carry images and raw cams."""
    g = torch.Generator().manual_seed(0)
    data = [
        {"image_path": [f"/study/frame{b * batch + i}.png" for i in range(batch)], "frame": torch.zeros(batch).long()}
        for b in range(n_batches)
    ]

    def step(engine: Engine, batch_data: dict) -> dict[str, torch.Tensor]:
        return {"image": torch.rand(batch, 3, 16, 16, generator=g), "cam": torch.rand(batch, 1, 16, 16, generator=g)}

    engine = Engine(step)
    writer.attach(engine)
    engine.run(data)


def test_threaded_writer_writes_the_same_files_by_the_end_of_the_run(tmp_path: Path) -> None:
    _run(HeatmapWriter(str(tmp_path / "inline"), num_threads=0))
    _run(HeatmapWriter(str(tmp_path / "threads"), num_threads=3))
    inline = sorted((tmp_path / "inline" / "heatmaps").iterdir())
    threaded = sorted((tmp_path / "threads" / "heatmaps").iterdir())
    assert [p.name for p in inline] == [p.name for p in threaded]
    assert len(inline) == 2 * 12
    for a, b in zip(inline, threaded):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_threaded_writer_raises_write_errors(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "heatmaps").mkdir(parents=True)
    (out / "heatmaps" / "frame1_f0.png").mkdir()  # a folder where a file must go
    with pytest.raises(OSError):
        _run(HeatmapWriter(str(out), num_threads=2))


@pytest.mark.parametrize("kwargs", [{"num_threads": -1}, {"num_threads": 1.5}, {"compress_level": 10}])
def test_writer_rejects_bad_settings(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError, match="HeatmapWriter"):
        HeatmapWriter(str(tmp_path), **kwargs)
