"""A model runs only on the task it was trained for: the model file records its bundle, modality and (whole-slide)
magnification; evaluation, inference and unveiling of another bundle refuse it; slide inference runs at the
model's magnification; lesion detection and unveiling stop at the stored operating point."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run
from PIL import Image
from scipy.special import expit
from torch import nn

from medgain.cli import main as medgain_main
from medgain.model_file import ModelSpec, build_network, load_model_spec, save_checkpoint, spec_from_config
from medgain.synth import make_capsule_dataset, make_wsi_dataset, make_wsi_slide
from medgain.unveil import unveil
from medgain.unveil.command import stop_probability
from medgain.wsi import (
    SlideError,
    SlideInferer,
    patch_datalist,
    run_inference,
    split_mpp,
    split_slides,
)

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
CAPSULE, WSI = BUNDLES / "capsule_endoscopy_gain", BUNDLES / "wsi_patch_gain"


def _model_file(path: Path, threshold: float | None = 0.0, **spec_fields: object) -> Path:
    """A small_cnn model file as BestModelSaver writes it, with the given spec fields and operating point."""
    torch.manual_seed(0)
    spec = spec_from_config("small_cnn", 2, 32, class_names=["normal", "ill"], **spec_fields)  # type: ignore[arg-type]
    point = {"threshold": threshold, "max_fpr": 0.001}
    if threshold is None:
        point["reason"] = "validation held no positive"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"model": build_network(spec).state_dict(), "model_spec": spec, "operating_point": point,
                           "epoch": 1, "metrics": {}})
    return path


def _run(bundle: Path, run_id: str, configs: list[str], **override: object) -> None:
    files = [str(bundle / "configs" / name) for name in configs]
    run(run_id, meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=files if len(files) > 1 else files[0], logging_file=str(bundle / "configs" / "logging.conf"),
        **override)


def _cause(err: BaseException) -> str:
    """The messages of an exception and its causes (MONAI wraps config errors)."""
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return " | ".join(parts)


# ---- the model file records its task -------------------------------------------------------------------------
def test_the_spec_records_bundle_modality_and_magnification(tmp_path: Path) -> None:
    spec = spec_from_config("small_cnn", 2, 32, level=1, bundle="wsi_patch_gain", modality="light microscopy", mpp=4)
    assert spec["bundle"] == "wsi_patch_gain" and spec["modality"] == "light microscopy" and spec["mpp"] == 4.0
    assert not {"bundle", "modality", "mpp"} & set(spec_from_config("small_cnn", 2, 32))  # old form kept
    for bad in (0, -1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match="mpp must be positive"):
            spec_from_config("small_cnn", 2, 32, mpp=bad)  # type: ignore[arg-type]
    path = _model_file(tmp_path / "model.pt", bundle="wsi_patch_gain", level=1, mpp=4.0)
    assert load_model_spec(path, bundle="wsi_patch_gain").mpp == 4.0


def test_a_model_of_another_bundle_is_refused_naming_both(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    wsi_model = _model_file(tmp_path / "wsi" / "model.pt", bundle="wsi_patch_gain", modality="light microscopy",
                            level=1)
    with pytest.raises(ValueError, match=r"wsi/model.pt: the model was trained by wsi_patch_gain \(light microscopy\); "
                                         r"this is capsule_endoscopy_gain"):
        load_model_spec(wsi_model, bundle="capsule_endoscopy_gain")
    old = _model_file(tmp_path / "old" / "model.pt")  # written before the bundle was recorded
    with caplog.at_level(logging.WARNING, logger="medgain.model_file"):
        assert load_model_spec(old, bundle="capsule_endoscopy_gain").network == "small_cnn"
    assert "old/model.pt: the model file does not record the bundle it was trained by" in caplog.text


def test_every_bundle_records_its_own_name_and_modality() -> None:
    for folder in sorted(p for p in BUNDLES.iterdir() if (p / "configs" / "train.yaml").is_file()):
        parser = ConfigParser()
        parser.read_config(str(folder / "configs" / "train.yaml"))
        meta = json.loads((folder / "configs" / "metadata.json").read_text())
        assert parser.get("bundle_name") == folder.name
        assert parser.get("modality") == meta["network_data_format"]["inputs"]["image"]["modality"]
        assert "bundle=@bundle_name, modality=@modality" in parser.get("model_spec")


def test_capsule_inference_and_evaluation_refuse_a_whole_slide_model(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _model_file(root / "models" / "model.pt", bundle="wsi_patch_gain", modality="light microscopy", level=1, mpp=4.0)
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(frames / "frame.png")
    out = tmp_path / "out"
    with pytest.raises(Exception) as refused:
        _run(CAPSULE, "inference", ["inference.yaml"], bundle_root=str(root), input_dir=str(frames),
             output_dir=str(out))
    assert "trained by wsi_patch_gain (light microscopy); this is capsule_endoscopy_gain" in _cause(refused.value)
    assert not out.exists()  # nothing written: no predictions of a model on the wrong task
    data = make_capsule_dataset(tmp_path / "capsule", 16, seed=0, size=32, prevalence=0.5, frames_per_study=2).parent
    with pytest.raises(Exception) as refused:
        _run(CAPSULE, "evaluate", ["train.yaml", "evaluate.yaml"], bundle_root=str(root), dataset_dir=str(data),
             num_workers=0, batch_size=4)
    assert "trained by wsi_patch_gain (light microscopy); this is capsule_endoscopy_gain" in _cause(refused.value)
    assert not (root / "outputs" / "evaluation" / "metrics.json").exists()
    assert not (root / "outputs" / "mlflow.db").exists()  # no test metrics in the capsule experiment


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One slide at 2.0 and one at 0.5 microns per pixel (level 0)."""
    root = tmp_path_factory.mktemp("slides")
    make_wsi_slide(root / "coarse.tif", seed=3, index=0, size=512, tumour=True, mpp=2.0)
    make_wsi_slide(root / "fine.tif", seed=3, index=1, size=2048, tumour=True, mpp=0.5)
    return root


def test_whole_slide_inference_refuses_a_capsule_model_clearly(tmp_path: Path, slides: Path) -> None:
    common = {"input_dir": str(slides / "coarse.tif"), "output_dir": str(tmp_path / "out")}
    capsule = tmp_path / "capsule"
    _model_file(capsule / "models" / "model.pt", bundle="capsule_endoscopy_gain", modality="ES")
    with pytest.raises(Exception) as refused:
        _run(WSI, "inference", ["inference.yaml"], bundle_root=str(capsule), **common)
    message = _cause(refused.value)
    assert "trained by capsule_endoscopy_gain (ES); this is wsi_patch_gain" in message and "int()" not in message
    old = tmp_path / "old"  # a capsule model written before the bundle was recorded: no pyramid level
    _model_file(old / "models" / "model.pt")
    with pytest.raises(Exception) as refused:
        _run(WSI, "inference", ["inference.yaml"], bundle_root=str(old), **common)
    message = _cause(refused.value)
    assert "level must be a pyramid level" in message and "not a whole-slide patch model" in message
    assert "int()" not in message


# ---- whole-slide magnification -------------------------------------------------------------------------------
def _inferer(**kw: object) -> SlideInferer:
    torch.manual_seed(0)
    net = build_network(ModelSpec("small_cnn", 2, (32, 32))).eval()
    return SlideInferer(net, "features.3", **{"patch_size": 32, "batch_size": 64, "channels_last": False, **kw})


def test_a_model_trained_at_2_um_runs_on_0_5_um_slides_at_its_magnification(
    slides: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fine = slides / "fine.tif"  # levels at 0.5, 1 and 2 microns per pixel
    with caplog.at_level(logging.WARNING, logger="medgain.wsi.inference"):
        maps = _inferer(level=0, mpp=2.0)(fine)
    assert "fine.tif: 0.5 microns per pixel at level 0, the model was trained at 2: patches are read at level 2" in (
        caplog.text
    )
    assert maps.meta["level"] == 2 and maps.meta["level_mpp"] == pytest.approx(2.0) and maps.meta["model_level"] == 0
    same = _inferer(level=2)(fine)  # what a run at the right level gives
    np.testing.assert_array_equal(maps.log_odds, same.log_odds)
    assert maps.meta["map_downsample"] == same.meta["map_downsample"] == 128.0
    # between two levels: the finer one is read with the model's field of view and resized to the input
    between = _inferer(level=0, mpp=3.0)(fine)
    assert between.meta["level"] == 2 and between.meta["read_patch_size"] == 48 and between.meta["patch_size"] == 32
    assert between.meta["map_downsample"] == 48 * 4.0 and between.log_odds.shape == (10, 10)
    # a model finer than the slide can offer is refused, naming both
    with pytest.raises(SlideError, match=r"coarse.tif: 2 microns per pixel at its finest level, coarser than the 0.5"):
        _inferer(level=0, mpp=0.5)(slides / "coarse.tif")
    # within the tolerance: read as is
    assert _inferer(level=0, mpp=2.1)(slides / "coarse.tif").meta["level"] == 0


def test_patch_tables_at_another_magnification_are_refused(slides: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "slides_test.csv").write_text(f"slide,label,image,annotation\nfine,0,{slides / 'fine.tif'},\n")
    (data / "patches_test.csv").write_text(f"slide,x,y,level,label,coverage\n{slides / 'fine.tif'},0,0,0,0,0\n")
    assert split_mpp(data, "test", 0) == pytest.approx(0.5) and split_mpp(data, "test", 2) == pytest.approx(2.0)
    assert len(patch_datalist(data, "test", 32, 0, mpp=0.52)) == 1  # within 10 %
    with pytest.raises(SlideError, match=r"fine.tif: 0.5 microns per pixel at level 0, the model was trained at 2 "):
        patch_datalist(data, "test", 32, 0, mpp=2.0)


# ---- decisions at the stored operating point -----------------------------------------------------------------
def test_lesions_are_detected_at_the_operating_point() -> None:
    scores = np.array([[1.0, np.nan], [3.0, -2.0]])
    probability = np.where(np.isnan(scores), 0.0, expit(np.nan_to_num(scores))).astype(np.float32)
    meta = {"map_downsample": 10.0, "map_offset": 5.0}
    at_point = _inferer(operating_point={"threshold": 2.0, "max_fpr": 0.001})
    assert at_point.lesion_threshold == pytest.approx(expit(2.0))
    assert at_point.lesion_threshold_source == "the model's operating point, log-odds 2"
    assert [r["log_odds"] for r in at_point.detect_lesions(probability, scores, meta)] == [3.0]
    given = _inferer(operating_point={"threshold": 2.0}, lesion_threshold=0.5)
    assert len(given.detect_lesions(probability, scores, meta)) == 1 and given.lesion_threshold_source.endswith("given")
    without = _inferer(operating_point={"threshold": None, "reason": "no positives"})
    assert without.lesion_threshold == 0.5 and "no operating point (no positives)" in without.lesion_threshold_source


def test_slide_inference_defaults_to_the_operating_point_and_says_so(slides: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    _model_file(root / "models" / "model.pt", threshold=1.5, bundle="wsi_patch_gain", level=0, mpp=2.0)
    out = tmp_path / "out"
    _run(WSI, "inference", ["inference.yaml"], bundle_root=str(root), input_dir=str(slides), output_dir=str(out),
         batch_size=64)
    coarse = json.loads((out / "coarse" / "slide.json").read_text())
    fine = json.loads((out / "fine" / "slide.json").read_text())
    for record in (coarse, fine):
        assert record["lesion_threshold"] == pytest.approx(expit(1.5))
        assert record["lesion_threshold_source"] == "the model's operating point, log-odds 1.5"
        assert record["model_mpp"] == 2.0
    assert coarse["level"] == 0 and fine["level"] == 2 and fine["level_mpp"] == pytest.approx(2.0)
    with (out / "fine" / "lesions.csv").open() as fh:
        assert all(float(r["log_odds"]) >= 1.5 for r in csv.DictReader(fh))


def test_whole_slide_inference_runs_the_model_at_its_level(slides: Path, tmp_path: Path) -> None:
    summary = run_inference([slides / "fine.tif"], tmp_path / "out", _inferer(level=0, mpp=2.0))
    assert summary["done"] == ["fine"]
    assert json.loads((tmp_path / "out" / "fine" / "slide.json").read_text())["level"] == 2


# ---- unveiling -----------------------------------------------------------------------------------------------
class InverseBlobNet(nn.Module):
    """Its "lesion" logit *falls* with the brightest 3x3 blob: hiding the blob raises the probability."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / 9.0)
            self.conv.bias.fill_(-0.45)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = torch.relu(self.conv(x)).flatten(1).amax(1, keepdim=True)
        return torch.cat([torch.zeros_like(evidence), 12.0 - 20.0 * evidence], 1)


def test_unveiling_stops_when_hiding_a_region_raises_the_probability() -> None:
    image = torch.zeros(1, 1, 24, 24)
    image[0, 0, 10:13, 10:13] = 1.0
    (result,) = unveil(InverseBlobNet().eval(), image, 1, source="gradient", steps=3, fill=0.0, kernel_size=3)
    assert result.initial_probability == pytest.approx(expit(12.0 - 20.0 * 0.55))
    assert result.stop_reason == "probability_rose" and result.steps == 0 and not result.cumulative.any()
    assert result.rejected_probability == pytest.approx(expit(12.0))


def test_unveiling_stops_at_the_operating_point_and_refuses_another_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert stop_probability(0.3, {"operating_point": {"threshold": 2.0}}, 1, 2) == (0.3, "--prob-threshold given")
    assert stop_probability(None, {"operating_point": {"threshold": 2.0}}, 1, 2)[0] == pytest.approx(expit(2.0))
    assert stop_probability(None, {"operating_point": {"threshold": 2.0}}, 0, 2)[0] == pytest.approx(expit(-2.0))
    assert stop_probability(None, {"operating_point": {"threshold": None, "reason": "r"}}, 1, 2)[0] == 0.5
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(frames / "f.png")
    model = _model_file(tmp_path / "model.pt", threshold=-0.25, bundle="capsule_endoscopy_gain", modality="ES")
    out = tmp_path / "out"
    assert medgain_main(["unveil", "--checkpoint", str(model), "--input", str(frames), "--output", str(out),
                         "--steps", "1", "--kernel-size", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"stopped below probability {expit(-0.25):.6g} (the model's operating point, log-odds -0.25)" in printed
    with (out / "unveil.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert math.isclose(float(row["prob_threshold"]), expit(-0.25), rel_tol=1e-5)
    args = ["unveil", "--bundle", str(WSI), "--checkpoint", str(model), "--input", str(frames), "--output",
            str(tmp_path / "refused")]
    assert medgain_main(args) == 1
    assert "trained by capsule_endoscopy_gain (ES); this is wsi_patch_gain" in capsys.readouterr().err


# ---- whole-slide data sets -----------------------------------------------------------------------------------
def test_too_few_slides_for_the_splits_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    labels = make_wsi_dataset(tmp_path / "slides", 2, seed=0, size=512, tumour_rate=0.5, mpp=2.0)
    with labels.open() as fh:
        assert sorted(int(r["label"]) for r in csv.DictReader(fh)) == [0, 1]
    args = ["wsi", "patches", "--labels", str(labels), "--out", str(tmp_path / "data"), "--level", "1",
            "--patch-size", "32"]
    assert medgain_main(args) == 1
    err = capsys.readouterr().err
    assert "too few slides for the splits training, validation, test" in err
    assert "3 tumour and 3 normal slides are needed; there are 1 tumour and 1 normal" in err
    assert not (tmp_path / "data" / "patches_training.csv").exists()
    with pytest.raises(ValueError, match="2 tumour and 2 normal slides are needed"):
        split_slides([{"label": 0}, {"label": 1}], (0.5, 0.5, 0.0))
