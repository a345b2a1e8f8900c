"""Synthetic whole-slide images: pyramid layout, tags, annotations and the rendered tissue / tumour geometry."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from monai.data import WSIReader
from skimage.color import rgb2hsv
from scipy.ndimage import binary_dilation, binary_erosion
from scipy.spatial import ConvexHull
from skimage.draw import polygon as fill_polygon

from medgain.cli import main
from medgain.synth import make_wsi_dataset, make_wsi_slide
from medgain.synth.wsi import _plan_hard, _plan_slide, _polygon_rows, _render_strip, lesion_class, lesion_diameter_um


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
    with pytest.raises(ValueError, match="difficulty"):
        make_wsi_slide(tmp_path / "x.tif", seed=0, size=512, difficulty="extreme")
    with pytest.raises(ValueError, match="difficulty"):
        make_wsi_dataset(tmp_path, 1, seed=0, size=512, difficulty="easy")


# ---- hard slides (difficulty="hard") ----


def _mask_diameter_um(poly: np.ndarray, mpp: float) -> float:
    """Longest distance between the centres of two pixels of the polygon's rendered mask, in microns."""
    x0, y0 = (int(v) for v in np.floor(poly.min(axis=0)) - 1)
    x1, y1 = (int(v) for v in np.ceil(poly.max(axis=0)) + 1)
    mask = _polygon_rows([poly - [x0, 0]], y0, y1 - y0, x1 - x0)
    rows = np.flatnonzero(mask.any(axis=1))
    first = mask[rows].argmax(axis=1)
    last = mask.shape[1] - 1 - mask[rows, ::-1].argmax(axis=1)
    points = np.concatenate([np.stack([rows, first], 1), np.stack([rows, last], 1)]).astype(float)
    hull = points[ConvexHull(points).vertices]
    return float(np.sqrt(((hull[:, None] - hull[None]) ** 2).sum(-1)).max() * mpp)


def test_hard_metastases_range_from_itc_to_macro():
    # 8 mm slides (a 16384-px slide at 0.5 um/px, planned at its level 2), sizes measured on the rendered masks
    mpp, classes, diameters = 2.0, [], []
    for seed in range(24):
        plan = _plan_hard(np.random.default_rng([seed, 0]), 4096, mpp, True)
        assert 1 <= len(plan["tumours"]) <= 3
        for poly in plan["tumours"]:
            measured = _mask_diameter_um(poly, mpp)
            # lesions.csv reports the polygon's diameter: it agrees with the mask to a pixel or two
            assert abs(measured - lesion_diameter_um(poly, mpp)) <= 2.5 * mpp
            diameters.append(measured)
            classes.append(lesion_class(measured))
    assert {"itc", "micro", "macro"} <= set(classes)
    assert min(diameters) < 100.0 and max(diameters) > 2000.0
    assert classes.count("itc") >= 5 and classes.count("macro") >= 3


def test_hard_tumour_pixels_are_exactly_the_annotated_polygons(tmp_path):
    labels = make_wsi_dataset(tmp_path, 2, seed=4, size=1024, tumour_rate=1.0, mpp=2.0, compression="deflate",
                              difficulty="hard")
    rows = list(csv.DictReader(labels.open()))
    lesions = list(csv.DictReader((tmp_path / "lesions.csv").open()))
    for index, row in enumerate(rows):
        plan = _plan_hard(np.random.default_rng([4, index]), 1024, 2.0, True)
        root = ET.parse(tmp_path / row["annotation_xml"]).getroot()
        written = [
            np.array([[float(c.get("X")), float(c.get("Y"))] for c in a.iter("Coordinate")])
            for a in root.iter("Annotation")
        ]
        assert len(written) == len(plan["tumours"]) == sum(r["slide"] == row["slide"] for r in lesions)
        for a, b in zip(written, plan["tumours"]):
            np.testing.assert_allclose(a, b, atol=1e-3)
    # rendering the slide without its tumours changes no pixel beyond the blur's reach of the annotated mask
    spec = make_wsi_slide(tmp_path / "x.tif", seed=4, index=0, size=1024, tumour=True, mpp=2.0, difficulty="hard")
    noise = np.random.default_rng(0).uniform(-1.0, 1.0, (24, 24))
    with_tumour = np.concatenate([_render_strip(y, 256, 1024, spec, 4, 0, noise) for y in range(0, 1024, 256)])
    without = replace(spec, tumours=())
    plain = np.concatenate([_render_strip(y, 256, 1024, without, 4, 0, noise) for y in range(0, 1024, 256)])
    tumour = _polygon_rows(spec.tumours, 0, 1024, 1024)
    tissue = _polygon_rows(spec.tissue, 0, 1024, 1024)
    changed = np.abs(with_tumour.astype(int) - plain).max(axis=-1) > 0
    assert tumour.any() and not (tumour & ~tissue).any()
    # blur patches (sigma <= 4 px) then scanner focus (<= 1.3 px), each truncated at 4 sigma per axis
    assert not (changed & ~binary_dilation(tumour, np.ones((3, 3), bool), iterations=22)).any()
    assert changed[tumour].mean() > 0.9


def _tissue_and_glass_means(spec) -> tuple[np.ndarray, np.ndarray]:
    image = tifffile.imread(spec.path).astype(float)
    tissue = _polygon_rows(spec.tissue, 0, *spec.size)
    return image[tissue].mean(axis=0), image[~binary_dilation(tissue, iterations=8)].mean(axis=0)


def test_hard_slides_vary_in_stain_and_scanner(tmp_path):
    means = {}
    for difficulty in ("standard", "hard"):
        specs = [
            make_wsi_slide(tmp_path / f"{difficulty}{i}.tif", seed=1, index=i, size=512, tumour=False, mpp=2.0,
                           compression="deflate", difficulty=difficulty)
            for i in range(4)
        ]
        means[difficulty] = np.array([_tissue_and_glass_means(s) for s in specs])  # (slide, tissue/glass, rgb)
    spread = {k: np.abs(v[:, None] - v[None]).max(axis=(0, 1)) for k, v in means.items()}  # (tissue/glass, rgb)
    assert spread["standard"].max() < 4.0
    assert spread["hard"][0].max() > 10.0  # mean stain colour of the tissue
    assert spread["hard"][1].max() > 5.0  # scanner white balance on the glass
    looks = [
        make_wsi_slide(tmp_path / f"n{i}.tif", seed=2, index=i, size=512, difficulty="hard").look for i in range(4)
    ]
    assert np.ptp([look.noise for look in looks]) > 1.0
    assert len({look.jpeg_quality for look in looks}) > 1
    assert not np.allclose(looks[0].colour, looks[1].colour)


def test_hard_artefacts_and_mimics_on_normal_slides_without_annotation(tmp_path):
    plans = [_plan_hard(np.random.default_rng([0, i]), 2048, 2.0, False) for i in range(12)]
    assert all(not p["tumours"] for p in plans)
    assert all(p["mimics"] for p in plans) and sum(bool(p["germinal_centres"]) for p in plans) >= 6
    for artefact in ("pen_marks", "folds", "blur_patches"):
        assert 2 <= sum(bool(p[artefact]) for p in plans) <= 10  # on some slides, not all
    labels = make_wsi_dataset(tmp_path, 4, seed=0, size=512, tumour_rate=0.0, mpp=2.0, difficulty="hard")
    assert all(r["annotation_xml"] == "" for r in csv.DictReader(labels.open()))
    assert list(csv.DictReader((tmp_path / "lesions.csv").open())) == []
    # rendered: ink darkens and recolours, folds darken tissue, lymphoid mimics are bluer than normal tissue
    spec = make_wsi_slide(tmp_path / "pen.tif", seed=0, index=5, size=2048, tumour=False, mpp=2.0,
                          compression="deflate", difficulty="hard")
    assert spec.pen_marks and spec.folds and spec.mimics and not spec.tumours
    image = tifffile.imread(spec.path).astype(float)
    tissue = _polygon_rows(spec.tissue, 0, 2048, 2048)
    ink = binary_erosion(_polygon_rows(spec.pen_marks, 0, 2048, 2048), iterations=3)
    fold = binary_erosion(_polygon_rows(spec.folds, 0, 2048, 2048), iterations=3) & tissue & ~ink
    mimic = binary_erosion(_polygon_rows(spec.mimics, 0, 2048, 2048), iterations=3) & tissue & ~ink & ~fold
    plain = tissue & ~binary_dilation(_polygon_rows(spec.pen_marks + spec.folds + spec.mimics, 0, 2048, 2048),
                                      iterations=8)
    assert ink.any() and fold.any() and mimic.any()
    assert np.abs(image[ink].mean(axis=0) - image[plain].mean(axis=0)).max() > 30
    assert image[fold].mean() < image[plain].mean() - 15
    blue_minus_red = image[..., 2] - image[..., 0]
    assert blue_minus_red[mimic].mean() > blue_minus_red[plain].mean() + 10


def test_hard_slides_are_deterministic(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        make_wsi_dataset(tmp_path / name, 2, seed=seed, size=512, tumour_rate=0.5, mpp=2.0, difficulty="hard")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    image = Path("images") / "slide_000.tif"
    assert (tmp_path / "a" / image).read_bytes() != (tmp_path / "c" / image).read_bytes()


def test_cli_synth_wsi_hard(tmp_path, capsys):
    args = ["synth", "wsi", "--n-slides", "2", "--seed", "3", "--size", "512", "--mpp", "2.0"]
    assert main([*args, "--out", str(tmp_path / "cli"), "--difficulty", "hard"]) == 0
    make_wsi_dataset(tmp_path / "api", 2, seed=3, size=512, mpp=2.0, difficulty="hard")
    for name in ("slide_000.tif", "slide_001.tif"):
        assert (tmp_path / "cli/images" / name).read_bytes() == (tmp_path / "api/images" / name).read_bytes()
    assert (tmp_path / "cli/lesions.csv").read_text() == (tmp_path / "api/lesions.csv").read_text()
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "bad"), "--difficulty", "extreme"])
    assert "invalid choice" in capsys.readouterr().err
