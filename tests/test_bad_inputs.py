"""No decision on an input that cannot be read as an image (issue 20, section 2): non-finite pixels, float and
rescaled DICOM, label maps outside the bundle's labels, class labels outside 0 / 1."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import dicom_dataset
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.pixels import pixel_array

from medgain.data import PositiveFractionBatchSampler, load_datalist, prepare_items, scan_folder
from medgain.demo import CAPSULE_BUNDLE, bundle_run
from medgain.handlers import NonFiniteLossError, NonFiniteLossHandler, PredictionCSVWriter
from medgain.model_file import build_network, save_checkpoint, spec_from_config
from medgain.transforms import LabelMapToMaskd, LoadFramed, LoadLabelMapd
from medgain.transforms.io import iter_frames, read_frame


def float_dicom(path: Path, values: np.ndarray, **tags: object) -> Path:
    """A MONOCHROME2 DICOM file with 32-bit Float Pixel Data (pydicom ships no such example) and extra tags."""
    ds = dicom_dataset()
    ds.Rows, ds.Columns = values.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 32
    ds.BitsStored = 32  # as some writers put it: the old reader then divided by 2**32 - 1
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    if values.ndim == 3:
        ds.NumberOfFrames = values.shape[0]
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.FloatPixelData = values.astype(np.float32).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def tiny_model_file(path: Path, threshold: float = 0.0, image_size: int = 16) -> Path:
    """A capsule-bundle model file of an untrained small_cnn with an operating point."""
    spec = spec_from_config("small_cnn", 2, image_size, None, ["normal", "lesion"], bundle="capsule_endoscopy_gain")
    torch.manual_seed(0)
    state = {
        "model": build_network(spec).state_dict(),
        "model_spec": spec,
        "operating_point": {"threshold": threshold, "max_fpr": 0.001, "metric": "val_auc", "value": 0.5},
        "epoch": 1,
        "metrics": {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, state)
    return path


NAN_FRAME = np.array([[0.5, np.nan, 2.0], [1.0, 2.0, np.inf]], np.float32)


def test_non_finite_dicom_pixels_are_an_input_error(tmp_path):
    bad = float_dicom(tmp_path / "in" / "nan.dcm", NAN_FRAME)
    message = r"nan\.dcm: frame 0 holds non-finite pixel values \(1 NaN, 1 infinite\)"
    with pytest.raises(ValueError, match=message):
        read_frame(bad)
    with pytest.raises(ValueError, match=message):
        list(iter_frames(bad))
    clip = float_dicom(tmp_path / "in" / "clip.dcm", np.stack([np.ones((2, 3)), NAN_FRAME]))
    with pytest.raises(ValueError, match=r"clip\.dcm: frame 1 holds non-finite"):
        list(iter_frames(clip))
    # training: the loader's error names the one offending file
    with pytest.raises(ValueError, match=r"nan\.dcm"):
        LoadFramed()({"image": str(bad)})
    # inference: the folder scan lists it as an error, and it yields no frame to score
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "in" / "ok.png")
    items, errors = scan_folder(tmp_path / "in")
    assert [Path(i["image"]).name for i in items] == ["ok.png"]
    assert {Path(e["file"]).name for e in errors} == {"nan.dcm", "clip.dcm"}
    assert all("non-finite pixel values" in e["reason"] for e in errors)


def test_capsule_inference_gives_a_nan_dicom_no_decision(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(np.full((20, 20, 3), 120, np.uint8)).save(inputs / "frame.png")
    float_dicom(inputs / "nan.dcm", np.pad(NAN_FRAME, ((0, 14), (0, 14)), constant_values=1.0))
    model = tiny_model_file(tmp_path / "models" / "model.pt")
    out = tmp_path / "out"
    run = bundle_run("inference", ["inference.yaml"], bundle=CAPSULE_BUNDLE, bundle_root=tmp_path, input_dir=inputs,
                     output_dir=out, checkpoint=model, num_workers=0, capture_output=True)
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["file"]).name for r in rows] == ["frame.png"] and rows[0]["decision"] in ("0", "1")
    with (out / "errors.csv").open() as f:
        errors = list(csv.DictReader(f))
    assert [Path(e["file"]).name for e in errors] == ["nan.dcm"] and "non-finite" in errors[0]["reason"]
    log = run.stdout + run.stderr
    # the folder is scanned by headers only: the loader reads nan.dcm's pixels and refuses it
    assert "inference finished: 2 frames read, 1 decided" in log
    assert f"1 refused (listed in {out / 'errors.csv'})" in log and f"outputs in {out}" in log
    assert "operating point: log-odds >= 0 (p(ill) >= 0.5)" in log
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["frames_read"] == 2 and summary["refused"] == 1 and summary["decided"] == 1


def test_prediction_writer_refuses_non_finite_scores(tmp_path):
    (tmp_path / "errors.csv").write_text("file,reason\nbroken.png,cannot decode image\n")
    writer = PredictionCSVWriter(str(tmp_path), threshold=0.0)
    engine = SimpleNamespace(state=SimpleNamespace(
        batch={"image_path": ["a.png", "b.dcm"], "frame": torch.tensor([0, 0])},
        output={"pred": torch.tensor([[0.0, 1.0], [float("nan"), float("nan")]])},
    ))
    writer.start(engine)
    writer(engine)
    writer.write(engine)
    with (tmp_path / "predictions.csv").open() as f:
        assert [r["file"] for r in csv.DictReader(f)] == ["a.png"]
    with (tmp_path / "errors.csv").open() as f:
        errors = list(csv.DictReader(f))
    assert [e["file"] for e in errors] == ["broken.png", "b.dcm"]
    assert "not finite" in errors[1]["reason"] and "no decision" in errors[1]["reason"]


def test_float_dicom_is_scaled_by_its_values(tmp_path):
    values = np.array([[-1.5, 0.5], [2.5, 4.5]], np.float32)
    plain = read_frame(float_dicom(tmp_path / "f.dcm", values))
    np.testing.assert_allclose(plain[..., 0], (values + 1.5) / 6.0, atol=1e-6)  # the frame's own range
    assert plain.shape == (2, 2, 3) and np.all(plain[..., 0] == plain[..., 2])
    windowed = read_frame(float_dicom(tmp_path / "w.dcm", values, WindowCenter=1.0, WindowWidth=3.0))
    expected = np.clip((values * 1.0 - 0.5) / 2.0 + 0.5, 0, 1)  # DICOM linear window, centre 1, width 3
    np.testing.assert_allclose(windowed[..., 0], expected, atol=1e-6)
    rescaled = float_dicom(tmp_path / "r.dcm", values, RescaleSlope=2.0, RescaleIntercept=-1.0,
                           WindowCenter=1.0, WindowWidth=3.0)
    expected = np.clip((values * 2.0 - 1.0 - 0.5) / 2.0 + 0.5, 0, 1)
    np.testing.assert_allclose(read_frame(rescaled)[..., 0], expected, atol=1e-6)


def test_pydicom_example_files_are_read_by_their_values(tmp_path):
    mr_path = get_testdata_file("MR_small.dcm")  # 16-bit signed, window centre 600, width 1600
    stored = pixel_array(mr_path).astype(np.float64)
    expected = np.clip((stored - 599.5) / 1599.0 + 0.5, 0, 1)
    mr = read_frame(mr_path)
    np.testing.assert_allclose(mr[..., 0], expected, atol=1e-6)
    assert mr.max() == 1.0 and mr.mean() > 0.3  # not the nearly uniform image of the stored-bits scaling

    ct_path = get_testdata_file("CT_small.dcm")  # 16-bit signed, rescale slope 1 / intercept -1024, no window
    ct_stored = pixel_array(ct_path).astype(np.float64)
    hu = ct_stored - 1024.0
    low, high = -32768.0 - 1024.0, 32767.0 - 1024.0  # the Hounsfield units the stored bits can hold
    np.testing.assert_allclose(read_frame(ct_path)[..., 0], (hu - low) / (high - low), atol=1e-6)
    ds = dcmread(ct_path)
    ds.WindowCenter, ds.WindowWidth = 40, 400  # a soft-tissue window on the Hounsfield units
    ds.save_as(tmp_path / "ct_window.dcm")
    expected = np.clip((hu - 39.5) / 399.0 + 0.5, 0, 1)
    np.testing.assert_allclose(read_frame(tmp_path / "ct_window.dcm")[..., 0], expected, atol=1e-6)


def _image_with_label_map(tmp_path: Path, values: np.ndarray) -> dict[str, str]:
    Image.fromarray(np.zeros((*values.shape, 3), np.uint8)).save(tmp_path / "frame.png")
    Image.fromarray(values.astype(np.uint8)).save(tmp_path / "frame_label.png")
    return {"image": str(tmp_path / "frame.png"), "label_map": str(tmp_path / "frame_label.png")}


def test_label_map_values_outside_the_lesion_labels_are_an_error(tmp_path):
    item = _image_with_label_map(tmp_path, np.array([[0, 7, 255], [0, 0, 7]]))
    loaded = LoadLabelMapd()(LoadFramed()(item))
    with pytest.raises(ValueError, match=r"frame_label\.png: label map holds values \[0, 7, 255\], of which "
                                         r"\[7, 255\] are neither background 0 nor lesion_labels \[1, 2, 3, 4\]"):
        LabelMapToMaskd(lesion_labels=[1, 2, 3, 4])(loaded)
    ignored = LabelMapToMaskd(lesion_labels=[1, 2, 3, 4], ignore_labels=[7, 255])(loaded)
    assert not ignored["mask"].any() and "label_map_path" not in ignored
    mixed = LoadLabelMapd()(LoadFramed()(_image_with_label_map(tmp_path, np.array([[0, 2, 255], [0, 0, 0]]))))
    mask = LabelMapToMaskd(lesion_labels=[1, 2, 3, 4], ignore_labels=[255])(mixed)["mask"]
    np.testing.assert_array_equal(mask[0].numpy(), [[0, 1, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"ignore_labels must not hold the background 0 or a lesion label, got \[2\]"):
        LabelMapToMaskd(lesion_labels=[1, 2], ignore_labels=[2])


def _datalist(tmp_path: Path, labels: list[int]) -> Path:
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    items = [{"image": "a.png", "label": label, "study": f"s{i}"} for i, label in enumerate(labels)]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": items, "validation": items[:1]}))
    return path


def test_labels_outside_zero_one_are_refused_naming_the_datalist(tmp_path):
    datalist = _datalist(tmp_path, [1, 2, 2, 1])
    expected = (rf"{datalist}: the 'training' labels are \[1, 2\], expected class indices \[0, 1\] "
                r"\(values \[2\] are not classes of this task\)")
    with pytest.raises(ValueError, match=expected):
        load_datalist(datalist, "training")
    with pytest.raises(ValueError, match=expected):
        prepare_items(datalist, "training")
    assert [i["label"] for i in load_datalist(datalist, "training", classes=[0, 1, 2])] == [1, 2, 2, 1]


def test_sampler_names_the_label_values_it_found():
    with pytest.raises(ValueError, match=r"label values found: \[1, 2\], expected 0 \(negative\)"):
        PositiveFractionBatchSampler([1, 2, 1, 2], batch_size=2)


def test_non_finite_loss_names_the_image_with_non_finite_pixels():
    images = torch.zeros(3, 3, 4, 4)
    images[1, 0, 2, 2] = float("nan")
    engine = SimpleNamespace(state=SimpleNamespace(
        output={"loss": torch.tensor(float("nan"))},
        batch={"image": images, "image_path": ["a.png", "b.dcm", "c.png"]},
        epoch=1, iteration=3,
    ))
    with pytest.raises(NonFiniteLossError) as err:
        NonFiniteLossHandler()(engine)
    assert "non-finite input pixels (NaN / inf) in b.dcm" in str(err.value)
    assert "a.png" not in str(err.value) and "c.png" not in str(err.value)
    engine.state.batch["image"] = torch.zeros(3, 3, 4, 4)  # finite inputs: the whole batch is named
    with pytest.raises(NonFiniteLossError, match="batch: a.png, b.dcm, c.png"):
        NonFiniteLossHandler()(engine)
