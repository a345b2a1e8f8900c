"""Attention-guided cropping: an attention map → a square box on the full-resolution original → a crop, and the
crops of a whole data set with their box table.

The attention map (Grad-CAM of a classifier or ChipNet's softmax grid) lives on the network's input grid, which
is the original image resized (possibly stretched) to a square; its rows and columns scale separately to the
original's height and width.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.measure import label as connected_components

from medgain.transforms.io import read_frame, read_label_map

__all__ = ["BOX_COLUMNS", "attention_box", "box_overlay", "crop_square", "write_attention_crops"]

#: columns of the box table written by :func:`write_attention_crops`.
BOX_COLUMNS = ("image", "crop", "patient", "label", "y0", "x0", "y1", "x1", "height", "width")


def _as_map(attention: np.ndarray | torch.Tensor) -> np.ndarray:
    """A (h, w) float64 map from (h, w), (1, h, w) or (1, 1, h, w) input."""
    if isinstance(attention, torch.Tensor):
        attention = attention.detach().cpu().numpy()
    amap = np.asarray(attention, dtype=np.float64)
    while amap.ndim > 2 and amap.shape[0] == 1:
        amap = amap[0]
    if amap.ndim != 2:
        raise ValueError(f"attention_box: expected a (h, w) attention map, got shape {tuple(np.shape(attention))}")
    return amap


def _square_span(centre: float, side: int, limit: int) -> tuple[int, int]:
    """``[start, start + side)`` centred on ``centre`` and shifted inside ``[0, limit)``; ``[0, limit)`` when the
    side does not fit."""
    if side >= limit:
        return 0, limit
    start = min(max(int(round(centre - side / 2.0)), 0), limit - side)
    return start, start + side


def attention_box(
    attention: np.ndarray | torch.Tensor,
    full_size: Sequence[int],
    *,
    threshold: float = 0.5,
    margin: float = 0.1,
    min_size: int = 0,
    min_contrast: float = 0.01,
) -> tuple[int, int, int, int]:
    """Square box, in full-resolution pixels, around the largest attended region of an attention map.

    The map is min-max normalised; pixels at or above ``threshold`` form the foreground, whose largest
    8-connected component (ties: the larger attention mass) is mapped to the original's pixel grid (rows scale by
    ``H / h``, columns by ``W / w``). The box is a square of side ``max(height, width) * (1 + 2 * margin)``, at
    least ``min_size``, centred on the component and shifted inside the image; along a side of the image that is
    shorter than the square the box spans that whole side (so it is not square there). An empty map or a
    near-uniform one (``max - min <= min_contrast * max(|max|, |min|)``, all zeros included) gives the whole
    image.

    Args:
        attention: (h, w) map, or (1, h, w) / (1, 1, h, w); any real values (e.g. raw Grad-CAM, softmax grid).
        full_size: (H, W) of the full-resolution original.
        threshold: foreground level on the normalised map, in (0, 1].
        margin: context added on each side, as a fraction of the component's larger side (>= 0).
        min_size: smallest side of the box in full-resolution pixels (>= 0).
        min_contrast: relative range below which the map counts as uniform (>= 0).

    Returns:
        ``(y0, x0, y1, x1)``, integers with ``0 <= y0 < y1 <= H`` and ``0 <= x0 < x1 <= W`` (end exclusive).

    Raises:
        ValueError: for a map that is not 2-D or holds NaN / infinite values, an invalid ``full_size`` or an
            out-of-range parameter.
    """
    amap = _as_map(attention)
    if len(full_size) != 2 or any(int(s) != s or s < 1 for s in full_size):
        raise ValueError(f"attention_box: full_size must be (H, W) positive integers, got {tuple(full_size)}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"attention_box: threshold must be in (0, 1], got {threshold}")
    if margin < 0 or min_size < 0 or min_contrast < 0:
        raise ValueError(
            f"attention_box: margin, min_size and min_contrast must be >= 0, got {margin}, {min_size}, {min_contrast}"
        )
    height, width = int(full_size[0]), int(full_size[1])
    whole = (0, 0, height, width)
    if amap.size == 0:
        return whole
    if not np.isfinite(amap).all():
        raise ValueError(f"attention_box: the attention map holds {int((~np.isfinite(amap)).sum())} NaN/inf values")
    lo, hi = float(amap.min()), float(amap.max())
    if hi - lo <= min_contrast * max(abs(hi), abs(lo)):
        return whole
    norm = (amap - lo) / (hi - lo)
    components = connected_components(norm >= threshold, connectivity=2)
    index = np.arange(1, int(components.max()) + 1)
    areas = np.bincount(components.ravel(), minlength=index.size + 1)[1:]
    masses = np.bincount(components.ravel(), weights=norm.ravel(), minlength=index.size + 1)[1:]
    best = int(index[np.lexsort((-masses, -areas))[0]])
    rows, cols = np.nonzero(components == best)
    scale_y, scale_x = height / amap.shape[0], width / amap.shape[1]
    top, bottom = rows.min() * scale_y, (rows.max() + 1) * scale_y
    left, right = cols.min() * scale_x, (cols.max() + 1) * scale_x
    side = max(bottom - top, right - left) * (1.0 + 2.0 * margin)
    side = max(int(math.ceil(side - 1e-9)), int(min_size), 1)
    y0, y1 = _square_span((top + bottom) / 2.0, side, height)
    x0, x1 = _square_span((left + right) / 2.0, side, width)
    return y0, x0, y1, x1


def crop_square(
    image: np.ndarray | torch.Tensor,
    box: Sequence[int],
    out_size: int,
    *,
    channels_last: bool | None = None,
    pad_value: float = 0.0,
) -> np.ndarray | torch.Tensor:
    """Cut ``box`` out of a full-resolution image and resize it to ``out_size`` × ``out_size``.

    A box that is not square (it spans a whole side of the image that is shorter than the square, see
    :func:`attention_box`) is padded symmetrically with ``pad_value`` to a square first, so the aspect ratio is
    kept. Downscaling is anti-aliased (bilinear); integer images are rounded and clipped back to their dtype, boolean
    masks thresholded at 0.5.

    Args:
        image: (H, W), (H, W, C) numpy (channels last, as decoded by PIL) or (C, H, W) array / tensor.
        box: ``(y0, x0, y1, x1)`` in pixels, end exclusive, inside the image.
        out_size: side of the output.
        channels_last: layout of a 3-D image; None means channels last for numpy arrays, first for tensors.
        pad_value: fill of the padding.

    Returns:
        the crop, with the input's type, dtype and layout.

    Raises:
        ValueError: for a box outside the image or empty, ``out_size < 1`` or an image that is not 2-D / 3-D.
    """
    is_tensor = isinstance(image, torch.Tensor)
    if image.ndim not in (2, 3):
        raise ValueError(f"crop_square: expected a (H, W), (H, W, C) or (C, H, W) image, got {tuple(image.shape)}")
    if out_size < 1:
        raise ValueError(f"crop_square: out_size must be >= 1, got {out_size}")
    if channels_last is None:
        channels_last = not is_tensor
    height, width = (image.shape[:2] if channels_last else image.shape[-2:]) if image.ndim == 3 else image.shape
    y0, x0, y1, x1 = (int(v) for v in box)
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise ValueError(f"crop_square: box {(y0, x0, y1, x1)} is empty or outside the {height}x{width} image")
    # cut first, so that only the box is copied (decoded images may be read-only and large)
    region = image[y0:y1, x0:x1] if image.ndim == 2 or channels_last else image[:, y0:y1, x0:x1]
    data = torch.as_tensor(region) if is_tensor else torch.from_numpy(np.array(region))
    if data.ndim == 2:
        chw = data[None]
    else:
        chw = data.permute(2, 0, 1) if channels_last else data
    dtype = chw.dtype
    patch = chw.float()
    h, w = y1 - y0, x1 - x0
    if h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        patch = F.pad(patch, (left, side - w - left, top, side - h - top), value=float(pad_value))
    resized = F.interpolate(
        patch[None], size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=True
    )[0]
    if dtype.is_floating_point:
        resized = resized.to(dtype)
    elif dtype == torch.bool:  # a mask: nearest to the 0.5 level
        resized = resized >= 0.5
    else:
        info = torch.iinfo(dtype)
        resized = resized.round().clamp(info.min, info.max).to(dtype)
    if data.ndim == 2:
        out = resized[0]
    else:
        out = resized.permute(1, 2, 0) if channels_last else resized
    return out if is_tensor else out.contiguous().numpy()


def write_attention_crops(
    items: Sequence[Mapping[str, Any]],
    attention_maps: Sequence[np.ndarray | torch.Tensor],
    output_dir: str | os.PathLike,
    out_size: int,
    *,
    threshold: float = 0.5,
    margin: float = 0.1,
    min_size: int = 0,
    image_key: str = "image",
    label_map_key: str = "label_map",
    filename: str = "boxes.csv",
) -> tuple[list[dict], Path]:
    """Crop every full-resolution original where its attention map points, and record the boxes.

    For item ``i`` the box is ``attention_box(attention_maps[i], (H, W), ...)`` on the original (read with
    ``medgain.transforms.read_frame``); the crop is written at ``out_size`` to ``crops/<name>.png`` and, when the
    item has a lesion label map, the same box of its lesion mask (non-zero labels, 0 / 255) to
    ``crop_masks/<name>_segmentation.png`` (the ISIC naming, so that the two folders read as a data set with
    :func:`medgain.data.read_dermoscopy_csv`). The table ``filename`` lists :data:`BOX_COLUMNS` per item.

    Args:
        items: datalist items with an image path (and optionally ``patient``, ``label``, a label map).
        attention_maps: one map per item, on any grid (see :func:`attention_box`).
        output_dir: folder of the crops and the table.
        out_size: side of the crops (the network's input size).
        threshold: see :func:`attention_box`.
        margin: see :func:`attention_box`.
        min_size: see :func:`attention_box`.
        image_key: item key of the original image.
        label_map_key: item key of the lesion label map.
        filename: name of the box table.

    Returns:
        new items for training on the crops (``image`` and ``label_map`` point to the crops; ``source_image`` and
        ``box`` keep the original and the box), and the table's path.

    Raises:
        ValueError: for a different number of maps and items, two items with the same file name, an unreadable
            image or a label map whose size differs from its image (naming the file).
    """
    if len(attention_maps) != len(items):
        raise ValueError(f"write_attention_crops: {len(attention_maps)} attention maps for {len(items)} items")
    out = Path(output_dir)
    names: dict[str, str] = {}
    for item in items:
        image = str(item[image_key])
        name = Path(image).stem
        if names.setdefault(name, image) != image:
            raise ValueError(f"write_attention_crops: {image} and {names[name]} would both be cropped to {name}.png")
    (out / "crops").mkdir(parents=True, exist_ok=True)
    crop_items: list[dict] = []
    rows = []
    for item, attention in zip(items, attention_maps):
        source = str(item[image_key])
        name = Path(source).stem
        image = read_frame(source)
        box = attention_box(attention, image.shape[:2], threshold=threshold, margin=margin, min_size=min_size)
        crop = crop_square(image, box, out_size)
        crop_path = out / "crops" / f"{name}.png"
        Image.fromarray(np.clip(np.rint(crop * 255.0), 0, 255).astype(np.uint8)).save(crop_path)
        new = {**item, "image": str(crop_path), "source_image": source, "box": list(box)}
        if item.get(label_map_key) is not None:
            lesion = read_label_map(item[label_map_key]) != 0
            if lesion.shape != image.shape[:2]:
                raise ValueError(
                    f"{item[label_map_key]}: label map is {lesion.shape[0]}x{lesion.shape[1]} but its image "
                    f"{source} is {image.shape[0]}x{image.shape[1]}"
                )
            mask_path = out / "crop_masks" / f"{name}_segmentation.png"
            mask_path.parent.mkdir(exist_ok=True)
            Image.fromarray(crop_square(lesion, box, out_size).astype(np.uint8) * 255).save(mask_path)
            new[label_map_key] = str(mask_path)
        crop_items.append(new)
        rows.append([source, str(crop_path), item.get("patient", ""), item.get("label", ""), *box, *image.shape[:2]])
    path = out / filename
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(BOX_COLUMNS)
        writer.writerows(rows)
    return crop_items, path


def box_overlay(image: np.ndarray, box: Sequence[int], max_side: int = 512, width: int = 3) -> Image.Image:
    """The full-resolution image (H, W, 3) in [0, 1] or uint8, downscaled so that its longer side is at most
    ``max_side``, with ``box`` (``(y0, x0, y1, x1)`` in full-resolution pixels) drawn as a yellow rectangle."""
    from PIL import ImageDraw

    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"box_overlay: expected an (H, W, 3) image, got {tuple(array.shape)}")
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    height, width_px = array.shape[:2]
    scale = min(1.0, max_side / max(height, width_px))
    picture = Image.fromarray(array)
    if scale < 1.0:
        picture = picture.resize((max(1, round(width_px * scale)), max(1, round(height * scale))), Image.BILINEAR)
    y0, x0, y1, x1 = (float(v) * scale for v in box)
    ImageDraw.Draw(picture).rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(255, 220, 0), width=width)
    return picture
