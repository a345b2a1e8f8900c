"""Synthetic whole-slide images: pyramid layout, tags, annotations and the rendered tissue / tumour geometry."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tifffile
from monai.data import WSIReader
from skimage.color import rgb2hsv
from skimage.draw import polygon as fill_polygon

from medgain.cli import main
from medgain.synth import make_wsi_dataset, make_wsi_slide
from medgain.synth.wsi import _plan_slide


def _raster(polygons, shape, downsample=1.0):
    out = np.zeros(shape, dtype=bool)
    for p in polygons:
        rr, cc = fill_polygon(p[:, 1] / downsample - 0.5, p[:, 0] / downsample - 0.5, shape)
        out[rr, cc] = True
    return out


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth_wsi") / "s.tif"
    return make_wsi_slide(path, seed=3, index=1, size=2048, tumour=True, mpp=0.25, compression="deflate")


def test_pyramid_tiles_compression_and_resolution(slide):
    with tifffile.TiffFile(slide.path) as tif:
        pages = list(tif.pages)
        assert [p.shape[:2] for p in pages] == [(2048, 2048), (1024, 1024), (512, 512)]
        assert len(tif.series[0].levels) == 3
        for k, page in enumerate(pages):
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
            assert page.compression in (tifffile.COMPRESSION.ADOBE_DEFLATE, tifffile.COMPRESSION.DEFLATE)
            num, den = page.tags["XResolution"].value
            assert int(page.tags["ResolutionUnit"].value) == 3  # centimetre
            assert 1e4 * den / num == pytest.approx(0.25 * 2**k)
        level0, level1 = pages[0].asarray(), pages[1].asarray()
    # level 1 is the 2x2 mean of level 0
    mean = level0.reshape(1024, 2, 1024, 2, 3).mean(axis=(1, 3))
    assert np.abs(level1.astype(float) - mean).max() <= 0.5 + 1e-9
    reader = WSIReader(backend="tifffile")
    wsi = reader.read(str(slide.path))
    assert reader.get_level_count(wsi) == 3
    assert reader.get_mpp(wsi, 1) == pytest.approx((0.5, 0.5))


def test_rendered_geometry_matches_the_polygons(slide):
    image = tifffile.imread(slide.path, level=1).astype(float)
    tissue = _raster(slide.tissue, (1024, 1024), 2.0)
    tumour = _raster(slide.tumours, (1024, 1024), 2.0)
    assert tumour.any() and not (tumour & ~tissue).any()  # tumours lie inside the tissue
    sat = rgb2hsv(image / 255.0)[..., 1]
    background = image[~tissue]
    assert background.mean() > 230 and sat[~tissue].mean() < 0.05
    normal = tissue & ~tumour
    assert sat[normal].mean() > 0.2
    # tumour: bluer (lilac cytoplasm, dense purple nuclei) than normal stroma
    blue_minus_red = image[..., 2] - image[..., 0]
    assert blue_minus_red[tumour].mean() > blue_minus_red[normal].mean() + 20


@pytest.mark.parametrize("seed", range(4))
def test_tumour_slides_have_a_large_region_and_small_metastases(seed):
    # geometry of a default-size slide (16384 px at 0.5 um/px), planned without rendering it
    _, tumours = _plan_slide(np.random.default_rng([seed, 0]), 16384, 0.5, True)
    diameters_um = sorted(np.ptp(p, axis=0).max() * 0.5 for p in tumours)
    assert len(tumours) >= 2
    assert 100.0 < diameters_um[0] < 400.0  # a metastasis of a few hundred microns
    assert diameters_um[-1] > 700.0


def test_dataset_layout_labels_annotations_and_determinism(tmp_path):
    labels = make_wsi_dataset(tmp_path / "a", 3, seed=5, size=512, tumour_rate=0.67, compression="deflate")
    rows = list(csv.DictReader(labels.open()))
    assert [r["slide"] for r in rows] == ["slide_000", "slide_001", "slide_002"]
    assert sum(int(r["label"]) for r in rows) == 2
    for r in rows:
        assert (tmp_path / "a" / r["image"]).is_file()
        if r["label"] == "1":
            root = ET.parse(tmp_path / "a" / r["annotation_xml"]).getroot()
            assert root.tag == "ASAP_Annotations"
            xml_polys = [
                np.array([[float(c.get("X")), float(c.get("Y"))] for c in a.iter("Coordinate")])
                for a in root.iter("Annotation")
            ]
            geo = json.loads((tmp_path / "a" / r["annotation_geojson"]).read_text())
            geo_polys = [np.array(f["geometry"]["coordinates"][0][:-1]) for f in geo["features"]]
            assert len(xml_polys) == len(geo_polys) >= 2
            for a, b in zip(xml_polys, geo_polys):
                np.testing.assert_allclose(a, b, atol=1e-3)
        else:
            assert r["annotation_xml"] == r["annotation_geojson"] == ""
    make_wsi_dataset(tmp_path / "b", 3, seed=5, size=512, tumour_rate=0.67, compression="deflate")
    make_wsi_dataset(tmp_path / "c", 3, seed=6, size=512, tumour_rate=0.67, compression="deflate")
    same = (tmp_path / "a/images/slide_001.tif").read_bytes() == (tmp_path / "b/images/slide_001.tif").read_bytes()
    other = (tmp_path / "a/images/slide_001.tif").read_bytes() == (tmp_path / "c/images/slide_001.tif").read_bytes()
    assert same and not other


def test_cli_synth_wsi(tmp_path, capsys):
    assert (
        main(
            [
                "synth",
                "wsi",
                "--out",
                str(tmp_path),
                "--n-slides",
                "2",
                "--seed",
                "0",
                "--size",
                "512",
                "--tumour-rate",
                "0.5",
            ]
        )
        == 0
    )
    assert "2 slides: 1 tumour, 1 normal" in capsys.readouterr().out
    with tifffile.TiffFile(tmp_path / "images" / "slide_000.tif") as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.JPEG
    with pytest.raises(SystemExit):
        main(["synth", "wsi", "--out", str(tmp_path), "--n-slides", "0", "--seed", "0"])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size"):
        make_wsi_slide(tmp_path / "x.tif", seed=0, size=100)
    with pytest.raises(ValueError, match="compression"):
        make_wsi_dataset(tmp_path, 1, seed=0, size=512, compression="lzw")
