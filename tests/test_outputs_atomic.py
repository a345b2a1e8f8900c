"""Outputs complete or absent, and announced (issue 20, section 4): writes through a temporary file and a
rename, failures naming the path, reruns that refuse to mix two runs, the end-of-run summary and progress."""

from __future__ import annotations

import builtins
import csv
import errno
import io
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_bad_inputs import tiny_model_file

from medgain.data import write_errors_csv
from medgain.demo import CAPSULE_BUNDLE, bundle_run
from medgain.handlers import HeatmapWriter, PredictionCSVWriter, RunSummary
from medgain.outputs import claim_output_dir


class _FullDisk:
    """A file whose every write fails as on a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """Make every file opened for writing under a chosen folder fail its writes (call with the folder)."""

    def arm(folder: Path) -> None:
        real_open = builtins.open

        def full_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            writing = any(c in mode for c in "wax+")
            inside = isinstance(file, (str, Path)) and Path(file).resolve().is_relative_to(folder.resolve())
            return _FullDisk(f) if writing and inside else f

        monkeypatch.setattr(builtins, "open", full_open)
        monkeypatch.setattr(io, "open", full_open)

    return arm


def _engine(paths: list[str], logits: list[list[float]], images: torch.Tensor | None = None) -> SimpleNamespace:
    output = {"pred": torch.tensor(logits)}
    if images is not None:
        output |= {"image": images, "cam": torch.rand(len(paths), 1, 4, 4)}
    batch = {"image_path": paths, "frame": torch.zeros(len(paths), dtype=torch.long)}
    return SimpleNamespace(state=SimpleNamespace(batch=batch, output=output))


def _write_predictions(folder: Path, paths: list[str]) -> PredictionCSVWriter:
    writer = PredictionCSVWriter(str(folder), threshold=0.0)
    engine = _engine(paths, [[0.0, 1.0]] * len(paths))
    writer.start(engine)
    writer(engine)
    writer.write(engine)
    return writer


def test_disk_full_keeps_the_previous_predictions_and_names_the_path(tmp_path, full_disk):
    _write_predictions(tmp_path, ["a.png", "b.png"])
    before = (tmp_path / "predictions.csv").read_bytes()
    full_disk(tmp_path)
    with pytest.raises(OSError, match=rf"{tmp_path / 'predictions.csv'}: cannot be written \(No space left"):
        _write_predictions(tmp_path, ["c.png"])
    assert (tmp_path / "predictions.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]  # no temporary file left


def test_disk_full_keeps_the_previous_errors_csv(tmp_path, full_disk):
    write_errors_csv([{"file": "x.png", "reason": "cannot decode image"}], tmp_path)
    before = (tmp_path / "errors.csv").read_bytes()
    full_disk(tmp_path)
    with pytest.raises(OSError, match=rf"{tmp_path / 'errors.csv'}: cannot be written"):
        write_errors_csv([], tmp_path)
    assert (tmp_path / "errors.csv").read_bytes() == before


def test_disk_full_leaves_no_half_heatmap(tmp_path, full_disk):
    writer = HeatmapWriter(str(tmp_path), num_threads=0)
    writer(_engine(["a.png"], [[0.0, 1.0]], torch.rand(1, 3, 4, 4)))
    maps = sorted((tmp_path / "heatmaps").iterdir())
    assert [p.name for p in maps] == ["a_f0.nii.gz", "a_f0.png"]
    before = {p.name: p.read_bytes() for p in maps}
    full_disk(tmp_path)
    with pytest.raises(OSError, match=r"heatmaps/a_f0\.png: cannot be written"):
        writer(_engine(["a.png"], [[0.0, 1.0]], torch.rand(1, 3, 4, 4)))
    assert {p.name: p.read_bytes() for p in (tmp_path / "heatmaps").iterdir()} == before


def test_claim_output_dir_refuses_an_earlier_run_unless_overwrite(tmp_path):
    names = ["predictions.csv", "errors.csv", "heatmaps"]
    fresh = claim_output_dir(tmp_path / "new", names)
    assert fresh.is_dir()
    (tmp_path / "new" / "heatmaps").mkdir()  # an empty folder is no earlier output
    claim_output_dir(tmp_path / "new", names)
    (tmp_path / "new" / "heatmaps" / "a_f0.png").write_bytes(b"png")
    (tmp_path / "new" / "predictions.csv").write_text("file\n")
    (tmp_path / "new" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"new: holds the outputs of an earlier run \(predictions\.csv, "
                                              r"heatmaps\); give another output folder, or --overwrite true"):
        claim_output_dir(tmp_path / "new", names)
    claim_output_dir(tmp_path / "new", names, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["notes.txt"]


def test_capsule_inference_rerun_refuses_or_overwrites(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(inputs / "a.png")
    model = tiny_model_file(tmp_path / "models" / "model.pt")
    out = tmp_path / "out"
    common = dict(bundle=CAPSULE_BUNDLE, bundle_root=tmp_path, input_dir=inputs, output_dir=out, checkpoint=model,
                  num_workers=0, capture_output=True)
    bundle_run("inference", ["inference.yaml"], **common)
    first = (out / "predictions.csv").read_bytes()
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(inputs / "b.png")
    refused = bundle_run("inference", ["inference.yaml"], check=False, **common)
    assert refused.returncode != 0 and "holds the outputs of an earlier run" in refused.stderr
    assert (out / "predictions.csv").read_bytes() == first  # untouched
    bundle_run("inference", ["inference.yaml"], overwrite=True, **common)
    with (out / "predictions.csv").open() as f:
        assert sorted(Path(r["file"]).name for r in csv.DictReader(f)) == ["a.png", "b.png"]
    assert sorted(p.name for p in (out / "heatmaps").glob("*.png")) == ["a_f0.png", "b_f0.png"]


def test_run_summary_logs_progress_and_the_summary(tmp_path, caplog):
    model = tiny_model_file(tmp_path / "model.pt", threshold=-1.0)
    (tmp_path / "predictions.csv").write_text("file,frame,score,probability,decision\n"
                                              "a.png,0,0.5,0.62,1\nb.png,0,-2,0.12,0\nc.png,0,-3,0.05,0\n")
    (tmp_path / "errors.csv").write_text("file,reason\nbad.dcm,non-finite pixel values\n")
    summary = RunSummary(str(tmp_path), name="evaluation", checkpoint=str(model), progress_percent=50)
    engine = SimpleNamespace(state=SimpleNamespace(epoch=1, epoch_length=4, iteration=0, batch={},
                                                   output={"pred": torch.zeros(1, 2)}))
    caplog.set_level(logging.INFO, logger="medgain.handlers.run_summary")
    summary.start(engine)
    for iteration in range(1, 4):
        engine.state.iteration = iteration
        summary(engine)
    engine.state.iteration = 4
    engine.state.output = {"pred": torch.zeros(0, 2)}
    summary(engine)
    result = summary.complete(engine)
    progress = [r.getMessage() for r in caplog.records if "batches" in r.getMessage()]
    assert [m.split(",")[0] for m in progress] == [
        "evaluation: 2 / 4 batches (50 %)", "evaluation: 4 / 4 batches (100 %)"
    ]
    assert result["frames_read"] == 3 and result["decided"] == 3 and result["flagged"] == 1 and result["refused"] == 1
    text = caplog.records[-1].getMessage()
    assert text.startswith("evaluation finished: 3 frames read, 3 decided (1 flagged ill), 1 refused (listed in ")
    assert "operating point: log-odds >= -1 (p(ill) >= 0.2689)" in text and text.endswith(f"outputs in {tmp_path}")
    assert (tmp_path / "run_summary.json").is_file()


def test_run_summary_without_an_engine_counts_the_slides(tmp_path, caplog):
    (tmp_path / "slides.csv").write_text("slide,path,score,probability\ns1,/d/s1.tif,0.3,0.57\ns2,/d/s2.tif,-1,0.27\n")
    (tmp_path / "errors.csv").write_text("file,reason\n/d/s3.tif,truncated\n")
    caplog.set_level(logging.INFO, logger="medgain.handlers.run_summary")
    result = RunSummary(str(tmp_path), name="slide inference", predictions_filename="slides.csv",
                        unit="slides").complete()
    assert result["frames_read"] == 2 and result["refused"] == 1 and result["decided"] is None
    assert caplog.records[-1].getMessage().startswith(
        "slide inference finished: 2 slides read, no decisions (slides.csv has no decision column), 1 refused"
    )
