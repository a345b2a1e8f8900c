"""medgain.crop: attention map → square box on the full-resolution original → crop."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medgain.crop import BOX_COLUMNS, attention_box, crop_square, write_attention_crops


def _contains(box: tuple[int, int, int, int], inner: tuple[float, float, float, float]) -> bool:
    y0, x0, y1, x1 = box
    return y0 <= inner[0] and x0 <= inner[1] and y1 >= inner[2] and x1 >= inner[3]


@pytest.mark.parametrize("full_size", [(600, 900), (900, 600), (512, 512)])
def test_known_peak_box_contains_the_lesion_bbox(full_size: tuple[int, int]) -> None:
    h, w = full_size
    amap = np.zeros((28, 28))
    amap[5:10, 10:15] = 1.0  # the lesion's cells on the network grid
    box = attention_box(amap, full_size, threshold=0.5, margin=0.1, min_size=0)
    lesion = (5 * h / 28, 10 * w / 28, 10 * h / 28, 15 * w / 28)  # its full-resolution bbox
    y0, x0, y1, x1 = box
    assert _contains(box, lesion)
    assert y1 - y0 == x1 - x0  # square where it fits
    assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
    side = max(lesion[2] - lesion[0], lesion[3] - lesion[1])
    assert y1 - y0 <= np.ceil(side * 1.2) + 1  # the margin, not the whole image


def test_smooth_peak_with_background_and_tensor_input() -> None:
    yy, xx = np.mgrid[0:32, 0:32]
    amap = np.exp(-((yy - 20) ** 2 + (xx - 8) ** 2) / (2 * 2.0**2)) + 0.05
    box = attention_box(torch.as_tensor(amap)[None, None], (1000, 1500), threshold=0.5, margin=0.0, min_size=0)
    y0, x0, y1, x1 = box
    assert y0 <= 20 / 32 * 1000 <= y1 and x0 <= 8 / 32 * 1500 <= x1  # the peak is inside
    assert (y1 - y0) * (x1 - x0) < 0.1 * 1000 * 1500


@pytest.mark.parametrize(
    "amap",
    [np.zeros((7, 7)), np.ones((7, 7)), np.full((7, 7), 0.5) + 1e-9 * np.arange(49).reshape(7, 7), np.zeros((0, 0))],
    ids=["zero", "flat", "near-uniform", "empty"],
)
@pytest.mark.parametrize("full_size", [(300, 500), (500, 300)])
def test_flat_zero_uniform_or_empty_map_gives_the_whole_image(amap: np.ndarray, full_size: tuple[int, int]) -> None:
    assert attention_box(amap, full_size, threshold=0.5, margin=0.1, min_size=0) == (0, 0, *full_size)


def test_softmax_grid_of_equal_chips_gives_the_whole_image() -> None:
    grid = torch.softmax(torch.zeros(1, 1, 4, 6).flatten(1), 1).reshape(1, 1, 4, 6)
    assert attention_box(grid, (400, 600), threshold=0.5, margin=0.1, min_size=0) == (0, 0, 400, 600)


def test_non_square_original_box_is_shifted_inside_and_spans_a_short_side() -> None:
    amap = np.zeros((10, 10))
    amap[0, 9] = 1.0  # top-right corner: 20 x 80 pixels of the original
    y0, x0, y1, x1 = attention_box(amap, (200, 800), threshold=0.5, margin=0.2, min_size=0)
    assert (y0, x1) == (0, 800) and y1 - y0 == x1 - x0 == 112  # shifted inside, still square
    amap = np.zeros((10, 10))
    amap[2:8, 1:9] = 1.0  # wider than the short side allows once squared
    assert attention_box(amap, (200, 800), threshold=0.5, margin=0.5, min_size=0)[0::2] == (0, 200)


def test_largest_component_wins_and_min_size_and_margin() -> None:
    amap = np.zeros((20, 20))
    amap[1:3, 1:3] = 1.0  # small, same peak
    amap[10:16, 10:16] = 1.0  # large
    box = attention_box(amap, (200, 200), threshold=0.5, margin=0.0, min_size=0)
    assert box == (100, 100, 160, 160)
    big = attention_box(amap, (200, 200), threshold=0.5, margin=0.0, min_size=100)
    assert big[2] - big[0] == 100 and _contains(big, (100, 100, 160, 160))
    wide = attention_box(amap, (200, 200), threshold=0.5, margin=0.25, min_size=0)
    assert wide[2] - wide[0] == 90


def test_invalid_inputs_raise_clear_errors() -> None:
    nan_map = np.zeros((4, 4))
    nan_map[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        attention_box(nan_map, (10, 10), threshold=0.5, margin=0.1, min_size=0)
    with pytest.raises(ValueError, match="full_size"):
        attention_box(np.eye(4), (0, 10), threshold=0.5, margin=0.1, min_size=0)
    with pytest.raises(ValueError, match="threshold"):
        attention_box(np.eye(4), (10, 10), threshold=0.0, margin=0.1, min_size=0)
    with pytest.raises(ValueError, match="2-D|\\(h, w\\)"):
        attention_box(np.zeros((2, 3, 4)), (10, 10), threshold=0.5, margin=0.1, min_size=0)


def test_crop_square_numpy_channels_last_keeps_content_and_dtype() -> None:
    image = np.zeros((300, 500, 3), np.uint8)
    image[100:200, 250:350] = 255
    crop = crop_square(image, (100, 250, 200, 350), 32)
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    assert crop.min() == 255
    # a box spanning the whole (non-square) image is padded to a square, keeping the aspect ratio
    whole = crop_square(image, (0, 0, 300, 500), 50)
    assert whole.shape == (50, 50, 3)
    assert whole[:3].max() == 0 and whole[-3:].max() == 0  # padding rows above / below
    assert whole[25, 25].min() > 200  # the white square is at the centre


def test_crop_square_tensor_channels_first_and_grey() -> None:
    image = torch.rand(3, 64, 48)
    crop = crop_square(image, (8, 8, 40, 40), 16)
    assert isinstance(crop, torch.Tensor) and crop.shape == (3, 16, 16) and crop.dtype == torch.float32
    assert torch.allclose(crop.mean(), image[:, 8:40, 8:40].mean(), atol=1e-3)
    grey = crop_square(np.arange(100, dtype=np.float64).reshape(10, 10), (0, 0, 10, 10), 10)
    assert grey.shape == (10, 10) and np.allclose(grey, np.arange(100).reshape(10, 10))
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    small = crop_square(mask, (0, 0, 40, 40), 8)
    assert small.dtype == bool and small[2:6, 2:6].all() and small.sum() == 16


def test_crop_square_rejects_boxes_outside_the_image() -> None:
    image = np.zeros((20, 30, 3), np.uint8)
    for box in [(0, 0, 21, 10), (5, 5, 5, 10), (-1, 0, 5, 5)]:
        with pytest.raises(ValueError, match="outside"):
            crop_square(image, box, 8)


def test_box_then_crop_end_to_end_on_a_large_original() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 50, (1200, 1800, 3), dtype=np.uint8)
    image[300:500, 1000:1300] = 250  # the lesion
    amap = np.zeros((28, 28))
    amap[7:12, 15:22] = 1.0  # roughly where a 224-px network looked
    box = attention_box(amap, image.shape[:2], threshold=0.5, margin=0.1, min_size=64)
    assert _contains(box, (300, 1000, 500, 1300))
    crop = crop_square(image, box, 64)
    assert crop.shape == (64, 64, 3)
    assert (crop > 200).mean() > 5 * (image > 200).mean()  # the lesion fills far more of the crop


def test_write_attention_crops_writes_crops_masks_and_the_box_table(tmp_path: Path) -> None:
    items, maps = [], []
    for i, (h, w) in enumerate([(120, 200), (200, 120)]):
        image = np.full((h, w, 3), 30, np.uint8)
        image[40:80, 60:100] = 240  # the lesion
        mask = np.zeros((h, w), np.uint8)
        mask[40:80, 60:100] = 255
        Image.fromarray(image).save(tmp_path / f"img{i}.jpg", quality=95)
        Image.fromarray(mask).save(tmp_path / f"img{i}_segmentation.png")
        amap = np.zeros((10, 10))
        amap[int(40 / h * 10) : int(np.ceil(80 / h * 10)), int(60 / w * 10) : int(np.ceil(100 / w * 10))] = 1.0
        items.append(
            {
                "image": str(tmp_path / f"img{i}.jpg"),
                "label": i,
                "patient": f"P{i}",
                "label_map": str(tmp_path / f"img{i}_segmentation.png"),
            }
        )
        maps.append(amap)
    maps[1] = np.zeros((10, 10))  # a flat map: the whole image
    crops, table = write_attention_crops(items, maps, tmp_path / "out", 32, threshold=0.5, margin=0.1)
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == BOX_COLUMNS and [r["patient"] for r in rows] == ["P0", "P1"]
    assert [int(rows[1][k]) for k in ("y0", "x0", "y1", "x1")] == [0, 0, 200, 120]
    first = np.asarray(Image.open(crops[0]["image"]))
    assert first.shape == (32, 32, 3) and (first > 200).mean() > 0.4  # zoomed onto the lesion
    assert crops[0]["source_image"] == items[0]["image"]
    assert crops[0]["box"] == [int(rows[0][k]) for k in ("y0", "x0", "y1", "x1")]
    crop_mask = np.asarray(Image.open(crops[0]["label_map"]))
    assert set(np.unique(crop_mask)) == {0, 255} and ((crop_mask > 0) == (first[..., 0] > 135)).mean() > 0.9
    with pytest.raises(ValueError, match="1 attention maps for 2 items"):
        write_attention_crops(items, maps[:1], tmp_path / "out", 32)
    Image.new("L", (5, 5)).save(tmp_path / "img0_segmentation.png")
    with pytest.raises(ValueError, match="img0_segmentation.png: label map is 5x5"):
        write_attention_crops(items, maps, tmp_path / "out", 32)
