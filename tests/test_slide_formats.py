"""Whole-slide formats as scanners write them, each written here with tifffile (or by hand): Aperio SVS, generic
pyramidal TIFF with resolution tags in cm and inch, OME-TIFF, Hamamatsu NDPI, single-level slides, and broken
files (corrupt tile, unsupported compression, truncated) in slide reading, tissue detection, patch extraction
and inference."""

from __future__ import annotations

import csv
import io
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import run
from monai.data import PatchWSIDataset
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, VLWholeSlideMicroscopyImageStorage, generate_uid
from torch import nn

from medgain.cli import build_parser
from medgain.cli import main as medgain_main
from medgain.synth import make_wsi_dataset, make_wsi_slide
from medgain.wsi import (
    Slide,
    SlideError,
    SlideInferer,
    TiledTiffFileWSIReader,
    patch_items,
    patch_table,
    run_inference,
    wsi_reader,
)
from medgain.wsi.tissue import slide_tissue_mask


def _pyramid(size: int = 1024, levels: int = 3, seed: int = 0) -> list[np.ndarray]:
    """RGB levels, each the 2x2 mean of the one above: a pink 'tissue' disc on white with some noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    base = np.where(disc[..., None], [200, 120, 170], [245, 245, 245]).astype(np.float64)
    base += rng.normal(0, 8, base.shape)
    out = [np.clip(base, 0, 255).astype(np.uint8)]
    for _ in range(levels - 1):
        prev = out[-1].astype(np.float64)
        half = prev.reshape(prev.shape[0] // 2, 2, prev.shape[1] // 2, 2, 3).mean((1, 3))
        out.append(np.round(half).astype(np.uint8))
    return out


def _svs_description(width: int, height: int, fields: str) -> str:
    return f"Aperio Image Library v12.0.0 \r\n{width}x{height} [0,0 {width}x{height}] (256x256) JPEG/RGB Q=80{fields}"


def write_svs(path: Path, levels: list[np.ndarray], fields: str = "|AppMag = 40|MPP = 0.2520", **options) -> Path:
    """An Aperio-style SVS: tiled baseline, stripped thumbnail, tiled lower levels, label and macro images."""
    kw = {"photometric": "rgb", "compression": "jpeg", "metadata": None, **options}
    h, w = levels[0].shape[:2]
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], tile=(256, 256), description=_svs_description(w, h, fields), **kw)
        thumb = levels[-1][::2, ::2]
        tif.write(thumb, description=_svs_description(w, h, f" -> {thumb.shape[1]}x{thumb.shape[0]}"), **kw)
        for level in levels[1:]:
            size = f" -> {level.shape[1]}x{level.shape[0]}"
            tif.write(level, tile=(128, 128), description=_svs_description(w, h, size), **kw)
        tif.write(np.full((64, 64, 3), 90, np.uint8), subfiletype=1, description="Aperio Image Library label", **kw)
        tif.write(np.full((64, 160, 3), 60, np.uint8), subfiletype=9, description="Aperio Image Library macro", **kw)
    return path


def write_tiled_pyramid(path: Path, levels: list[np.ndarray], **options) -> Path:
    """A generic pyramidal TIFF: levels as consecutive reduced-resolution pages (Camelyon's layout)."""
    with tifffile.TiffWriter(path) as tif:
        for k, level in enumerate(levels):
            res = options.get("resolution")
            level_options = {**options, **({"resolution": (res[0] / 2**k, res[1] / 2**k)} if res else {})}
            tif.write(level, tile=(128, 128), photometric="rgb", compression="deflate", subfiletype=1 if k else 0,
                      metadata=None, **level_options)
    return path


def write_ndpi(path: Path, levels: list[np.ndarray], mpp: float, magnification: float) -> Path:
    """A minimal Hamamatsu NDPI: little-endian TIFF with 64-bit IFD offsets (the 4 high bytes of each tag value
    after the IFD), one uncompressed strip per level, Make "Hamamatsu", the NDPI format flag (65420), the
    magnification tag (65421; -1 for the macro image) and resolution tags in pixels per centimetre."""
    out = bytearray(b"II*\x00" + bytes(8))
    pointer = 4  # where the offset of the next IFD goes
    pages = [(level, magnification / 2**k, mpp * 2**k) for k, level in enumerate(levels)]
    pages.append((np.full((48, 96, 3), 80, np.uint8), -1.0, None))
    for image, mag, level_mpp in pages:
        h, w = image.shape[:2]

        def put(data: bytes) -> int:
            if len(out) % 2:
                out.append(0)
            at = len(out)
            out.extend(data)
            return at

        pixels = put(image.tobytes())
        bits = put(struct.pack("<3H", 8, 8, 8))
        make = put(b"Hamamatsu\x00")
        entries = [
            (256, 4, 1, struct.pack("<I", w)), (257, 4, 1, struct.pack("<I", h)), (258, 3, 3, struct.pack("<I", bits)),
            (259, 3, 1, struct.pack("<HH", 1, 0)), (262, 3, 1, struct.pack("<HH", 2, 0)),
            (271, 2, 10, struct.pack("<I", make)), (273, 4, 1, struct.pack("<I", pixels)),
            (277, 3, 1, struct.pack("<HH", 3, 0)), (278, 4, 1, struct.pack("<I", h)),
            (279, 4, 1, struct.pack("<I", image.nbytes)),
        ]
        if level_mpp is not None:
            res = put(struct.pack("<2I", round(1e4 / level_mpp * 1000), 1000))
            entries += [(282, 5, 1, struct.pack("<I", res)), (283, 5, 1, struct.pack("<I", res)),
                        (296, 3, 1, struct.pack("<HH", 3, 0))]
        entries += [(65420, 4, 1, struct.pack("<I", 1)), (65421, 11, 1, struct.pack("<f", mag))]
        ifd = put(struct.pack("<H", len(entries)))
        out[pointer : pointer + 8] = struct.pack("<Q", ifd)
        for tag, dtype, count, value in entries:
            out.extend(struct.pack("<HHI", tag, dtype, count) + value)
        pointer = len(out)
        out.extend(bytes(8) + bytes(4 * len(entries)))  # next IFD (patched by the next page), high bytes
    path.write_bytes(bytes(out))
    return path


def write_dicom_wsi(folder: Path, levels: list[np.ndarray], mpp: float, tile: int = 64) -> Path:
    """A DICOM whole-slide image: one VL Whole Slide Microscopy instance per level (TILED_FULL, uncompressed
    RGB frames) in one series; returns the level-0 file."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    for k, image in enumerate(levels):
        h, w = image.shape[:2]
        ty, tx = -(-h // tile), -(-w // tile)
        padded = np.zeros((ty * tile, tx * tile, 3), np.uint8)
        padded[:h, :w] = image
        frames = padded.reshape(ty, tile, tx, tile, 3).swapaxes(1, 2)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.Modality, ds.InstanceNumber, ds.DimensionOrganizationType = "SM", k + 1, "TILED_FULL"
        ds.ImageType = ["ORIGINAL" if k == 0 else "DERIVED", "PRIMARY", "VOLUME", "NONE" if k == 0 else "RESAMPLED"]
        ds.Rows = ds.Columns = tile
        ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = h, w
        ds.TotalPixelMatrixFocalPlanes = ds.NumberOfFocalPlanes = ds.NumberOfOpticalPaths = 1
        ds.NumberOfFrames = ty * tx
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.ImagedVolumeWidth = ds.ImagedVolumeHeight = levels[0].shape[0] * mpp / 1000  # millimetres
        spacing = mpp * levels[0].shape[0] / h / 1000
        measures = Dataset()
        measures.PixelSpacing, measures.SliceThickness = [spacing, spacing], 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = DicomSequence([measures])
        ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
        optical = Dataset()
        optical.OpticalPathIdentifier = "1"
        ds.OpticalPathSequence = DicomSequence([optical])
        ds.PixelData = np.ascontiguousarray(frames).tobytes()
        ds.save_as(folder / f"level{k}.dcm", enforce_file_format=True)
    return folder / "level0.dcm"


def write_mirax(path: Path, levels: list[np.ndarray], mpp: float, tile: int = 128) -> Path:
    """A MIRAX slide: ``<name>.mrxs`` and the folder ``<name>/`` with Slidedat.ini, Index.dat and one data file of
    PNG images, one per tile and level (no camera overlap, no position map: images on a regular grid); level k's
    images each cover 2**k x 2**k level-0 images."""
    folder = path.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    slide_id = "5c1e7f0a-0000-4000-8000-000000000001"
    across, down = levels[0].shape[1] // tile, levels[0].shape[0] // tile
    data, pages = bytearray(), []
    for k, level in enumerate(levels):
        records, step = [], 2**k
        for r in range(0, down, step):
            for c in range(0, across, step):
                top, left = r // step * tile, c // step * tile
                buf = io.BytesIO()
                Image.fromarray(level[top : top + tile, left : left + tile]).save(buf, format="PNG")
                records.append((r * across + c, len(data), len(buf.getvalue()), 0))  # image index, offset, size, file
                data += buf.getvalue()
        pages.append(records)
    (folder / "Data0000.dat").write_bytes(bytes(data))
    head = b"01.02" + slide_id.encode()
    index = bytearray(head + bytes(8 + 4 * len(levels)))  # hier root, nonhier root, one pointer per level
    struct.pack_into("<i", index, len(head), len(head) + 8)
    for k, records in enumerate(pages):
        struct.pack_into("<i", index, len(head) + 8 + 4 * k, len(index))
        index += struct.pack("<iiii", 0, len(index) + 8, len(records), 0)  # 0, first page; page: length, no next
        for record in records:
            index += struct.pack("<iiii", *record)
    (folder / "Index.dat").write_bytes(bytes(index))
    ini = ["[GENERAL]", "SLIDE_VERSION=01.03", f"SLIDE_ID={slide_id}", f"IMAGENUMBER_X={across}",
           f"IMAGENUMBER_Y={down}", "OBJECTIVE_MAGNIFICATION=20", "CameraImageDivisionsPerSide=1", "[HIERARCHICAL]",
           "HIER_COUNT=1", "HIER_0_NAME=Slide zoom level", f"HIER_0_COUNT={len(levels)}", "NONHIER_COUNT=0",
           "INDEXFILE=Index.dat"]
    ini += [f"HIER_0_VAL_{k}_SECTION=LAYER_0_LEVEL_{k}_SECTION" for k in range(len(levels))]
    ini += ["[DATAFILE]", "FILE_COUNT=1", "FILE_0=Data0000.dat"]
    for k in range(len(levels)):
        ini += [f"[LAYER_0_LEVEL_{k}_SECTION]", "OVERLAP_X=0", "OVERLAP_Y=0", f"MICROMETER_PER_PIXEL_X={mpp * 2**k}",
                f"MICROMETER_PER_PIXEL_Y={mpp * 2**k}", "IMAGE_FORMAT=PNG", "IMAGE_FILL_COLOR_BGR=16777215",
                f"DIGITIZER_WIDTH={tile}", f"DIGITIZER_HEIGHT={tile}", f"IMAGE_CONCAT_FACTOR={min(k, 1)}"]
    (folder / "Slidedat.ini").write_text("\n".join(ini) + "\n")
    return path


def _zero_tiles(path: Path) -> None:
    """Overwrite every tile of every page with zero bytes: the file opens, no tile decodes."""
    with tifffile.TiffFile(path) as tif:
        spans = [(o, c) for page in tif.pages for o, c in zip(page.dataoffsets, page.databytecounts)]
    raw = bytearray(path.read_bytes())
    for offset, count in spans:
        raw[offset : offset + count] = bytes(count)
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def levels():
    return _pyramid()


# -- formats and their microns per pixel ---------------------------------------------------------------------------
def test_aperio_svs_levels_mpp_and_magnification(levels, tmp_path):
    path = write_svs(tmp_path / "case.svs", levels)
    with Slide(path) as slide:  # was: AttributeError 'TiffFile' object has no attribute 'svs_metadata'
        assert slide.mpp == pytest.approx(0.252) and slide.mpp_source == "Aperio MPP"
        assert slide.magnification == 40.0
        # the pyramid without the thumbnail (page 1), label and macro
        assert slide.stored_levels == 3 and slide.level_shapes == [(1024, 1024), (512, 512), (256, 256)]
        assert slide.downsamples == [1.0, 2.0, 4.0] and slide.mpp_at(2) == pytest.approx(1.008)
        region = slide.read_region((256, 512), (64, 96), 1)
        assert region.shape == (3, 64, 96)
        np.testing.assert_allclose(region.mean((1, 2)), levels[1][128:192, 256:352].mean((0, 1)), atol=3)
    without = write_svs(tmp_path / "nompp.svs", levels, fields="|AppMag = 20")
    with Slide(without) as slide:
        assert slide.mpp is None and slide.magnification == 20.0
        with pytest.raises(SlideError, match=r"nompp\.svs: no resolution tags.*--mpp"):
            slide.mpp_at(0, "the tissue mask")


@pytest.mark.parametrize(
    ("unit", "per_unit", "expected"),
    [("CENTIMETER", 1e4 / 0.5, 0.5), ("INCH", 25400 / 0.25, 0.25), ("MILLIMETER", 1e3 / 2.0, 2.0)],
)
def test_generic_pyramidal_tiff_mpp_from_resolution_tags(levels, tmp_path, unit, per_unit, expected):
    path = write_tiled_pyramid(tmp_path / "camelyon.tif", levels, resolution=(per_unit, per_unit), resolutionunit=unit)
    with Slide(path) as slide:
        assert slide.mpp == pytest.approx(expected) and slide.mpp_source == "TIFF resolution tags"
        assert slide.level_count == slide.stored_levels == 3 and slide.magnification is None
        region = slide.read_region((128, 256), (32, 48), 2)
        np.testing.assert_array_equal(region, levels[2][32:64, 64:112].transpose(2, 0, 1))


def test_screen_resolution_and_unitless_tags_are_not_microns(levels, tmp_path, caplog):
    dpi72 = write_tiled_pyramid(tmp_path / "photo.tif", levels, resolution=(72, 72), resolutionunit="INCH")
    with caplog.at_level(logging.WARNING), Slide(dpi72) as slide:
        assert slide.mpp is None and slide.mpp_source is None
        assert "photo.tif: resolution tags of 72 pixels per inch" in caplog.text and "ignored" in caplog.text
        with pytest.raises(SlideError, match=r"photo\.tif: no resolution tags.*FROC.*--mpp"):
            slide.mpp_at(0, "FROC")
    unitless = write_tiled_pyramid(tmp_path / "nounit.tif", levels, resolution=(4, 4), resolutionunit="NONE")
    with Slide(unitless) as slide:
        assert slide.mpp is None
    with Slide(unitless, default_mpp=0.5) as slide, caplog.at_level(logging.WARNING):
        assert slide.mpp_at(1) == pytest.approx(1.0) and "assuming 0.5 microns per pixel" in caplog.text
    for option in ("--mpp", "--default-mpp"):  # the option the error names, and its former spelling
        args = build_parser().parse_args(["wsi", "patches", "--labels", "l.csv", "--out", "o", option, "0.5"])
        assert args.default_mpp == 0.5


@pytest.mark.parametrize(("size", "unit", "expected"), [(0.5, "\u00b5m", 0.5), (250, "nm", 0.25)])
def test_ome_tiff_physical_size_with_unit(levels, tmp_path, size, unit, expected):
    path = tmp_path / "scan.ome.tif"
    meta = {"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeXUnit": unit, "PhysicalSizeY": size,
            "PhysicalSizeYUnit": unit}
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(levels[0], subifds=2, tile=(128, 128), photometric="rgb", compression="deflate", metadata=meta)
        for level in levels[1:]:  # sub-resolution levels in sub-IFDs, as OME-TIFF stores them
            tif.write(level, subfiletype=1, tile=(128, 128), photometric="rgb", compression="deflate")
    with Slide(path) as slide:
        assert slide.mpp == pytest.approx(expected) and slide.mpp_source == "OME PhysicalSizeX"
        assert slide.level_shapes == [(1024, 1024), (512, 512), (256, 256)]
        np.testing.assert_array_equal(slide.read_level(2), levels[2].transpose(2, 0, 1))


def test_hamamatsu_ndpi_levels_mpp_and_magnification(tmp_path):
    small = _pyramid(512, 3, seed=3)
    path = write_ndpi(tmp_path / "scan.ndpi", small, mpp=0.4545, magnification=20.0)
    with Slide(path) as slide:
        assert slide.mpp == pytest.approx(0.4545, rel=1e-4) and slide.magnification == 20.0
        assert slide.level_shapes == [(512, 512), (256, 256), (128, 128)]  # the macro image is not a level
        region = slide.read_region((64, 128), (40, 24), 1)
        np.testing.assert_array_equal(region, small[1][32:72, 64:88].transpose(2, 0, 1))


def test_single_level_slide_gets_computed_levels(tmp_path, caplog):
    image = _pyramid(1024, 1, seed=5)[0][:900, :1000]
    path = tmp_path / "region.tif"
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="deflate",
                     resolution=(1e4, 1e4), resolutionunit="CENTIMETER")
    with caplog.at_level(logging.WARNING), Slide(path) as slide:  # was: SlideError "not a pyramidal slide"
        assert "region.tif: a single stored level (1000x900)" in caplog.text and "slow" in caplog.text
        assert slide.stored_levels == 1 and slide.level_count == 3
        assert slide.level_shapes == [(900, 1000), (450, 500), (225, 250)] and slide.downsamples == [1.0, 2.0, 4.0]
        expected = image[:896, :1000].reshape(224, 4, 250, 4, 3).mean((1, 3))
        np.testing.assert_array_equal(slide.read_region((0, 0), (224, 250), 2), np.round(expected).transpose(2, 0, 1))
        np.testing.assert_array_equal(slide.read_region((8, 16), (20, 30), 0), image[8:28, 16:46].transpose(2, 0, 1))
        mask, level = slide_tissue_mask(slide)
        assert level == 2 and mask.shape == (225, 250) and mask.any()
    stripped = tmp_path / "stripped.tif"  # strips, not tiles: read strip by strip
    tifffile.imwrite(stripped, image, photometric="rgb", rowsperstrip=64, compression="deflate")
    with Slide(stripped) as slide:
        region = slide.read_region((100, 30), (70, 20), 0)
        np.testing.assert_array_equal(region, image[100:170, 30:50].transpose(2, 0, 1))


# -- broken files --------------------------------------------------------------------------------------------------
def test_corrupt_tiles_give_a_slide_error_everywhere(tmp_path):
    spec = make_wsi_slide(tmp_path / "corrupt.tif", seed=2, size=1024, tumour=False, mpp=1.0, compression="deflate")
    _zero_tiles(spec.path)
    with Slide(spec.path) as slide:  # opens: the damage shows on the first read
        with pytest.raises(SlideError, match=r"corrupt\.tif: .*tile \d+ of level 0 cannot be decoded.*DEFLATE"):
            slide.read_region((0, 0), (64, 64), 0)
        with pytest.raises(SlideError, match=r"corrupt\.tif: .*cannot be decoded"):  # tissue detection
            slide_tissue_mask(slide)
    with pytest.raises(SlideError, match=r"corrupt\.tif: .*cannot be decoded"):  # patch extraction
        patch_table(spec.path, None, 0, 64)
    items = [{"image": str(spec.path), "location": [0, 0], "label": 0}]  # training's patch reader
    with pytest.raises(SlideError, match=r"corrupt\.tif: tile \d+ of level 0 cannot be decoded"):
        PatchWSIDataset(items, patch_size=32, patch_level=0, reader=TiledTiffFileWSIReader)[0]
    good = make_wsi_slide(tmp_path / "good.tif", seed=3, size=1024, tumour=False, mpp=1.0, compression="deflate")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    inferer = SlideInferer(net, "0", patch_size=64, level=1, stride=64, batch_size=16)
    summary = run_inference([spec.path, good.path], tmp_path / "out", inferer)  # inference: a row of errors.csv
    assert summary["failed"] == ["corrupt"] and summary["done"] == ["good"]
    (row,) = csv.DictReader((tmp_path / "out" / "errors.csv").open())
    assert row["slide"] == "corrupt" and row["error"].startswith("SlideError: ") and "cannot be decoded" in row["error"]


def test_unsupported_compression_and_truncated_svs(levels, tmp_path):
    odd = write_tiled_pyramid(tmp_path / "odd.tif", levels)
    with tifffile.TiffFile(odd, mode="r+b") as tif:
        tif.pages[0].tags["Compression"].overwrite(60123)  # no codec knows this value
    with pytest.raises(SlideError, match=r"odd\.tif: level 0 uses compression 60123.*unsupported compression"):
        Slide(odd)
    svs = write_svs(tmp_path / "whole.svs", levels)
    cut = tmp_path / "cut.svs"
    raw = svs.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SlideError, match=r"cut\.svs: .*(truncated|cannot be read)"):
        Slide(cut)


# -- the OpenSlide backend -----------------------------------------------------------------------------------------
def test_openslide_reads_the_same_formats(levels, tmp_path):
    pytest.importorskip("openslide", reason="the openslide backend needs openslide-python and openslide-bin")
    svs = write_svs(tmp_path / "case.svs", levels)
    with Slide(svs, backend="openslide") as slide, Slide(svs) as ours:
        assert slide.mpp == pytest.approx(0.252) and slide.mpp_source == "openslide.mpp-x"
        assert slide.magnification == 40.0 and slide.level_shapes == ours.level_shapes
    dpi72 = write_tiled_pyramid(tmp_path / "photo.tif", levels, resolution=(72, 72), resolutionunit="INCH")
    with Slide(dpi72, backend="openslide") as slide:
        assert slide.mpp is None


def test_openslide_reads_dicom_wsi(tmp_path):
    pytest.importorskip("openslide", reason="the openslide backend needs openslide-python and openslide-bin")
    small = _pyramid(512, 3, seed=4)
    first = write_dicom_wsi(tmp_path / "series", small, mpp=0.25)
    with Slide(first, backend="openslide") as slide:  # one file of the series opens the whole pyramid
        assert slide.mpp == pytest.approx(0.25) and slide.mpp_source == "openslide.mpp-x"
        assert slide.level_shapes == [(512, 512), (256, 256), (128, 128)]
        region = slide.read_region((64, 128), (16, 32), 1)
        np.testing.assert_array_equal(region, small[1][32:48, 64:96].transpose(2, 0, 1))
    with pytest.raises(SlideError, match=r"level0\.dcm: cannot be read as a whole-slide image with the tifffile"):
        Slide(first)


def test_openslide_reads_mirax(tmp_path):
    pytest.importorskip("openslide", reason="the openslide backend needs openslide-python and openslide-bin")
    small = _pyramid(512, 3, seed=6)
    path = write_mirax(tmp_path / "scan.mrxs", small, mpp=0.243)
    with Slide(path, backend="openslide") as slide:
        assert slide.mpp == pytest.approx(0.243) and slide.magnification == 20.0
        assert slide.level_shapes == [(512, 512), (256, 256), (128, 128)]
        region = slide.read_region((192, 320), (40, 60), 1)
        np.testing.assert_array_equal(region, small[1][96:136, 160:220].transpose(2, 0, 1))


# -- single-level slides in training: the reader's computed levels are Slide's -------------------------------------
def _single_level(path: Path, mpp: float) -> Path:
    """Overwrite a pyramidal TIFF with its level 0 alone (tiled, deflate, resolution tags kept)."""
    image = tifffile.imread(path, level=0)
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="deflate",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path


def test_single_level_slide_patches_at_a_computed_level_train_as_slide_reads_them(tmp_path, caplog):
    spec = make_wsi_slide(tmp_path / "export.tif", seed=8, size=1024, tumour=True, mpp=1.0, compression="deflate")
    path = _single_level(spec.path, mpp=1.0)
    image = tifffile.imread(path)
    rows = patch_table(path, None, 1, 48)  # level 1 exists only computed
    assert rows and {int(r["level"]) for r in rows} == {1}
    items = patch_items(rows, patch_size=48) + [{"image": str(path), "location": [3, 5], "label": 0}]
    reader = wsi_reader("tifffile")  # as train.yaml builds its datasets
    caplog.clear()  # patch_table's Slide warned already
    with caplog.at_level(logging.WARNING):
        dataset = PatchWSIDataset(items, patch_size=(48, 48), patch_level=1, center_location=False, reader=reader)
        patches = [dataset[i]["image"] for i in range(len(dataset))]
    assert caplog.text.count("export.tif: a single stored level (1024x1024)") == 1  # once per slide, not per patch
    wsi = reader.read(str(path))
    assert reader.get_stored_level_count(wsi) == 1 and reader.get_level_count(wsi) == 3
    assert [reader.get_size(wsi, k) for k in range(3)] == [(1024, 1024), (512, 512), (256, 256)]
    assert [reader.get_downsample_ratio(wsi, k) for k in range(3)] == [1.0, 2.0, 4.0]
    assert reader.get_mpp(wsi, 2) == pytest.approx((4.0, 4.0))
    wsi.close()
    with Slide(path) as slide:
        assert slide.level_shapes == [(1024, 1024), (512, 512), (256, 256)] and slide.mpp_at(1) == pytest.approx(2.0)
        for item, patch in zip(items, patches):
            top, left = item["location"]
            expected = slide.read_region((top, left), (48, 48), 1)
            np.testing.assert_array_equal(np.asarray(patch), expected)
            block = image[top : top + 96, left : left + 96].astype(np.float64).reshape(48, 2, 48, 2, 3).mean((1, 3))
            np.testing.assert_array_equal(expected, np.round(block).transpose(2, 0, 1))


def test_openslide_reader_gives_a_single_level_slide_the_same_computed_levels(tmp_path):
    pytest.importorskip("openslide", reason="the openslide backend needs openslide-python and openslide-bin")
    spec = make_wsi_slide(tmp_path / "export.tif", seed=9, size=768, tumour=False, mpp=1.0, compression="deflate")
    path = _single_level(spec.path, mpp=1.0)
    items = [{"image": str(path), "location": [101, 37], "label": 0}]
    reader = wsi_reader("openslide")
    dataset = PatchWSIDataset(items, patch_size=40, patch_level=2, center_location=False, reader=reader)
    with Slide(path, backend="openslide") as slide, Slide(path) as ours:
        assert slide.stored_levels == 1 and slide.level_shapes == [(768, 768), (384, 384), (192, 192)]
        assert slide.level_shapes == ours.level_shapes and slide.downsamples == ours.downsamples
        assert slide.mpp_at(2) == pytest.approx(4.0)
        region = slide.read_region((101, 37), (40, 40), 2)
        np.testing.assert_array_equal(np.asarray(dataset[0]["image"]), region)
        np.testing.assert_array_equal(region, ours.read_region((101, 37), (40, 40), 2))


def test_wsi_bundle_trains_on_single_level_slides_at_level_1(tmp_path):
    labels = make_wsi_dataset(tmp_path / "slides", 6, seed=1, size=1024, tumour_rate=0.5, mpp=2.0,
                              compression="deflate")
    for slide in sorted((tmp_path / "slides" / "images").glob("*.tif")):
        _single_level(slide, mpp=2.0)
    data = tmp_path / "data"
    args = ["wsi", "patches", "--labels", str(labels), "--out", str(data), "--level", "1", "--patch-size", "32",
            "--max-eval-patches", "40"]
    assert medgain_main(args) == 0
    configs = Path(__file__).resolve().parents[1] / "bundles" / "wsi_patch_gain" / "configs"
    root = tmp_path / "bundle"
    run("training", meta_file=str(configs / "metadata.json"), config_file=str(configs / "train.yaml"),
        logging_file=str(configs / "logging.conf"), bundle_root=str(root), dataset_dir=str(data), max_epochs=1,
        network="small_cnn", patch_size=32, level=1, batch_size=8, num_workers=0)
    assert (root / "models" / "checkpoint_epoch=1.pt").is_file()  # the epoch ran to its end
