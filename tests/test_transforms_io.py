"""Tests for medgain.transforms: frame / label-map loading and LabelMapToMaskd."""

from __future__ import annotations

import io
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, RandFlipd, RandRotate90d, Resized
from PIL import Image
from pydicom import dcmread
from pydicom.pixels import convert_color_space
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit
from torch.utils.data import DataLoader
from conftest import dicom_dataset, write_dicom

from medgain.transforms import (
    LabelMapToMaskd,
    LoadFramed,
    LoadLabelMapd,
    ResizeLesionMaskd,
    count_frames,
    iter_frames,
    read_frame,
    read_label_map,
)

RNG = np.random.default_rng(0)
RGB8 = RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8)
GREY8 = RNG.integers(0, 256, (4, 5), dtype=np.uint8)


def grey3(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=-1).astype(np.float32)


@pytest.mark.parametrize(
    "mode, array, expected",
    [
        ("RGB", RGB8, RGB8 / 255.0),
        ("L", GREY8, grey3(GREY8 / 255.0)),
        ("RGBA", np.dstack([RGB8, np.zeros((4, 5), np.uint8)]), RGB8 / 255.0),
        ("LA", np.dstack([GREY8, np.full((4, 5), 7, np.uint8)]), grey3(GREY8 / 255.0)),
        ("I;16", (GREY8.astype(np.uint16) * 257), grey3(GREY8 / 255.0)),
    ],
)
def test_png_modes(tmp_path, mode, array, expected):
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    with Image.open(path) as img:
        assert img.mode == mode
    out = read_frame(path)
    assert out.shape == (4, 5, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_png_palette(tmp_path):
    path = tmp_path / "p.png"
    img = Image.fromarray(np.array([[0, 1], [1, 2]], np.uint8), "P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 51, 255])
    img.info["transparency"] = 0
    img.save(path)
    expected = np.array([[[0, 0, 0], [1, 0, 0]], [[1, 0, 0], [0, 0.2, 1]]], np.float32)
    np.testing.assert_allclose(read_frame(path), expected, atol=1e-6)


def test_pil_mode_i_scaled_as_16_bit(tmp_path):
    path = tmp_path / "i.tif"
    Image.fromarray(np.array([[0, 65535]], np.int32), "I").save(path)
    np.testing.assert_allclose(read_frame(path)[..., 1], [[0.0, 1.0]], atol=1e-6)


def test_jpeg(tmp_path):
    path = tmp_path / "x.jpg"
    Image.fromarray(np.full((8, 8, 3), (200, 100, 50), np.uint8)).save(path, quality=95)
    np.testing.assert_allclose(read_frame(path), np.full((8, 8, 3), (200, 100, 50)) / 255.0, atol=4 / 255)


def test_dicom_rgb_grey_and_ybr(tmp_path):
    np.testing.assert_allclose(read_frame(write_dicom(tmp_path / "rgb.dcm", RGB8, "RGB", 8)), RGB8 / 255.0)
    mono2 = write_dicom(tmp_path / "m2.dcm", GREY8, "MONOCHROME2", 8)
    np.testing.assert_allclose(read_frame(mono2), grey3(GREY8 / 255.0), atol=1e-6)
    mono1 = write_dicom(tmp_path / "m1.dcm", GREY8, "MONOCHROME1", 8)
    np.testing.assert_allclose(read_frame(mono1), grey3(1.0 - GREY8 / 255.0), atol=1e-6)
    ybr = write_dicom(tmp_path / "ybr.dcm", convert_color_space(RGB8, "RGB", "YBR_FULL"), "YBR_FULL", 8)
    np.testing.assert_allclose(read_frame(ybr), RGB8 / 255.0, atol=2 / 255)


def test_dicom_jpeg_baseline_ybr_full_422_clip(tmp_path):
    colours = [(200, 100, 50), (10, 200, 30)]
    fragments = []
    for colour in colours:
        buffer = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(buffer, format="JPEG", quality=95)
        fragments.append(buffer.getvalue())
    ds = dicom_dataset(JPEGBaseline8Bit)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 16, 16, 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    path = tmp_path / "jpeg_clip.dcm"
    ds.save_as(path, enforce_file_format=True)
    for frame, colour in enumerate(colours):
        np.testing.assert_allclose(read_frame(path, frame), np.full((16, 16, 3), colour) / 255.0, atol=3 / 255)


def test_dicom_16_bit_uses_bits_stored(tmp_path):
    values = np.array([[0, 1000], [2048, 4095]], np.uint16)
    path = write_dicom(tmp_path / "g12.dcm", values, "MONOCHROME2", 12)
    np.testing.assert_allclose(read_frame(path), grey3(values / 4095.0), atol=1e-6)


def test_dicom_multi_frame(tmp_path):
    clip = RNG.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    path = write_dicom(tmp_path / "clip.dcm", clip, "RGB", 8)
    assert count_frames(path) == 3
    np.testing.assert_allclose(read_frame(path, frame=2), clip[2] / 255.0)
    np.testing.assert_allclose(read_frame(path, frame=1), clip[1] / 255.0)
    frames = list(iter_frames(path))
    assert len(frames) == 3
    np.testing.assert_allclose(frames[0], clip[0] / 255.0)
    d = LoadFramed()({"image": str(path), "frame": 1})
    assert d["frame"] == 1 and d["image_path"] == str(path)
    np.testing.assert_allclose(d["image"].numpy(), clip[1].transpose(2, 0, 1) / 255.0)


def test_load_framed_output(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(RGB8).save(path)
    d = LoadFramed()({"image": str(path), "label": 1})
    assert isinstance(d["image"], torch.Tensor) and d["image"].dtype == torch.float32
    assert tuple(d["image"].shape) == (3, 4, 5)
    assert d["frame"] == 0 and d["image_path"] == str(path) and d["label"] == 1
    assert count_frames(path) == 1


def test_corrupt_and_missing_files(tmp_path):
    png = tmp_path / "bad.png"
    Image.fromarray(RGB8).save(png)
    png.write_bytes(png.read_bytes()[:-30])
    with pytest.raises(ValueError, match=re.escape(str(png))):
        read_frame(png)
    with pytest.raises(ValueError, match="bad.png: cannot decode"):
        LoadFramed()({"image": str(png)})

    clip = write_dicom(tmp_path / "trunc.dcm", RNG.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8), "RGB", 8)
    clip.write_bytes(clip.read_bytes()[:-30])
    with pytest.raises(ValueError, match=r"trunc\.dcm: cannot decode pixel data of frame 2"):
        read_frame(clip, frame=2)
    with pytest.raises(ValueError, match=r"trunc\.dcm: cannot decode pixel data of frame 2"):
        list(iter_frames(clip))
    header_only = write_dicom(tmp_path / "head.dcm", RGB8, "RGB", 8)
    header_only.write_bytes(header_only.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"head\.dcm: DICOM header has no PhotometricInterpretation"):
        read_frame(header_only)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file" * 10)
    with pytest.raises(ValueError, match=r"junk\.dcm: cannot read DICOM header"):
        count_frames(junk)

    with pytest.raises(FileNotFoundError, match=r"nope\.png: file not found"):
        read_frame(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match=r"nope\.dcm"):
        count_frames(tmp_path / "nope.dcm")


def test_frame_out_of_range_and_unsupported_photometric(tmp_path):
    clip = write_dicom(tmp_path / "clip.dcm", RNG.integers(0, 256, (2, 4, 5), dtype=np.uint8), "MONOCHROME2", 8)
    with pytest.raises(ValueError, match=r"clip\.dcm: frame index 2 out of range, the file holds 2"):
        read_frame(clip, frame=2)
    png = tmp_path / "a.png"
    Image.fromarray(RGB8).save(png)
    with pytest.raises(ValueError, match=r"a\.png: frame index 1 out of range"):
        LoadFramed()({"image": str(png), "frame": 1})
    hsv = write_dicom(tmp_path / "hsv.dcm", RGB8, "RGB", 8)
    ds = dcmread(hsv)
    ds.PhotometricInterpretation = "HSV"
    ds.save_as(hsv)
    with pytest.raises(ValueError, match=r"hsv\.dcm: unsupported photometric interpretation 'HSV'"):
        read_frame(hsv)
    palette = write_dicom(tmp_path / "pal.dcm", GREY8, "PALETTE COLOR", 8)  # no colour lookup table
    with pytest.raises(ValueError, match=r"pal\.dcm: PALETTE COLOR image has no .*Palette Color Lookup Table"):
        read_frame(palette)


def _image_and_label(tmp_path: Path, label: np.ndarray, name: str = "a") -> tuple[str, str]:
    image = tmp_path / f"{name}.png"
    Image.fromarray(np.zeros((*label.shape, 3), np.uint8)).save(image)
    label_path = tmp_path / f"{name}_label.png"
    Image.fromarray(label.astype(np.uint8)).save(label_path)
    return str(image), str(label_path)


def test_load_label_map_png_and_nifti(tmp_path):
    label = np.array([[0, 1, 2, 0], [0, 0, 1, 3], [0, 0, 0, 0]], np.uint8)
    image, png = _image_and_label(tmp_path, label)
    loader = Compose([LoadFramed(), LoadLabelMapd()])
    d = loader({"image": image, "label_map": png})
    assert d["label_map"].dtype == torch.int64 and tuple(d["label_map"].shape) == (1, 3, 4)
    np.testing.assert_array_equal(d["label_map"][0].numpy(), label)

    nifti = tmp_path / "a_label.nii.gz"
    nib.save(nib.Nifti1Image(label.astype(np.int16), np.eye(4)), nifti)
    np.testing.assert_array_equal(read_label_map(nifti), label)
    d = loader({"image": image, "label_map": str(nifti)})
    np.testing.assert_array_equal(d["label_map"][0].numpy(), label)

    assert "label_map" not in loader({"image": image})


def test_label_map_errors(tmp_path):
    image, _ = _image_and_label(tmp_path, np.zeros((3, 4), np.uint8))
    _, wrong = _image_and_label(tmp_path, np.zeros((4, 3), np.uint8), name="b")
    d = LoadFramed()({"image": image, "label_map": wrong})
    with pytest.raises(ValueError, match=r"b_label\.png.*size \(4, 3\).*a\.png.*size \(3, 4\)"):
        LoadLabelMapd()(d)
    rgb = tmp_path / "rgb_label.png"
    Image.fromarray(RGB8).save(rgb)
    with pytest.raises(ValueError, match=r"rgb_label\.png: label map must be single-channel"):
        read_label_map(rgb)
    floats = tmp_path / "f.nii"
    nib.save(nib.Nifti1Image(np.full((3, 4), 0.5, np.float32), np.eye(4)), floats)
    with pytest.raises(ValueError, match=r"f\.nii: label map holds non-integer values"):
        read_label_map(floats)
    with pytest.raises(ValueError, match="must be loaded"):
        LoadLabelMapd()({"image": image, "label_map": wrong})


@pytest.mark.parametrize(
    "lesion_labels, expected",
    [([1], [[0, 1, 0], [0, 1, 0]]), ([2], [[0, 0, 1], [0, 0, 0]]), ([1, 2], [[0, 1, 1], [0, 1, 0]])],
)
def test_label_map_to_mask_lesion_labels(lesion_labels, expected):
    label_map = torch.tensor([[[0, 1, 2], [3, 1, 0]]])
    others = [v for v in (1, 2, 3) if v not in lesion_labels]  # allowed, counted as background
    transform = LabelMapToMaskd(lesion_labels=lesion_labels, ignore_labels=others)
    d = transform({"image": torch.zeros(3, 2, 3), "label_map": label_map})
    assert "label_map" not in d and d["has_mask"] is True
    assert d["mask"].dtype == torch.float32
    np.testing.assert_array_equal(d["mask"][0].numpy(), expected)


def test_label_map_to_mask_absent_and_budgeted():
    transform = LabelMapToMaskd()
    d = transform({"image": torch.zeros(3, 2, 3)})
    assert d["has_mask"] is False and tuple(d["mask"].shape) == (1, 2, 3) and not d["mask"].any()
    d = transform({"image": torch.zeros(3, 2, 3), "label_map": torch.ones(1, 2, 3), "has_mask": False})
    assert d["has_mask"] is False and not d["mask"].any() and "label_map" not in d
    with pytest.raises(ValueError, match="lesion_labels must be a non-empty list of integers"):
        LabelMapToMaskd(lesion_labels=[])
    with pytest.raises(ValueError, match="does not match the image"):
        transform({"image": torch.zeros(3, 2, 3), "label_map": torch.ones(1, 3, 2)})


def test_batches_with_and_without_masks_collate(tmp_path):
    label = np.zeros((3, 4), np.uint8)
    label[1, 2] = 1
    image, label_path = _image_and_label(tmp_path, label)
    pipeline = Compose([LoadFramed(), LoadLabelMapd(), LabelMapToMaskd()])
    items = [pipeline({"image": image, "label_map": label_path, "label": 1}), pipeline({"image": image, "label": 0})]
    batch = next(iter(DataLoader(items, batch_size=2)))
    assert tuple(batch["mask"].shape) == (2, 1, 3, 4)
    assert batch["has_mask"].tolist() == [True, False]
    assert batch["mask"][0, 0, 1, 2] == 1 and batch["mask"].sum() == 1


def test_joint_augmentation_keeps_mask_aligned(tmp_path):
    pixels = np.zeros((6, 8, 3), np.uint8)
    label = np.zeros((6, 8), np.uint8)
    pixels[0:2, 5:8, 0] = 255  # red lesion in the top-right corner
    label[0:2, 5:8] = 1
    image = tmp_path / "img.png"
    Image.fromarray(pixels).save(image)
    label_path = tmp_path / "lab.png"
    Image.fromarray(label).save(label_path)
    pipeline = Compose(
        [
            LoadFramed(),
            LoadLabelMapd(),
            LabelMapToMaskd(),
            RandFlipd(keys=["image", "mask"], prob=0.5, spatial_axis=0),
            RandFlipd(keys=["image", "mask"], prob=0.5, spatial_axis=1),
            RandRotate90d(keys=["image", "mask"], prob=0.75, max_k=3),
        ]
    )
    pipeline.set_random_state(seed=3)
    layouts = set()
    for _ in range(12):
        d = pipeline({"image": str(image), "label_map": str(label_path)})
        lesion = torch.as_tensor(d["image"][0]) > 0.5
        assert torch.equal(lesion, torch.as_tensor(d["mask"][0]) > 0.5)
        assert int(lesion.sum()) == 6
        layouts.add(tuple(lesion.flatten().tolist()))
    assert len(layouts) > 2  # the augmentations really moved the lesion


def write_palette_dicom(path: Path, indices: np.ndarray, luts: np.ndarray, bits: int, first_mapped: int = 0) -> Path:
    """A PALETTE COLOR DICOM file: ``indices`` stored as pixels, ``luts`` (3, entries) as the R/G/B tables."""
    write_dicom(path, indices, "PALETTE COLOR", 8 * indices.itemsize)
    ds = dcmread(path)
    for colour, lut in zip(("Red", "Green", "Blue"), luts):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [len(lut), first_mapped, bits])
        ds[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype(f"<u{bits // 8}").tobytes())
    ds.save_as(path)
    return path


@pytest.mark.parametrize("bits", [8, 16])
def test_dicom_palette_colour_applies_the_lookup_table(tmp_path, bits):
    top = 2**bits - 1
    luts = np.stack([np.linspace(0, top, 256), np.linspace(top, 0, 256), np.full(256, top // 3)]).round()
    path = write_palette_dicom(tmp_path / f"pal{bits}.dcm", GREY8, luts, bits)
    expected = np.stack([luts[c][GREY8] for c in range(3)], axis=-1) / top
    out = read_frame(path)
    assert out.shape == (4, 5, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.max() <= 1.0 and out.min() >= 0.0


def test_dicom_palette_colour_multi_frame_and_first_mapped(tmp_path):
    clip = RNG.integers(0, 20, (2, 4, 5), dtype=np.uint8)
    luts = np.stack([np.arange(16) * 4000, np.arange(16) * 100, 65535 - np.arange(16) * 4000])
    path = write_palette_dicom(tmp_path / "clip.dcm", clip, luts, 16, first_mapped=2)
    # indices below the first mapped value take the first entry, above the table the last one
    lookup = np.clip(clip.astype(np.int64) - 2, 0, 15)
    expected = np.stack([luts[c][lookup] for c in range(3)], axis=-1) / 65535.0
    frames = list(iter_frames(path))
    assert len(frames) == 2
    for frame in range(2):
        np.testing.assert_allclose(read_frame(path, frame), expected[frame], atol=1e-6)
        np.testing.assert_allclose(frames[frame], expected[frame], atol=1e-6)


def _components(mask: np.ndarray) -> int:
    from skimage.measure import label

    return int(label(mask > 0, connectivity=2).max())


def test_resize_lesion_mask_keeps_tiny_lesions(tmp_path):
    mask = torch.zeros(1, 64, 64)
    mask[0, 10:12, 20:22] = 1  # a 2 x 2 lesion: 1/16 of one output pixel
    mask[0, 32:48, 0:16] = 1  # a large lesion: exactly 2 x 2 output pixels
    d = {"image": torch.zeros(3, 64, 64), "mask": mask, "has_mask": True, "label": 1, "image_path": "a.png"}
    nearest = Resized(keys=["mask"], spatial_size=(8, 8), mode="nearest")(dict(d))["mask"]
    assert _components(np.asarray(nearest[0])) == 1  # the problem: nearest-neighbour loses the small lesion
    out = ResizeLesionMaskd(keys=["mask"], spatial_size=(8, 8))(d)
    small = torch.zeros(8, 8)
    small[1, 2] = 1
    small[4:6, 0:2] = 1
    assert out["has_mask"] is True and out["mask"].dtype == torch.float32
    np.testing.assert_array_equal(np.asarray(out["mask"][0]), small.numpy())
    assert torch.equal(d["mask"], mask)  # the input is not modified


def test_resize_lesion_mask_every_component_survives_any_scale():
    rng = np.random.default_rng(0)
    for size, out_size in (((50, 50), (7, 7)), ((37, 61), (10, 13)), ((9, 11), (20, 30))):
        source = np.zeros((2, *size), np.float32)
        source[:, ::2, ::2] = rng.random((2, (size[0] + 1) // 2, (size[1] + 1) // 2)) < 0.05  # isolated specks
        out = ResizeLesionMaskd(keys="mask", spatial_size=out_size)({"mask": torch.from_numpy(source)})["mask"]
        assert tuple(out.shape) == (2, *out_size) and set(np.unique(out.numpy())) <= {0.0, 1.0}
        for channel in range(2):
            for r, c in zip(*np.nonzero(source[channel])):
                # output pixel whose area window holds the speck (integer window arithmetic)
                assert out[channel, r * out_size[0] // size[0], c * out_size[1] // size[1]] == 1
        dense = torch.zeros(1, *size)
        dense[0, : size[0] // 2] = 1  # the top rows: coverage >= 0.5 keeps about the same share of the output
        half = ResizeLesionMaskd(keys="mask", spatial_size=out_size)({"mask": dense})["mask"]
        assert abs(float(half.mean()) - (size[0] // 2) / size[0]) <= 1.0 / out_size[0]


def test_resize_lesion_mask_empty_positive_loses_has_mask(caplog):
    transform = ResizeLesionMaskd(keys=["mask"], spatial_size=(4, 4))
    empty = {"mask": torch.zeros(1, 16, 16), "has_mask": True, "label": 1, "image_path": "/data/ill_07.png"}
    with caplog.at_level("WARNING", logger="medgain.transforms.label_map"):
        out = transform(empty)
    assert out["has_mask"] is False
    assert "/data/ill_07.png" in caplog.text and "empty" in caplog.text
    caplog.clear()
    negative = transform({**empty, "label": 0})
    budgeted = transform({**empty, "has_mask": False})
    assert negative["has_mask"] is True and budgeted["has_mask"] is False and not caplog.text
    for bad in ((4, 0), (4, 4, 4), 2.5, True):
        with pytest.raises(ValueError, match="spatial_size must be one or two positive integers"):
            ResizeLesionMaskd(keys=["mask"], spatial_size=bad)
    assert ResizeLesionMaskd(keys=["mask"], spatial_size=6).spatial_size == (6, 6)
    with pytest.raises(ValueError, match=r"ill_07\.png: 'mask' must be a \(C, H, W\) mask"):
        transform({**empty, "mask": torch.zeros(16, 16)})


def test_resize_lesion_mask_in_the_loading_pipeline(tmp_path):
    label = np.zeros((40, 40), np.uint8)
    label[5, 7] = 1  # one-pixel lesion: 1/25 of an output pixel
    image, label_path = _image_and_label(tmp_path, label)
    empty_image, empty_label = _image_and_label(tmp_path, np.zeros((40, 40), np.uint8), name="b")
    pipeline = Compose(
        [
            LoadFramed(),
            LoadLabelMapd(),
            LabelMapToMaskd(),
            Resized(keys=["image"], spatial_size=(8, 8), mode="bilinear"),
            ResizeLesionMaskd(keys=["mask"], spatial_size=(8, 8)),
        ]
    )
    d = pipeline({"image": image, "label_map": label_path, "label": 1})
    assert d["has_mask"] is True and int(d["mask"].sum()) == 1 and d["mask"][0, 1, 1] == 1
    assert type(d["mask"]) is torch.Tensor and tuple(d["image"].shape) == (3, 8, 8)
    assert pipeline({"image": empty_image, "label_map": empty_label, "label": 1})["has_mask"] is False


def test_dicom_palette_colour_with_a_segmented_lookup_table(tmp_path):
    from pydicom.data import get_palette_files
    from pydicom.pixels import apply_color_lut

    spring = dcmread(get_palette_files("spring.dcm")[0])  # a DICOM well-known palette, stored segmented
    path = write_dicom(tmp_path / "seg.dcm", GREY8, "PALETTE COLOR", 8)
    ds = dcmread(path)
    for colour in ("Red", "Green", "Blue"):
        for name in (f"{colour}PaletteColorLookupTableDescriptor", f"Segmented{colour}PaletteColorLookupTableData"):
            ds[name] = spring[name]
    ds.save_as(path)
    np.testing.assert_allclose(read_frame(path), apply_color_lut(GREY8, spring) / 255.0, atol=1e-6)
