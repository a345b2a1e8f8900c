"""Slide inference: region reads vs per-patch reads, maps, lesions, FROC on the outputs, errors and resume."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
import torch
from monai.data import PatchWSIDataset
from monai.data.wsi_reader import TiffFileWSIReader
from skimage.draw import polygon as fill_polygon
from torch import nn

from medgain.metrics import froc, slide_auc
from medgain.synth import make_wsi_slide, write_asap_xml, write_pyramidal_tiff
from medgain.wsi import Slide, SlideInferer, collect_slide_scores, evaluate_inference, run_inference
from medgain.wsi.tissue import slide_tissue_mask


class BlueNet(nn.Module):
    """A fixed 'tumour detector': the logit grows with (blue - red), which is high in the synthetic tumours'
    lilac cytoplasm and dense nuclei and low in pink stroma."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([100.0, 0.0, -100.0]).flip(0).view(1, 3, 1, 1))
            self.features.bias.fill_(-4.0)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _raster(polygons, shape, downsample):
    out = np.zeros(shape, dtype=bool)
    for p in polygons:
        rr, cc = fill_polygon(p[:, 1] / downsample - 0.5, p[:, 0] / downsample - 0.5, shape)
        out[rr, cc] = True
    return out


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsi_inference")
    tumour = make_wsi_slide(root / "tumour.tif", seed=2, index=0, size=2048, tumour=True, mpp=1.0)
    normal = make_wsi_slide(root / "normal.tif", seed=2, index=1, size=2048, tumour=False, mpp=1.0)
    return root, tumour, normal


@pytest.fixture(scope="module")
def maps(slides):
    _, tumour, normal = slides
    inferer = _inferer()
    return inferer(tumour.path), inferer(normal.path)


def _inferer(**kw):
    torch.manual_seed(0)
    args = {"patch_size": 64, "level": 1, "stride": 32, "batch_size": 48, "region_patches": 6}
    return SlideInferer(BlueNet(), "features", **{**args, **kw})


def test_region_reads_give_the_per_patch_results(slides, monkeypatch):
    _, tumour, _ = slides
    calls = []
    original = Slide.read_region
    monkeypatch.setattr(Slide, "read_region", lambda self, *a: calls.append(a) or original(self, *a))
    maps = _inferer(stride=48)(tumour.path)
    monkeypatch.undo()
    grid = ~np.isnan(maps.log_odds)
    assert maps.meta["n_patches"] == grid.sum() > 100
    assert len(calls) <= -(-grid.shape[0] // 6) * -(-grid.shape[1] // 6) < grid.sum() / 5  # one read per block
    # oracle: MONAI's own tifffile reader, one patch at a time, through PatchWSIDataset
    cells = np.argwhere(grid)[np.random.default_rng(0).choice(int(grid.sum()), 12, replace=False)]
    items = [{"image": str(tumour.path), "location": [int(i * 48 * 2), int(j * 48 * 2)], "label": 0} for i, j in cells]
    ds = PatchWSIDataset(items, patch_size=64, patch_level=1, reader=TiffFileWSIReader, center_location=False)
    net = BlueNet().eval()
    with torch.no_grad():
        expected = torch.cat([net(torch.as_tensor(ds[k]["image"]).float()[None] / 255.0) for k in range(len(items))])
    np.testing.assert_allclose(
        maps.log_odds[cells[:, 0], cells[:, 1]], expected[:, 0].double().numpy(), rtol=1e-5, atol=1e-4
    )
    # background cells were never run
    with Slide(tumour.path) as slide:
        mask, mask_level = slide_tissue_mask(slide)
    assert np.isnan(maps.log_odds[0, 0]) and maps.probability[0, 0] == 0 and not mask[0, 0]


def test_maps_lesions_scores_and_froc(slides, maps):
    _, tumour, normal = slides
    t_maps, n_maps = maps
    # probability map follows the tumour: centres of cells (level 1: 64-px patches every 32 px)
    truth = _raster(tumour.tumours, (2048, 2048), 1.0)
    gh, gw = t_maps.probability.shape
    coverage = np.array(
        [[truth[i * 64 : i * 64 + 128, j * 64 : j * 64 + 128].mean() for j in range(gw)] for i in range(gh)]
    )
    run = ~np.isnan(t_maps.log_odds)
    assert (t_maps.probability[run & (coverage > 0.9)] > 0.9).all()
    assert (t_maps.probability[run & (coverage == 0)] < 0.1).all()
    assert n_maps.probability.max() < 0.1
    # slide scores: max of the patch log-odds, float64; top-k mean
    assert t_maps.score == pytest.approx(np.nanmax(t_maps.log_odds)) and t_maps.score > 0 > n_maps.score
    top3 = _inferer(score="topk", top_k=3, stride=64)(tumour.path)
    assert top3.score == pytest.approx(np.sort(t_maps.log_odds[::2, ::2][run[::2, ::2]])[-3:].mean())
    assert slide_auc([t_maps.score, n_maps.score], [1, 0]) == 1.0
    # attention is stitched where the tumour is
    att = t_maps.attention
    d = t_maps.meta["attention_downsample"]
    att_truth = _raster(tumour.tumours, att.shape, d)
    assert att[att_truth].mean() > 5 * att[~att_truth].mean()
    # detected lesions sit on the tumours (level-0 coordinates); FROC of the outputs
    assert t_maps.lesions and not n_maps.lesions
    for lesion in t_maps.lesions:
        assert lesion["probability"] >= 0.5
    hits = [truth[int(les["y"]), int(les["x"])] for les in t_maps.lesions]
    assert hits[0]
    dets = [np.array([[r["x"], r["y"], r["log_odds"]] for r in m.lesions]).reshape(-1, 3) for m in (t_maps, n_maps)]
    dets[1] = np.array([[0.0, 0.0, -20.0]])  # a low false positive: the official curve leaves the lowest score out
    result = froc(dets, [_raster(tumour.tumours, (512, 512), 4.0), None], [1.0, 1.0], mask_downsample=4.0)
    assert result.n_tumours >= 1 and result.score >= 0.5
    maxima = _inferer(lesion_method="maxima").detect_lesions(t_maps.probability, t_maps.log_odds, t_maps.meta)
    peak = {k: v for k, v in t_maps.lesions[0].items() if k != "n_patches"}
    assert len(maxima) >= len(t_maps.lesions) and {k: v for k, v in maxima[0].items() if k != "n_patches"} == peak


def test_run_inference_outputs_errors_and_resume(slides, maps, tmp_path):
    root, tumour, normal = slides
    truncated = tmp_path / "truncated.tif"
    raw = tumour.path.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    blank = tmp_path / "blank.tif"
    glass = np.full((256, 1024, 3), 243, np.uint8)
    write_pyramidal_tiff(blank, iter([glass] * 4), (1024, 1024), 1.0, compression="deflate")
    out = tmp_path / "out"
    stale = out / ".tumour.partial-123"
    stale.mkdir(parents=True)
    order = [tumour.path, truncated, normal.path, flat, blank]
    summary = run_inference(order, out, _inferer())
    assert summary == {"done": ["tumour", "normal"], "skipped": [], "failed": ["truncated", "flat", "blank"]}
    assert not stale.exists()
    rows = list(csv.DictReader((out / "errors.csv").open()))
    assert [r["slide"] for r in rows] == ["truncated", "flat", "blank"]
    assert "truncated.tif" in rows[0]["error"] and "truncated" in rows[0]["error"]
    assert "flat.tif: no resolution tags" in rows[1]["error"]  # a single level is read; it has no mpp
    assert "blank.tif: no tissue" in rows[2]["error"]
    files = {p.name for p in (out / "tumour").iterdir()}
    assert {
        "probability.npy",
        "log_odds.npy",
        "attention.npy",
        "lesions.csv",
        "slide.json",
        "thumbnail.png",
        "probability_overlay.png",
        "attention_overlay.png",
    } <= files
    record = json.loads((out / "tumour" / "slide.json").read_text())
    assert record["mpp"] == 1.0 and record["score"] > 0 and record["map_downsample"] == 64.0
    np.testing.assert_array_equal(np.load(out / "tumour" / "log_odds.npy"), maps[0].log_odds)
    lesions = list(csv.DictReader((out / "tumour" / "lesions.csv").open()))
    assert lesions and set(lesions[0]) == {"x", "y", "probability", "log_odds", "n_patches"}
    # resume: finished slides are skipped and left untouched, failed ones are tried again
    stamp = (out / "tumour" / "slide.json").stat().st_mtime_ns
    again = run_inference(order, out, _inferer())
    assert again["skipped"] == ["tumour", "normal"] and again["failed"] == ["truncated", "flat", "blank"]
    assert (out / "tumour" / "slide.json").stat().st_mtime_ns == stamp
    # slide AUC and FROC of the outputs, against the annotations; failed slides are left out
    xml = write_asap_xml(tmp_path / "tumour.xml", tumour.tumours)
    table = [
        {"slide": "tumour", "label": 1, "annotation": str(xml)},
        {"slide": "normal", "label": 0, "annotation": ""},
        {"slide": "flat", "label": 0, "annotation": ""},
    ]
    with (out / "normal" / "lesions.csv").open("a") as fh:  # a low false positive: the official FROC curve
        fh.write("0,0,0.0,-20.0,1\n")  # leaves the lowest score out, which would otherwise be the tumour's hit
    metrics = evaluate_inference(out, table, mask_downsample=8.0)
    assert metrics["slide_auc"] == 1.0 and metrics["n_missing"] == 1 and metrics["n_slides"] == 2
    assert metrics["froc"] >= 0.5 and metrics["n_tumours"] >= 1 and "froc_sensitivity_at_0.25" in metrics
    # slide ids need not be the file names: with ``image`` the outputs are found by the file
    renamed = [{**row, "slide": f"case-{i}", "image": str(root / f"{row['slide']}.tif")} for i, row in enumerate(table)]
    assert evaluate_inference(out, renamed, mask_downsample=8.0) == metrics
    scores = collect_slide_scores(out)
    assert [r["slide"] for r in scores] == ["normal", "tumour"] and (out / "slides.csv").is_file()
    # shards: rank 1 of 2 takes every second slide
    shard = run_inference(order, tmp_path / "shard", _inferer(), rank=1, world_size=2)
    assert shard["done"] == [] and shard["failed"] == ["truncated", "flat"]
    assert (tmp_path / "shard" / "errors.rank1.csv").is_file()
    with pytest.raises(ValueError, match="unique"):
        run_inference([tumour.path, root / "x" / "tumour.tif"], tmp_path / "dup", _inferer())


def test_slide_without_resolution_tags(tmp_path, caplog):
    path = tmp_path / "untagged.tif"
    make_wsi_slide(path, seed=4, size=1024, tumour=False, mpp=None, compression="deflate")
    summary = run_inference([path], tmp_path / "strict", _inferer())
    assert summary["failed"] == ["untagged"]
    error = next(csv.DictReader((tmp_path / "strict" / "errors.csv").open()))["error"]
    assert "untagged.tif: no resolution tags" in error and "default_mpp" in error
    with caplog.at_level("WARNING"):
        assumed = run_inference([path], tmp_path / "assumed", _inferer(default_mpp=0.5))
    assert assumed["done"] == ["untagged"] and "assuming 0.5 microns per pixel" in caplog.text
    assert json.loads((tmp_path / "assumed" / "untagged" / "slide.json").read_text())["mpp"] is None


def test_froc_is_nan_when_every_annotated_tumour_is_an_isolated_tumour_cell_cluster(tmp_path):
    out = tmp_path / "out"
    for name, score in (("small", 2.0), ("clean", -2.0)):
        (out / name).mkdir(parents=True)
        record = {"slide": name, "path": name, "score": score, "slide_shape": [1024, 1024], "mpp": 1.0}
        (out / name / "slide.json").write_text(json.dumps(record))
        (out / name / "lesions.csv").write_text(f"x,y,probability,log_odds,n_patches\n500,500,0.5,{score},1\n")
    square = np.array([[480.0, 480.0], [600.0, 480.0], [600.0, 600.0], [480.0, 600.0]])  # 170 um across: an ITC
    xml = write_asap_xml(tmp_path / "small.xml", [square])
    table = [{"slide": "small", "label": 1, "annotation": str(xml)}, {"slide": "clean", "label": 0, "annotation": ""}]
    metrics = evaluate_inference(out, table, mask_downsample=8.0)
    assert metrics["slide_auc"] == 1.0 and metrics["n_tumours"] == 0 and np.isnan(metrics["froc"])
    bigger = write_asap_xml(tmp_path / "big.xml", [square + [[0, 0], [200, 0], [200, 200], [0, 200]]])  # 320 um
    metrics = evaluate_inference(out, [{**table[0], "annotation": str(bigger)}, table[1]], mask_downsample=8.0)
    assert metrics["n_tumours"] == 1 and metrics["froc"] == 1.0  # the hit outranks the clean slide's false positive


def test_slide_overlays_outline_the_annotated_tumour(slides, tmp_path):
    from PIL import Image
    from scipy import ndimage

    from medgain.wsi import read_annotations, tumour_mask
    from medgain.wsi.inference import CONTOUR_RGB

    _, tumour, _ = slides
    xml = write_asap_xml(tmp_path / "tumour.xml", tumour.tumours)
    run_inference([tumour.path], tmp_path / "out", _inferer(), annotations=[xml])
    run_inference([tumour.path], tmp_path / "bare", _inferer(), annotations=[None])
    folder = tmp_path / "out" / "tumour"
    thumb = np.asarray(Image.open(folder / "thumbnail.png"))
    factor = max(1, -(-256 // thumb.shape[0]))  # heatmap_panel enlarges the overlay to at least 256 rows
    mask = tumour_mask(read_annotations(xml), thumb.shape[:2], downsample=2048 / thumb.shape[1])
    edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
    assert edge.sum() >= 8
    rows, cols = np.nonzero(edge)
    for name in ("probability_overlay.png", "attention_overlay.png"):
        panel = np.asarray(Image.open(folder / name).convert("RGB"))
        along = panel[rows * factor + factor // 2, cols * factor + factor // 2]
        assert (along == CONTOUR_RGB).all(), name  # every boundary pixel of the annotation is drawn
        inside = ndimage.binary_erosion(mask, iterations=3)
        if inside.any():  # the tumour itself stays visible under its outline
            r, c = np.nonzero(inside)
            assert not (panel[r * factor, c * factor] == CONTOUR_RGB).all(-1).any()
        bare = np.asarray(Image.open(tmp_path / "bare" / "tumour" / name).convert("RGB"))
        assert not (bare == CONTOUR_RGB).all(-1).any()  # no annotation, no outline
    with pytest.raises(ValueError, match="1 annotation entries for 2 slides"):
        run_inference([tumour.path, tumour.path], tmp_path / "x", _inferer(), annotations=[xml])
