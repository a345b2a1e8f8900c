"""Synthetic pattern images with known tumour masks, for models that must find a small region in a large image.

Three kinds (``PATTERN_KINDS``):

- ``ellipses``: noise; a tumour image holds one black ellipse of random size, position and orientation; a normal
  image holds nothing or a look-alike (a mid-grey ellipse, not tumour).
- ``pattern1``: noise with one patch; stripes in a normal image, a checkerboard in a tumour image.
- ``pattern2``: a ``field_size`` × ``field_size`` grid of patches, each of stripes with its own orientation,
  period and colours; a tumour image turns one or two of them into checkerboards of the same period range, so
  every crop holds some pattern and only the checkerboard tells the classes apart.

Each image comes with a tumour mask (the ellipse or checkerboard pixels), written as a 0/1 label map.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from medgain.synth.progress import ProgressCallback

__all__ = ["PATTERN_KINDS", "make_pattern_dataset", "make_pattern_image"]

PATTERN_KINDS = ("ellipses", "pattern1", "pattern2")
_SPLITS = ("training", "validation", "test")
_STREAM_PLAN, _STREAM_IMAGE = 1, 2
_MAX_CHECKERBOARDS = 2


def _colours(rng: np.random.Generator, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Two colours differing by at least 0.35 in mean intensity."""
    dark = rng.uniform(0.0, 0.35, channels) + rng.uniform(0.0, 0.15)
    light = dark + rng.uniform(0.35, 0.6) + rng.uniform(-0.1, 0.1, channels)
    pair = [np.clip(dark, 0.0, 1.0), np.clip(light, 0.0, 1.0)]
    if rng.random() < 0.5:
        pair.reverse()
    return pair[0], pair[1]


def _noise(rng: np.random.Generator, size: int, channels: int) -> np.ndarray:
    base = rng.uniform(0.35, 0.65, channels)
    return np.clip(base + rng.normal(0.0, 0.08, (size, size, channels)), 0.0, 1.0)


def _texture(
    rng: np.random.Generator, shape: tuple[int, int], checker: bool, period: float, channels: int
) -> np.ndarray:
    """A (h, w, channels) patch of stripes or a checkerboard with random orientation, phase and colours."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    theta = rng.uniform(0.0, math.pi)
    u = x * math.cos(theta) + y * math.sin(theta)
    v = -x * math.sin(theta) + y * math.cos(theta)
    wave_u = np.sin(2.0 * math.pi * u / period + rng.uniform(0.0, 2.0 * math.pi)) >= 0
    if checker:
        wave_v = np.sin(2.0 * math.pi * v / period + rng.uniform(0.0, 2.0 * math.pi)) >= 0
        on = wave_u == wave_v
    else:
        on = wave_u
    first, second = _colours(rng, channels)
    return np.where(on[..., None], first, second)


def _ellipse_mask(size: int, cx: float, cy: float, a: float, b: float, angle: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = x - cx, y - cy
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _ellipses(rng: np.random.Generator, size: int, channels: int, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    image = _noise(rng, size, channels)
    mask = np.zeros((size, size), bool)
    if positive or rng.random() < 0.5:
        a, b = rng.uniform(0.04, 0.2, 2) * size
        margin = max(a, b)
        cx, cy = rng.uniform(margin, size - 1 - margin, 2)
        region = _ellipse_mask(size, cx, cy, max(a, 1.5), max(b, 1.5), rng.uniform(0.0, math.pi))
        colour = rng.uniform(0.0, 0.08, channels) if positive else rng.uniform(0.3, 0.45, channels)
        image[region] = colour
        if positive:
            mask = region
    return image, mask


def _pattern1(rng: np.random.Generator, size: int, channels: int, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    image = _noise(rng, size, channels)
    side = int(rng.uniform(0.2, 0.4) * size)
    top, left = rng.integers(0, size - side + 1, 2)
    period = rng.uniform(side / 6.0, side / 3.0)
    image[top : top + side, left : left + side] = _texture(rng, (side, side), positive, period, channels)
    mask = np.zeros((size, size), bool)
    if positive:
        mask[top : top + side, left : left + side] = True
    return image, mask


def _pattern2(
    rng: np.random.Generator, size: int, channels: int, positive: bool, field_size: int
) -> tuple[np.ndarray, np.ndarray]:
    image = _noise(rng, size, channels)
    mask = np.zeros((size, size), bool)
    cells = field_size * field_size
    checkers = set()
    if positive:
        count = int(rng.integers(1, min(_MAX_CHECKERBOARDS, cells) + 1))
        checkers = {int(c) for c in rng.choice(cells, size=count, replace=False)}
    edges = np.linspace(0, size, field_size + 1).round().astype(int)
    for cell in range(cells):
        row, col = divmod(cell, field_size)
        y0, y1, x0, x1 = edges[row], edges[row + 1], edges[col], edges[col + 1]
        side = max(2, int(min(y1 - y0, x1 - x0) * rng.uniform(0.7, 0.9)))
        top = y0 + int(rng.integers(0, y1 - y0 - side + 1))
        left = x0 + int(rng.integers(0, x1 - x0 - side + 1))
        period = rng.uniform(side / 5.0, side / 2.5)
        checker = cell in checkers
        image[top : top + side, left : left + side] = _texture(rng, (side, side), checker, period, channels)
        if checker:
            mask[top : top + side, left : left + side] = True
    return image, mask


def make_pattern_image(
    kind: str, seed: int, index: int, positive: bool, size: int = 1024, rgb: bool = False, field_size: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image; the same arguments always give the same image.

    Args:
        kind: one of ``PATTERN_KINDS``.
        seed: data-set seed.
        index: image index within the data set.
        positive: tumour image (True) or normal image.
        size: image height and width in pixels (at least 32).
        rgb: 3-channel colours instead of grey.
        field_size: ``pattern2`` grid side (patches per row and column).

    Returns:
        ``(image, mask)``: (size, size) or (size, size, 3) uint8 image and (size, size) uint8 mask (1 = tumour).

    Raises:
        ValueError: for an unknown kind or invalid sizes.
    """
    if kind not in PATTERN_KINDS:
        raise ValueError(f"unknown pattern kind {kind!r}; choose one of {list(PATTERN_KINDS)}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if field_size < 1 or size // field_size < 8:
        raise ValueError(f"field_size must be >= 1 with fields of at least 8 pixels, got {field_size} for size {size}")
    rng = np.random.default_rng([seed, _STREAM_IMAGE, index])
    channels = 3 if rgb else 1
    if kind == "ellipses":
        image, mask = _ellipses(rng, size, channels, positive)
    elif kind == "pattern1":
        image, mask = _pattern1(rng, size, channels, positive)
    else:
        image, mask = _pattern2(rng, size, channels, positive, field_size)
    pixels = np.round(image * 255.0).astype(np.uint8)
    return (pixels if rgb else pixels[..., 0]), mask.astype(np.uint8)


def make_pattern_dataset(
    out_dir: str | Path,
    kind: str,
    n_images: int,
    seed: int,
    size: int = 1024,
    rgb: bool = False,
    field_size: int = 4,
    prevalence: float = 0.5,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    progress: ProgressCallback | None = None,
) -> Path:
    """Write ``n_images`` pattern images, their masks and a MONAI datalist into ``out_dir``.

    Layout: ``images/NNNNNN.png``, ``masks/NNNNNN.png`` (0/1 label maps, for every image), ``datalist.json``
    with ``training`` / ``validation`` / ``test`` lists of ``{"image", "label", "label_map"}`` (paths relative to
    ``out_dir``; label 1 = tumour) and ``dataset.json`` describing the set.

    Args:
        out_dir: output folder (created).
        kind: one of ``PATTERN_KINDS``.
        n_images: number of images (at least 3, so that every split with a non-zero fraction gets one).
        seed: random seed.
        size: image side in pixels.
        rgb: 3-channel images instead of grey.
        field_size: ``pattern2`` grid side.
        prevalence: fraction of tumour images (rounded, in every split alike).
        split_fractions: fractions of the images in the three splits (sum 1).
        progress: called as ``progress(done, n_images)`` after each image (e.g.
            :func:`medgain.synth.progress.print_progress`).

    Returns:
        The path of ``datalist.json``.

    Raises:
        ValueError: for invalid arguments or when ``out_dir`` is a file.
    """
    if n_images < 3:
        raise ValueError(f"n_images must be >= 3 (one per split), got {n_images}")
    if not 0.0 <= prevalence <= 1.0:
        raise ValueError(f"prevalence must be in [0, 1], got {prevalence}")
    fractions = np.asarray(split_fractions, dtype=np.float64)
    if fractions.shape != (3,) or (fractions < 0).any() or not math.isclose(fractions.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"split_fractions must be three non-negative numbers summing to 1, got {split_fractions}")
    make_pattern_image(kind, seed, 0, False, size, rgb, field_size)  # validates kind and sizes before writing
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, _STREAM_PLAN])
    counts = np.floor(fractions * n_images).astype(int)
    counts[0] += n_images - counts.sum()
    for split in (1, 2):  # every split with a non-zero fraction gets at least one image
        if fractions[split] > 0 and counts[split] == 0:
            counts[split], counts[int(np.argmax(counts))] = 1, counts.max() - 1
    split_of = np.repeat(np.arange(3), counts)
    positive = np.zeros(n_images, bool)
    for split in range(3):
        members = np.flatnonzero(split_of == split)
        chosen = rng.permutation(members)[: int(round(prevalence * len(members)))]
        positive[chosen] = True
    datalist: dict[str, list[dict]] = {name: [] for name in _SPLITS}
    for index in range(n_images):
        image, mask = make_pattern_image(kind, seed, index, bool(positive[index]), size, rgb, field_size)
        name = f"{index:06d}.png"
        Image.fromarray(image).save(out / "images" / name, compress_level=1)
        Image.fromarray(mask).save(out / "masks" / name)
        datalist[_SPLITS[split_of[index]]].append(
            {"image": f"images/{name}", "label": int(positive[index]), "label_map": f"masks/{name}"}
        )
        if progress is not None:
            progress(index + 1, n_images)
    summary = {
        "generator": "medgain.synth.patterns.make_pattern_dataset",
        "kind": kind,
        "seed": int(seed),
        "n_images": int(n_images),
        "size": int(size),
        "rgb": bool(rgb),
        "field_size": int(field_size),
        "prevalence": float(prevalence),
        "splits": {
            name: {"images": len(items), "tumour": sum(item["label"] for item in items)}
            for name, items in datalist.items()
        },
    }
    (out / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist, indent=2) + "\n")
    return path
