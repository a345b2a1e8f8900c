"""medgain.wsi: slide reading, annotations, tissue mask, patch tables, patch masks, stain jitter, bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tifffile
import torch
from monai.data import PatchWSIDataset
from monai.data.wsi_reader import TiffFileWSIReader
from skimage.draw import polygon as fill_polygon

from medgain.synth import make_wsi_dataset, make_wsi_slide, write_asap_xml, write_geojson, write_pyramidal_tiff
from medgain.wsi import (
    AnnotationError,
    LesionPatchMaskd,
    RandHEDJitterd,
    Slide,
    SlideError,
    TiledTiffFileWSIReader,
    balance_patches,
    hed_jitter,
    patch_items,
    patch_table,
    read_annotations,
    read_patch_table,
    read_slide_labels,
    slide_tissue_mask,
    slides_patch_table,
    tumour_mask,
    write_patch_table,
)


def _raster(polygons, shape, downsample=1.0, origin=(0.0, 0.0)):
    out = np.zeros(shape, dtype=bool)
    for p in polygons:
        rr, cc = fill_polygon((p[:, 1] - origin[0]) / downsample - 0.5, (p[:, 0] - origin[1]) / downsample - 0.5, shape)
        out[rr, cc] = True
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsi")
    spec = make_wsi_slide(root / "tumour.tif", seed=1, index=1, size=2048, tumour=True, compression="deflate")
    return {
        "root": root,
        "spec": spec,
        "xml": write_asap_xml(root / "tumour.xml", spec.tumours),
        "geojson": write_geojson(root / "tumour.geojson", spec.tumours),
    }


# -- reading -------------------------------------------------------------------------------------------------------
def test_slide_levels_mpp_and_regions(data):
    path = data["spec"].path
    with Slide(path) as slide:
        assert slide.level_count == 3 and slide.shape == (2048, 2048)
        assert slide.downsamples == [1.0, 2.0, 4.0]
        assert slide.mpp == pytest.approx(0.5) and slide.mpp_at(2) == pytest.approx(2.0)
        assert slide.level_for_downsample(32) == 2 and slide.level_for_downsample(1.5) == 0
        level1 = tifffile.imread(path, level=1)
        region = slide.read_region((302, 510), (333, 257), 1)  # unaligned to the 256-px tiles
        np.testing.assert_array_equal(np.moveaxis(region, 0, -1), level1[151 : 151 + 333, 255 : 255 + 257])
        edge = slide.read_region((1900, 1900), (200, 200), 1)  # runs past the border: white
        assert (edge[:, 74:, :] == 255).all() and (edge[:, :, 74:] == 255).all()
        np.testing.assert_array_equal(np.moveaxis(edge[:, :74, :74], 0, -1), level1[950:, 950:])


def test_tiled_reader_matches_monai_tifffile_reader(data):
    path = str(data["spec"].path)
    ours, monai_reader = TiledTiffFileWSIReader(), TiffFileWSIReader()
    wsi_a, wsi_b = ours.read(path), monai_reader.read(path)
    for location, size, level in [((0, 0), (256, 256), 0), ((700, 1301), (300, 211), 0), ((1000, 64), (100, 300), 2)]:
        a, _ = ours.get_data(wsi_a, location=location, size=size, level=level)
        b, _ = monai_reader.get_data(wsi_b, location=location, size=size, level=level)
        np.testing.assert_array_equal(a, b)


def test_openslide_backend_reads_the_same_pixels(data):
    pytest.importorskip("openslide")
    with Slide(data["spec"].path) as a, Slide(data["spec"].path, backend="openslide") as b:
        assert b.level_count == a.level_count and b.downsamples == a.downsamples
        assert b.mpp == pytest.approx(a.mpp)
        np.testing.assert_array_equal(a.read_region((512, 768), (96, 128), 1), b.read_region((512, 768), (96, 128), 1))


# -- bad slides ----------------------------------------------------------------------------------------------------
def test_truncated_tiff_is_named(data, tmp_path):
    bad = tmp_path / "cut.tif"
    raw = data["spec"].path.read_bytes()
    bad.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(SlideError, match=r"cut\.tif.*(truncated|cannot be read)"):
        Slide(bad)


def test_not_a_tiff_and_missing_file(tmp_path):
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(SlideError, match=r"junk\.tif: cannot be read"):
        Slide(junk)
    with pytest.raises(FileNotFoundError, match="nothere.tif"):
        Slide(tmp_path / "nothere.tif")
    with pytest.raises(ValueError, match="unknown WSI backend"):
        Slide(junk, backend="bioformats")


def test_missing_resolution_tags(tmp_path, caplog):
    path = tmp_path / "nores.tif"
    make_wsi_slide(path, seed=0, size=512, tumour=False, mpp=None, compression="deflate")
    with Slide(path) as slide:
        assert slide.mpp is None
        with pytest.raises(SlideError, match=r"nores\.tif: no resolution tags.*FROC"):
            slide.mpp_at(0, "FROC")
    with Slide(path, default_mpp=0.25) as slide, caplog.at_level(logging.WARNING):
        assert slide.mpp_at(1) == pytest.approx(0.5)
        assert "assuming 0.25 microns per pixel" in caplog.text


def test_blank_slide_has_no_tissue(tmp_path):
    path = tmp_path / "blank.tif"
    white = np.full((1024, 1024, 3), 243, np.uint8)
    write_pyramidal_tiff(
        path, iter([white[i : i + 256] for i in range(0, 1024, 256)]), (1024, 1024), 0.5, compression="deflate"
    )
    with Slide(path) as slide, pytest.raises(SlideError, match=r"blank\.tif: no tissue"):
        slide_tissue_mask(slide)


# -- tissue --------------------------------------------------------------------------------------------------------
def test_tissue_mask_matches_the_known_islands(data):
    with Slide(data["spec"].path) as slide:
        mask, level = slide_tissue_mask(slide)
    truth = _raster(data["spec"].tissue, mask.shape, 4.0)
    assert level == 2
    assert (mask & truth).sum() / (mask | truth).sum() > 0.97


# -- annotations ---------------------------------------------------------------------------------------------------
def test_xml_and_geojson_rasterise_to_the_rendered_tumours(data):
    spec = data["spec"]
    from_xml = tumour_mask(read_annotations(data["xml"], spec.size), (512, 512), 4.0)
    from_geojson = tumour_mask(read_annotations(data["geojson"], spec.size), (512, 512), 4.0)
    truth = _raster(spec.tumours, (512, 512), 4.0)
    assert truth.sum() > 100
    np.testing.assert_array_equal(from_xml, truth)
    np.testing.assert_array_equal(from_geojson, truth)
    # a window at another origin (a patch mask) agrees with the whole-slide raster at level 0
    full = tumour_mask(read_annotations(data["xml"]), (2048, 2048))
    y0, x0 = (int(v) for v in spec.tumours[0].mean(0)[::-1] - 64)
    np.testing.assert_array_equal(
        tumour_mask(read_annotations(data["xml"]), (128, 128), 1.0, (y0, x0)), full[y0 : y0 + 128, x0 : x0 + 128]
    )


def test_exclusion_groups_and_holes(tmp_path):
    square = np.array([[10, 10], [90, 10], [90, 90], [10, 90]], float)
    inner = np.array([[40, 40], [60, 40], [60, 60], [40, 60]], float)
    xml = tmp_path / "ex.xml"
    write_asap_xml(xml, [square])
    text = xml.read_text().replace(
        "</Annotations>",
        '<Annotation Name="cut" Type="Polygon" PartOfGroup="_2"><Coordinates>'
        + "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(inner))
        + "</Coordinates></Annotation></Annotations>",
    )
    xml.write_text(text)
    geo = tmp_path / "holes.geojson"
    ring = lambda p: [list(map(float, v)) for v in p] + [list(map(float, p[0]))]  # noqa: E731
    geo.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "properties": {"classification": {"name": "Tumor"}},
                        "geometry": {"type": "Polygon", "coordinates": [ring(square), ring(inner)]},
                    }
                ],
            }
        )
    )
    for path in (xml, geo):
        mask = tumour_mask(read_annotations(path), (100, 100))
        assert mask[20, 20] and not mask[50, 50] and not mask[5, 5]
        assert mask.sum() == 80 * 80 - 20 * 20


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("outside.xml", None, r"outside\.xml: annotation 'Annotation 0' has 1 vertices outside the slide"),
        ("bowtie.geojson", None, r"bowtie\.geojson: annotation .* is self-intersecting"),
        (
            "other.xml",
            "<?xml version='1.0'?><Annotations><Annotation/></Annotations>",
            r"other\.xml: not an ASAP annotation file",
        ),
        ("broken.xml", "<ASAP_Annotations><Annotations>", r"broken\.xml: not well-formed XML"),
        (
            "point.geojson",
            json.dumps({"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [1, 2]}}),
            r"point\.geojson: .*geometry type 'Point'",
        ),
        ("line.xml", None, r"line\.xml: annotation 'Annotation 0' has 2 distinct vertices"),
        ("a.txt", "x", r"a\.txt: unknown annotation format"),
    ],
)
def test_bad_annotations_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    if name == "outside.xml":
        write_asap_xml(path, [np.array([[10, 10], [3000, 10], [100, 100]], float)])
    elif name == "bowtie.geojson":
        write_geojson(path, [np.array([[0, 0], [100, 100], [100, 0], [0, 100]], float)])
    elif name == "line.xml":
        write_asap_xml(path, [np.array([[0, 0], [50, 50], [50, 50]], float)])
    else:
        path.write_text(content)
    with pytest.raises(AnnotationError, match=message):
        read_annotations(path, (2048, 2048))


# -- patch tables --------------------------------------------------------------------------------------------------
def test_patch_table_labels_follow_tumour_coverage(data, tmp_path):
    spec = data["spec"]
    rows = patch_table(spec.path, data["xml"], level=0, patch_size=64, min_coverage=0.5, min_tissue=0.5)
    truth = _raster(spec.tumours, spec.size)
    tissue = _raster(spec.tissue, spec.size)
    assert {r["label"] for r in rows} == {0, 1}
    for r in rows:
        cover = truth[r["y"] : r["y"] + 64, r["x"] : r["x"] + 64].mean()
        assert abs(cover - r["coverage"]) < 0.1
        assert r["label"] == int(r["coverage"] >= 0.5)
        assert r["coverage"] == 0 or r["label"] == 1  # ambiguous patches dropped
        assert tissue[r["y"] : r["y"] + 64, r["x"] : r["x"] + 64].mean() > 0.4
        assert r["x"] % 64 == 0 and r["y"] % 64 == 0 and r["level"] == 0
    # every grid patch that lies wholly inside tumour is a tumour row
    inside = [(x, y) for y in range(0, 2048, 64) for x in range(0, 2048, 64) if truth[y : y + 64, x : x + 64].all()]
    tumour_rows = {(r["x"], r["y"]) for r in rows if r["label"] == 1}
    assert inside and set(inside) <= tumour_rows
    # level 1 grid: coordinates stay in level-0 pixels
    level1 = patch_table(spec.path, data["geojson"], level=1, patch_size=64, stride=32)
    assert all(r["x"] % 64 == 0 and r["level"] == 1 for r in level1) and any(r["label"] for r in level1)
    path = write_patch_table(rows, tmp_path / "t.csv")
    assert read_patch_table(path) == rows
    normal = patch_table(spec.path, None, level=1, patch_size=64)
    assert normal and all(r["label"] == 0 and r["coverage"] == 0 for r in normal)


def test_balance_patches_and_bad_tables(tmp_path):
    rows = [
        {"slide": "s", "x": i, "y": 0, "level": 0, "label": int(i < 5), "coverage": float(i < 5)} for i in range(40)
    ]
    balanced = balance_patches(rows, seed=3)
    assert sum(r["label"] for r in balanced) == 5 and len(balanced) == 10
    assert balanced == balance_patches(rows, seed=3) and balanced != balance_patches(rows, seed=4)
    assert len(balance_patches(rows, max_per_class=2)) == 4
    with pytest.raises(ValueError, match="needs tumour and normal"):
        balance_patches(rows[5:])
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,x,y,level,label\ns,1,2,0,1\ns,one,2,0,0\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 3"):
        read_patch_table(bad)
    bad.write_text("slide,x,y\ns,1,2\n")
    with pytest.raises(ValueError, match=r"bad\.csv: patch table lacks columns \['level', 'label'\]"):
        read_patch_table(bad)


def test_lesion_patch_masks_through_monai_patch_dataset(data):
    spec = data["spec"]
    rows = [
        r
        for r in patch_table(spec.path, data["xml"], level=1, patch_size=64, min_coverage=0.2, drop_ambiguous=False)
        if 0 < r["coverage"] < 1
    ][:3]
    items = patch_items(rows, {str(spec.path): str(data["xml"])}, patch_size=64)
    assert items[0]["location"] == [rows[0]["y"], rows[0]["x"]] and items[0]["size"] == [64, 64]
    items.append({"image": str(spec.path), "location": [0, 0], "label": 0, "annotation": ""})
    ds = PatchWSIDataset(
        items,
        patch_size=64,
        patch_level=1,
        reader=TiledTiffFileWSIReader,
        center_location=False,
        additional_meta_keys=["annotation"],
        transform=LesionPatchMaskd(),
    )
    truth = _raster(spec.tumours, (1024, 1024), 2.0)
    for item, row in zip(ds, rows):
        y, x = row["y"] // 2, row["x"] // 2
        assert item["mask"].shape == (1, 64, 64) and item["has_mask"] is True
        np.testing.assert_array_equal(item["mask"][0].numpy().astype(bool), truth[y : y + 64, x : x + 64])
        assert 0 < item["mask"].mean() < 1
    assert ds[len(rows)]["mask"].sum() == 0


# -- stain ---------------------------------------------------------------------------------------------------------
def test_hed_jitter():
    rng = np.random.default_rng(0)
    image = rng.integers(60, 250, (3, 16, 16)).astype(np.float32)
    same = hed_jitter(image, [1, 1, 1], [0, 0, 0])
    assert np.abs(same - image).max() < 1.0
    more_h = hed_jitter(image, [1.3, 1, 1], [0, 0, 0])
    assert more_h.mean() < image.mean()  # more haematoxylin absorbs more light
    t = RandHEDJitterd("image", prob=1.0, sigma_alpha=0.2, sigma_beta=0.02)
    t.set_random_state(7)
    a = t({"image": torch.as_tensor(image)})["image"]
    t.set_random_state(7)
    b = t({"image": torch.as_tensor(image)})["image"]
    assert torch.equal(a, b) and not torch.allclose(a, torch.as_tensor(image), atol=1.0)
    assert a.dtype == torch.float32 and 0 <= float(a.min()) and float(a.max()) <= 255
    off = RandHEDJitterd("image", prob=0.0)({"image": image})["image"]
    assert off is image


def test_read_slide_labels(tmp_path):
    labels = make_wsi_dataset(tmp_path, 2, seed=0, size=1024, tumour_rate=0.5, compression="deflate")
    rows = read_slide_labels(labels)
    assert sorted(r["label"] for r in rows) == [0, 1]
    for r in rows:
        with Slide(r["image"]) as slide:
            assert slide.name == r["slide"]
        assert bool(r["annotation"]) == bool(r["label"])
        if r["annotation"]:
            assert read_annotations(r["annotation"], (1024, 1024))
    table = slides_patch_table(rows, level=0, patch_size=64, min_tissue=0.25)
    tumour_image = next(r["image"] for r in rows if r["label"])
    assert {r["slide"] for r in table} == {r["image"] for r in rows}
    assert all(t["slide"] == tumour_image for t in table if t["label"])
    unannotated = [{**r, "annotation": ""} for r in rows]
    assert {t["slide"] for t in slides_patch_table(unannotated, level=0, patch_size=64)} == {
        r["image"] for r in rows if not r["label"]
    }
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,label,image,annotation_xml\ns,2,x.tif,\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 2: label must be 0 or 1"):
        read_slide_labels(bad)
