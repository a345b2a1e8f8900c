"""A capsule study's folder is scanned by headers only; a frame whose header reads but whose pixels do not is
refused by the loader and reaches ``errors.csv`` with its reason, never a score or a decision (issue 24 §1)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from test_bad_inputs import tiny_model_file
from test_data import write_clip

from medgain.data import scan_folder
from medgain.demo import CAPSULE_BUNDLE, bundle_run
from medgain.handlers import HeatmapWriter, PredictionCSVWriter
from medgain.transforms import LoadFramed
from medgain.transforms.io import count_frames


def _png(path: Path, value: int = 120, size: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def _corrupt_pixels(path: Path) -> Path:
    """A PNG whose header reads (mode, size) but whose image data is cut short."""
    _png(path, size=40)
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"IDAT") + 30])
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_header_scan_decodes_no_pixel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _png(tmp_path / "a.png")
    corrupt = _corrupt_pixels(tmp_path / "b_corrupt.png")
    write_clip(tmp_path / "c_clip.dcm", 3)
    (tmp_path / "d_junk.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((4, 4), np.int32)).convert("F").save(tmp_path / "e_float.tif")

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the header scan decoded pixels")

    Image.init()  # PIL's plugins build their own images once
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr("medgain.data.datalist.iter_frames", no_decoding)
    items, errors = scan_folder(tmp_path, extensions=(".png", ".dcm", ".tif"), decode=False)
    assert [(Path(i["image"]).name, i["frame"]) for i in items] == [
        ("a.png", 0), ("b_corrupt.png", 0), ("c_clip.dcm", 0), ("c_clip.dcm", 1), ("c_clip.dcm", 2)]
    assert [Path(e["file"]).name for e in errors] == ["d_junk.png", "e_float.tif"]
    assert "d_junk.png: cannot read image header" in errors[0]["reason"]
    assert "e_float.tif: unsupported image mode 'F'" in errors[1]["reason"]
    monkeypatch.undo()
    # the default scan still decodes every frame and lists the corrupt pixels itself
    items, errors = scan_folder(tmp_path)
    assert "b_corrupt.png" in {Path(e["file"]).name for e in errors}
    assert count_frames(corrupt) == 1


def test_loader_refuses_an_unreadable_frame_with_its_reason(tmp_path: Path) -> None:
    corrupt = _corrupt_pixels(tmp_path / "corrupt.png")
    good = _png(tmp_path / "good.png")
    load = LoadFramed(refused_key="refused")
    refused = load({"image": str(corrupt), "frame": 0})
    assert refused["refused"].startswith(f"{corrupt}: cannot decode image")
    assert refused["image"].shape == (3, 1, 1) and not refused["image"].any()
    assert refused["image_path"] == str(corrupt) and refused["frame"] == 0
    missing = load({"image": str(tmp_path / "gone.png")})
    assert missing["refused"] == f"{tmp_path / 'gone.png'}: file not found"
    read = load({"image": str(good)})
    assert read["refused"] == "" and read["image"].shape == (3, 20, 20)
    with pytest.raises(ValueError, match="corrupt.png: cannot decode image"):
        LoadFramed()({"image": str(corrupt)})  # training: the data set is wrong, raise


def _engine(batch: dict, pred: torch.Tensor, cam: torch.Tensor | None = None) -> SimpleNamespace:
    output = {"pred": pred, "image": torch.zeros(pred.shape[0], 3, 8, 8)}
    if cam is not None:
        output["cam"] = cam
    return SimpleNamespace(state=SimpleNamespace(batch=batch, output=output))


def test_writers_give_a_refused_frame_no_score_no_decision_no_heatmap(tmp_path: Path) -> None:
    (tmp_path / "errors.csv").write_text("file,reason\njunk.png,junk.png: cannot read image header\n")
    batch = {"image_path": ["a.png", "bad.png", "c.png"], "frame": torch.tensor([0, 0, 0]),
             "refused": ["", "bad.png: cannot decode image (image file is truncated)", ""]}
    # the placeholder of the refused frame scores highest: it must still get no decision and no heatmap
    engine = _engine(batch, torch.tensor([[0.0, -1.0], [0.0, 9.0], [0.0, 1.0]]), torch.rand(3, 1, 8, 8))
    writer = PredictionCSVWriter(str(tmp_path), threshold=0.0)
    writer.start(engine)
    writer(engine)
    writer.write(engine)
    assert [(r["file"], r["decision"]) for r in _rows(tmp_path / "predictions.csv")] == [("a.png", "0"),
                                                                                      ("c.png", "1")]
    errors = _rows(tmp_path / "errors.csv")
    assert [e["file"] for e in errors] == ["junk.png", "bad.png"]
    assert errors[1]["reason"] == ("frame 0: bad.png: cannot decode image (image file is truncated); no score "
                                   "and no decision")
    for select in ("all", "flagged"):
        out = tmp_path / select
        heatmaps = HeatmapWriter(str(out), select=select, threshold=0.0, top_k=3, num_threads=0)
        heatmaps.start(engine)
        heatmaps(engine)
        heatmaps.finish(engine)
        written = sorted(p.name for p in (out / "heatmaps").glob("*.png"))
        assert written == ["a_f0.png", "c_f0.png"], select


def test_capsule_inference_refuses_corrupt_pixels_found_in_a_worker(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    for i in range(3):
        _png(inputs / f"video_frame{i}.png", value=60 * i)
    _corrupt_pixels(inputs / "video_frame3.png")
    (inputs / "video_frame4.png").write_bytes(b"not an image")
    model = tiny_model_file(tmp_path / "models" / "model.pt")
    out = tmp_path / "out"
    run = bundle_run("inference", ["inference.yaml"], bundle=CAPSULE_BUNDLE, bundle_root=tmp_path, input_dir=inputs,
                     output_dir=out, checkpoint=model, num_workers=2, batch_size=2, heatmaps="all",
                     capture_output=True)
    predictions = _rows(out / "predictions.csv")
    assert [Path(r["file"]).name for r in predictions] == [f"video_frame{i}.png" for i in range(3)]
    assert all(r["decision"] in ("0", "1") for r in predictions)
    errors = {Path(e["file"]).name: e["reason"] for e in _rows(out / "errors.csv")}
    assert set(errors) == {"video_frame3.png", "video_frame4.png"}
    assert "video_frame3.png: cannot decode image" in errors["video_frame3.png"]  # found by the loader
    assert "no score and no decision" in errors["video_frame3.png"]
    assert "video_frame4.png: cannot read image header" in errors["video_frame4.png"]  # found by the scan
    assert sorted(p.name for p in (out / "heatmaps").glob("*.png")) == [f"video_frame{i}_f0.png" for i in range(3)]
    summary = json.loads((out / "run_summary.json").read_text())
    assert (summary["frames_read"], summary["decided"], summary["refused"]) == (4, 3, 2)
    page = (out / "studies" / "video" / "study_report.html").read_text()
    assert "<tr><td>refused (no score)</td><td><b>2</b></td></tr>" in page
    assert "video_frame3.png</td><td>" in page and "cannot decode image" in page
    log = run.stdout + run.stderr
    assert "2 refused" in log and "Traceback" not in log
