"""Synthetic dermoscopy images with known lesion masks, written in the layout of the ISIC 2020 challenge.

Real dermoscopy collections cannot be redistributed, so this module renders skin-toned JPEGs of varying size and
aspect with one pigmented lesion each. Coarse cues (asymmetry, dark blotches, a blue-grey veil) grow with a grade
that overlaps widely between benign lesions and melanomas, as atypical nevi look like melanomas; fine cues (a
rippled border, a warped pigment network of uneven thickness, clustered dots) separate them but are a few
hundredths of the lesion wide, so at a small input size the whole image leaves them a pixel or less and a crop
around the lesion keeps them. Hair, ruler marks, gel bubbles and the dark circular field or vignette of the
dermatoscope are drawn independently of the label; an optional shortcut confounder puts ink markings beside the
lesion on a chosen fraction of the melanomas only. Patients have several images, and their age, sex and the lesion site are correlated with the label as in
real data (older, male, torso and head/neck lesions are more often malignant), with a few missing values.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medgain.data.dermoscopy_splits import TEST_FOLD, draw_patient_folds, write_fold_table
from medgain.synth.progress import ProgressCallback
from medgain.transforms.hair import hair_alpha

__all__ = ["DERMOSCOPY_CSV_COLUMNS", "SITES", "make_dermoscopy_dataset", "make_dermoscopy_image"]

DERMOSCOPY_CSV_COLUMNS = (
    "image_name",
    "patient_id",
    "sex",
    "age_approx",
    "anatom_site_general_challenge",
    "diagnosis",
    "benign_malignant",
    "target",
)
SITES = ("torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", "oral/genital")
_SITE_PROB = np.array([0.5, 0.25, 0.15, 0.06, 0.03, 0.01])
_SITE_LOGODDS = np.array([0.3, 0.0, 0.1, 0.6, -0.6, -0.6])
_BENIGN_DIAGNOSES = ("nevus", "unknown", "seborrheic keratosis", "lentigo NOS")
_BENIGN_DIAGNOSIS_PROB = np.array([0.55, 0.35, 0.05, 0.05])

# independent random streams: numpy.random.default_rng([seed, stream, ...])
_STREAM_PATIENTS, _STREAM_IMAGES, _STREAM_RENDER, _STREAM_SHORTCUT, _STREAM_INK = 11, 12, 13, 14, 15


@dataclass(frozen=True)
class _Patient:
    sex: str
    age: float
    tone: float  # 0 light … 1 dark skin
    hairiness: float  # expected number of hair strands
    risk: float  # log-odds offset of malignancy


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: float) -> np.ndarray:
    """Zero-mean, unit-std smooth field of ``shape`` with features about ``min(shape) / cells`` pixels wide."""
    h, w = shape
    scale = max(min(h, w) / cells, 1.0)
    small = rng.standard_normal((max(2, round(h / scale) + 2), max(2, round(w / scale) + 2))).astype(np.float32)
    field = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


def _blend(region: np.ndarray, colour: np.ndarray | list[float], alpha: np.ndarray) -> None:
    """In place: ``region = region * (1 - alpha) + colour * alpha`` for an (h, w, 3) region."""
    a = alpha[..., None]
    region *= 1.0 - a
    region += a * np.asarray(colour, np.float32)


def _window(
    cx: float, cy: float, reach: float, shape: tuple[int, int]
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Slices of the window of half-width ``reach`` around (cx, cy), clipped to ``shape``, and its offsets."""
    h, w = shape
    y0, y1 = max(int(cy - reach), 0), min(int(math.ceil(cy + reach)) + 1, h)
    x0, x1 = max(int(cx - reach), 0), min(int(math.ceil(cx + reach)) + 1, w)
    dy = (np.arange(y0, y1, dtype=np.float32) - cy)[:, None]
    dx = (np.arange(x0, x1, dtype=np.float32) - cx)[None, :]
    return (slice(y0, y1), slice(x0, x1)), dx, dy


def _skin(rng: np.random.Generator, shape: tuple[int, int], tone: float) -> np.ndarray:
    light = np.array([236.0, 196.0, 172.0], np.float32)
    dark = np.array([150.0, 100.0, 75.0], np.float32)
    base = (light + (dark - light) * tone) * np.exp(rng.normal(0.0, 0.04, 3)).astype(np.float32)
    low, mid = _smooth_noise(rng, shape, 3.0), _smooth_noise(rng, shape, 40.0)
    shade = np.exp(0.05 * low + 0.025 * mid)[..., None] * np.array([1.0, 0.97, 0.95], np.float32) ** low[..., None]
    return base * shade


def _draw_lesion(
    rng: np.random.Generator, img: np.ndarray, malignant: bool
) -> tuple[np.ndarray, float, float, float]:
    """Paint one lesion; returns its (H, W) bool mask, centre x, y and its reach (largest radius with margin).

    Two grades drive its look. ``coarse`` (asymmetry, dark blotches, blue-grey veil: visible at any resolution)
    overlaps widely between the classes, as atypical nevi look like melanomas; ``fine`` (ripples of the border,
    warped and uneven pigment network, clustered dots, all a few hundredths of the lesion wide) separates them,
    but only at a resolution where the lesion spans many pixels.
    """
    h, w = img.shape[:2]
    short = min(h, w)
    coarse = rng.uniform(0.2, 1.0) if malignant else rng.uniform(0.0, 0.8)
    fine = rng.uniform(0.55, 1.0) if malignant else rng.uniform(0.0, 0.45)
    area = math.exp(rng.uniform(math.log(0.02), math.log(0.3))) * h * w
    radius = min(math.sqrt(area / math.pi), 0.3 * short)
    k = np.arange(1, 25)
    amp = np.where(k <= 4, (0.02 + 0.14 * coarse) * rng.uniform(0.3, 1.0, k.size) / k, 0.0)
    amp += np.where(k >= 12, 0.012 * fine * rng.uniform(0.5, 1.5, k.size), 0.0)
    phase = rng.uniform(0.0, 2.0 * np.pi, k.size)
    reach = radius * (1.0 + amp.sum()) * 1.15 + 2.0
    # near the centre, as a dermatologist frames it, and inside the image where it fits
    cx = float(np.clip(w / 2.0 + rng.normal(0.0, 0.06) * short, min(reach, w / 2.0), max(w - reach, w / 2.0)))
    cy = float(np.clip(h / 2.0 + rng.normal(0.0, 0.06) * short, min(reach, h / 2.0), max(h - reach, h / 2.0)))
    sl, dx, dy = _window(cx, cy, reach, (h, w))
    theta = np.arctan2(dy, dx)
    on = amp > 0
    outline = 1.0 + (amp[on, None, None] * np.cos(k[on, None, None] * theta[None] + phase[on, None, None])).sum(0)
    rho = np.hypot(dx, dy) / (radius * np.maximum(outline, 0.3))
    shape = rho.shape
    region = img[sl]
    body = _sigmoid((1.0 - rho) / 0.02)
    red = rng.uniform(115.0, 165.0)
    brown = np.array([red, red * rng.uniform(0.55, 0.65), red * rng.uniform(0.4, 0.5)], np.float32)
    _blend(region, brown, 0.9 * body * (1.0 + 0.1 * _smooth_noise(rng, shape, 6.0)).clip(0.0, 1.1) / 1.1)
    _blend(region, brown * 0.75, 0.5 * body * _sigmoid((0.5 - rho) / 0.15))  # darker centre
    # pigment network: a regular mesh, warped and of uneven thickness with ``fine``
    period = max(radius / rng.uniform(7.0, 10.0), 2.0)
    warp = fine * period * 0.6
    u = dx + warp * _smooth_noise(rng, shape, 12.0)
    v = dy + warp * _smooth_noise(rng, shape, 12.0)
    mesh = np.minimum(np.abs(np.sin(np.pi * u / period)), np.abs(np.sin(np.pi * v / period)))
    thickness = 0.25 * (1.0 + 1.5 * fine * np.clip(_smooth_noise(rng, shape, 10.0), -0.8, 2.0))
    _blend(region, brown * 0.55, 0.45 * body * _sigmoid((thickness - mesh) / 0.06))
    # dark brown / black blotches and a blue-grey veil, growing with ``coarse``
    blotch = _smooth_noise(rng, shape, 5.0)
    _blend(region, [48.0, 32.0, 30.0], 0.85 * body * _sigmoid((blotch - (2.2 - 1.6 * coarse)) / 0.15))
    if rng.random() < coarse:
        veil = _smooth_noise(rng, shape, 3.0)
        _blend(region, [105.0, 118.0, 140.0], 0.6 * coarse * body * _sigmoid((veil - 0.6) / 0.2))
    # dots, clustered towards one side of the lesion, more of them with ``fine``
    side = rng.uniform(0.0, 2.0 * np.pi)
    dot_r = max(0.03 * radius, 0.8)
    for _ in range(int(rng.poisson(2.0 + 40.0 * fine**2))):
        angle, dist = side + rng.normal(0.0, 0.8), rng.uniform(0.3, 0.9)
        scale = max(1.0 + float((amp * np.cos(k * angle + phase)).sum()), 0.3)  # inside the outline
        px = cx + math.cos(angle) * dist * radius * scale
        py = cy + math.sin(angle) * dist * radius * scale
        dsl, ddx, ddy = _window(px, py, 2.5 * dot_r, (h, w))
        size = dot_r * rng.uniform(0.6, 1.4)
        _blend(img[dsl], [35.0, 25.0, 25.0], 0.9 * _sigmoid((size - np.hypot(ddx, ddy)) / 0.5))
    mask = np.zeros((h, w), bool)
    mask[sl] = rho < 1.0
    return mask, cx, cy, reach


def _draw_field(rng: np.random.Generator, img: np.ndarray, cx: float, cy: float, reach: float) -> None:
    """The dermatoscope's dark circular field (clear of the lesion) or a mild vignette."""
    h, w = img.shape[:2]
    yy, xx = np.ogrid[0:h, 0:w]
    dist = np.hypot(xx - w / 2.0, yy - h / 2.0).astype(np.float32)
    if rng.random() < 0.45:
        needed = math.hypot(cx - w / 2.0, cy - h / 2.0) + reach * 1.1
        radius = max(rng.uniform(0.5, 0.7) * min(h, w), needed)
        edge = max(0.01 * min(h, w), 1.0)
        inside = _sigmoid((radius - dist) / edge)
        dark = rng.uniform(8.0, 30.0)
        img *= inside[..., None]
        img += ((1.0 - inside) * dark)[..., None]
    else:
        strength = rng.uniform(0.05, 0.35)
        img *= (1.0 - strength * (dist / dist.max()) ** 2)[..., None]


def _draw_bubbles(rng: np.random.Generator, img: np.ndarray) -> None:
    h, w = img.shape[:2]
    short = min(h, w)
    for _ in range(int(rng.integers(1, 9))):
        r = rng.uniform(0.01, 0.05) * short
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        sl, dx, dy = _window(x, y, r + 3.0, (h, w))
        d = np.hypot(dx, dy)
        region = img[sl]
        _blend(region, [240.0, 238.0, 232.0], _sigmoid((r - d) / 0.7) * 0.15)
        _blend(region, [252.0, 252.0, 250.0], np.exp(-(((d - r) / max(0.8, 0.08 * r)) ** 2)) * 0.7)
        glint = np.exp(-((dx + 0.4 * r) ** 2 + (dy + 0.4 * r) ** 2) / (2.0 * (0.12 * r + 0.5) ** 2))
        _blend(region, [255.0, 255.0, 255.0], glint * 0.85)


def _draw_ruler(rng: np.random.Generator, img: np.ndarray) -> None:
    """Tick marks of a ruler along one image edge."""
    h, w = img.shape[:2]
    short = min(h, w)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    spacing = rng.uniform(0.015, 0.03) * short
    tick = rng.uniform(0.015, 0.03) * short
    stroke = max(1, round(0.003 * short))
    offset = rng.uniform(0.01, 0.05) * short
    edge = int(rng.integers(4))
    length = w if edge < 2 else h
    for i, pos in enumerate(np.arange(rng.uniform(0, spacing), length, spacing)):
        size = tick * (2.0 if i % 10 == 0 else 1.4 if i % 5 == 0 else 1.0)
        if edge < 2:
            y = offset if edge == 0 else h - 1 - offset
            draw.line([(pos, y), (pos, y + size if edge == 0 else y - size)], fill=255, width=stroke)
        else:
            x = offset if edge == 2 else w - 1 - offset
            draw.line([(x, pos), (x + size if edge == 2 else x - size, pos)], fill=255, width=stroke)
    alpha = np.asarray(canvas, np.float32) / 255.0 * rng.uniform(0.6, 0.9)
    _blend(img, [rng.uniform(20, 60)] * 3, alpha)


def _draw_ink(rng: np.random.Generator, img: np.ndarray, cx: float, cy: float, reach: float) -> np.ndarray:
    """Surgical-marker strokes (violet) beside the lesion, outside it; returns their (H, W) opacity. A stroke is
    3-5 % of the short side wide (a marker line of about 1 mm in a field of 20-30 mm), so it stays a pixel or more
    wide at a 32-pixel input."""
    h, w = img.shape[:2]
    short = min(h, w)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    stroke = max(2, round(rng.uniform(0.03, 0.05) * short))
    for _ in range(int(rng.integers(1, 4))):
        angle = rng.uniform(0.0, 2.0 * np.pi)
        dist = reach * rng.uniform(1.05, 1.35) + stroke
        span = rng.uniform(0.3, 0.8)
        arc = angle + np.linspace(-span / 2, span / 2, 16)
        points = [(cx + dist * math.cos(a), cy + dist * math.sin(a)) for a in arc]
        draw.line(points, fill=255, width=stroke, joint="curve")
    alpha = np.asarray(canvas, np.float32) / 255.0 * rng.uniform(0.6, 0.85)
    _blend(img, [rng.uniform(90, 130), rng.uniform(50, 80), rng.uniform(130, 170)], alpha)
    return alpha


def make_dermoscopy_image(
    seed: int,
    index: int,
    height: int,
    width: int,
    malignant: bool,
    tone: float = 0.2,
    hairiness: float = 3.0,
    ink: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic dermoscopy image and its lesion mask.

    Args:
        seed: data-set seed.
        index: image index (the image depends only on ``seed``, ``index`` and the other arguments).
        height: image height in pixels (>= 32).
        width: image width in pixels (>= 32).
        malignant: draw a melanoma rather than a benign lesion.
        tone: skin tone, 0 (light) to 1 (dark).
        hairiness: expected number of hair strands (Poisson) when the image has hair.
        ink: draw violet marker strokes beside the lesion (the shortcut confounder).

    Returns:
        ``(image, mask)``: (H, W, 3) uint8 RGB and (H, W) uint8 lesion mask (0 / 255).
    """
    image, mask, _ = _render(seed, index, height, width, malignant, tone, hairiness, ink)
    return image, mask


def _render(
    seed: int, index: int, height: int, width: int, malignant: bool, tone: float, hairiness: float, ink: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`make_dermoscopy_image` plus the (H, W) bool pixels the ink touches (none without ink)."""
    for name, value in (("height", height), ("width", width)):
        if int(value) != value or value < 32:
            raise ValueError(f"{name} must be an integer >= 32, got {value!r}")
    rng = np.random.default_rng([seed, _STREAM_RENDER, index])
    img = _skin(rng, (int(height), int(width)), float(tone))
    mask, cx, cy, reach = _draw_lesion(rng, img, bool(malignant))
    inked = np.zeros(img.shape[:2], bool)
    if ink:  # its own random stream: the same image with and without ink differs by the ink only
        inked = _draw_ink(np.random.default_rng([seed, _STREAM_INK, index]), img, cx, cy, reach) > 0
    if rng.random() < 0.6:
        strands = int(rng.poisson(hairiness))
        if strands:
            alpha = hair_alpha(img.shape[:2], rng, strands) * rng.uniform(0.7, 0.95)
            _blend(img, [rng.uniform(25, 60), rng.uniform(18, 40), rng.uniform(12, 30)], alpha)
    if rng.random() < 0.25:
        _draw_ruler(rng, img)
    if rng.random() < 0.3:
        _draw_bubbles(rng, img)
    _draw_field(rng, img, cx, cy, reach)
    img += rng.normal(0.0, 2.0, img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0.0, 255.0).astype(np.uint8), mask.astype(np.uint8) * 255, inked


def _patients(rng: np.random.Generator, n: int, missing_rate: float) -> list[_Patient]:
    out = []
    for _ in range(n):
        male = rng.random() < 0.52
        age = float(np.clip(5.0 * round(rng.normal(52.0, 16.0) / 5.0), 15.0, 90.0))
        out.append(
            _Patient(
                sex="" if rng.random() < missing_rate else ("male" if male else "female"),
                age=math.nan if rng.random() < missing_rate else age,
                tone=float(rng.beta(1.5, 5.0)),
                hairiness=float(rng.uniform(4.0, 14.0) if male else rng.uniform(0.5, 5.0)),
                risk=0.8 * (age - 52.0) / 16.0 + (0.4 if male else 0.0) + float(rng.normal(0.0, 0.8)),
            )
        )
    return out


def _check(
    n_images: int,
    seed: int,
    prevalence: float,
    shortcut_rate: float,
    images_per_patient: float,
    min_size: int,
    max_size: int,
    missing_rate: float,
) -> None:
    for name, value, low in (("n_images", n_images, 1), ("seed", seed, 0), ("min_size", min_size, 32)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(max_size, (int, np.integer)) or max_size < min_size:
        raise ValueError(f"max_size must be an integer >= min_size ({min_size}), got {max_size!r}")
    for name, value in (("prevalence", prevalence), ("shortcut_rate", shortcut_rate), ("missing_rate", missing_rate)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    if not images_per_patient >= 1.0:
        raise ValueError(f"images_per_patient must be >= 1, got {images_per_patient!r}")


def make_dermoscopy_dataset(
    out_dir: str | Path,
    n_images: int,
    seed: int = 0,
    prevalence: float = 0.05,
    shortcut_rate: float = 0.0,
    images_per_patient: float = 6.0,
    min_size: int = 600,
    max_size: int = 2000,
    missing_rate: float = 0.02,
    jpeg_quality: int = 90,
    n_folds: int = 0,
    test_fraction: float = 0.2,
    shortcut_folds: Sequence[int] | None = None,
    ink_probe: bool = False,
    progress: ProgressCallback | None = None,
) -> Path:
    """Write a synthetic dermoscopy data set in the ISIC 2020 layout.

    Written under ``out_dir``:

    - ``train.csv`` with the ISIC 2020 training columns (:data:`DERMOSCOPY_CSV_COLUMNS`): ``image_name,
      patient_id, sex, age_approx, anatom_site_general_challenge, diagnosis, benign_malignant, target``; missing
      sex, age or site are empty cells, as in the published CSV;
    - ``images/<image_name>.jpg``: RGB JPEGs, the longer side uniform in ``[min_size, max_size]``, aspect 1:1,
      4:3 or 3:2 in either orientation;
    - ``masks/<image_name>_segmentation.png``: the lesion mask (0 / 255) at the image size (ISIC naming);
    - ``dataset.json``: the generation parameters and counts;
    - with ``n_folds``: ``folds.csv``, the fold table of the dermoscopy bundle (``folds_source``): a held-out test
      fold (-1) and ``n_folds`` cross-validation folds, patient-grouped and stratified as the bundle draws them
      (:func:`medgain.data.draw_patient_folds` with this seed);
    - with ``ink_probe``: ``probe/images/<image_name>.jpg``, every test image without ink rendered again with its
      ink markings (the same image but for the ink, drawn beneath hair, ruler and field as in training), and
      ``probe/masks/<image_name>_segmentation.png``, the pixels the ink touches: the ink-reliance probe of a
      shortcut study (:mod:`medgain.study.probe`).

    Patients (``round(n_images / images_per_patient)``) have one or more images each. Exactly
    ``round(n_images * prevalence)`` images are melanomas, drawn with odds that grow with age, male sex, the
    torso and head/neck sites and a per-patient random effect; ``round(melanomas * shortcut_rate)`` of them carry
    ink markings. The output is identical for identical arguments.

    Args:
        out_dir: output directory (created; files of the same names are overwritten).
        n_images: number of images.
        seed: random seed.
        prevalence: fraction of melanomas.
        shortcut_rate: fraction of the melanomas with ink markings beside the lesion (none on benign images).
        images_per_patient: mean number of images per patient.
        min_size: smallest longer side in pixels (>= 32).
        max_size: largest longer side in pixels.
        missing_rate: chance that a patient's sex, a patient's age or an image's site is missing.
        jpeg_quality: JPEG quality (1-95).
        n_folds: write ``folds.csv`` with this many cross-validation folds (0: none).
        test_fraction: share of the patients in the test fold of ``folds.csv``.
        shortcut_folds: the folds whose melanomas may carry ink (e.g. the training folds of a run validated on fold
            0, so validation and test stay clean); None: any melanoma. Needs ``n_folds``.
        ink_probe: write the inked twins of the clean test images under ``probe/``. Needs ``n_folds``.
        progress: called as ``progress(done, n_images)`` after each image (e.g.
            :func:`medgain.synth.progress.print_progress`).

    Returns:
        path of ``train.csv``.

    Raises:
        ValueError: for an invalid argument, or ``out_dir`` that exists and is not a directory.
    """
    _check(n_images, seed, prevalence, shortcut_rate, images_per_patient, min_size, max_size, missing_rate)
    if (shortcut_folds is not None or ink_probe) and n_folds < 2:
        raise ValueError(f"shortcut_folds and ink_probe need n_folds >= 2 (a fold table), got n_folds={n_folds!r}")
    if shortcut_folds is not None and not set(shortcut_folds) <= {TEST_FOLD, *range(n_folds)}:
        raise ValueError(f"shortcut_folds must be folds of {TEST_FOLD} .. {n_folds - 1}, got {list(shortcut_folds)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng([seed, _STREAM_PATIENTS])
    n_patients = max(1, min(n_images, round(n_images / images_per_patient)))
    patients = _patients(rng, n_patients, missing_rate)
    owner = np.concatenate([np.arange(n_patients), rng.choice(n_patients, n_images - n_patients)])
    owner = np.sort(owner)  # images of a patient are consecutive

    image_rng = np.random.default_rng([seed, _STREAM_IMAGES])
    sites = image_rng.choice(len(SITES), size=n_images, p=_SITE_PROB / _SITE_PROB.sum())
    logodds = np.array([patients[p].risk for p in owner]) + _SITE_LOGODDS[sites]
    n_malignant = int(math.floor(n_images * prevalence + 0.5))
    gumbel = logodds - np.log(-np.log(image_rng.random(n_images)))  # Gumbel top-k: weighted draw without replacement
    malignant = np.zeros(n_images, bool)
    malignant[np.argsort(-gumbel, kind="stable")[:n_malignant]] = True
    site_missing = image_rng.random(n_images) < missing_rate
    diagnosis_draw = image_rng.choice(len(_BENIGN_DIAGNOSES), size=n_images, p=_BENIGN_DIAGNOSIS_PROB)
    long_side = image_rng.integers(min_size, max_size + 1, n_images)
    aspect = image_rng.choice([1.0, 4.0 / 3.0, 1.5], size=n_images)
    portrait = image_rng.random(n_images) < 0.3

    patient_ids = [f"SP_{p:05d}" for p in owner]
    folds = (draw_patient_folds(malignant.astype(int), patient_ids, n_folds, seed, test_fraction) if n_folds
             else np.zeros(n_images, np.int64))
    ink = np.zeros(n_images, bool)
    eligible = malignant if shortcut_folds is None else malignant & np.isin(folds, list(shortcut_folds))
    positives = np.flatnonzero(eligible)
    n_ink = int(math.floor(len(positives) * shortcut_rate + 0.5))
    ink[np.random.default_rng([seed, _STREAM_SHORTCUT]).choice(positives, size=n_ink, replace=False)] = True

    rows = []
    for index in range(n_images):
        patient = patients[owner[index]]
        short_side = max(32, int(round(long_side[index] / aspect[index])))
        height, width = (long_side[index], short_side) if portrait[index] else (short_side, long_side[index])
        render = (seed, index, int(height), int(width), bool(malignant[index]), patient.tone, patient.hairiness)
        image, mask = make_dermoscopy_image(*render, ink[index])
        name = f"SYN_{index:07d}"
        Image.fromarray(image).save(out / "images" / f"{name}.jpg", quality=int(jpeg_quality))
        Image.fromarray(mask).save(out / "masks" / f"{name}_segmentation.png")
        if ink_probe and folds[index] == TEST_FOLD and not ink[index]:
            twin, _, inked = _render(*render, True)
            (out / "probe" / "images").mkdir(parents=True, exist_ok=True)
            (out / "probe" / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(twin).save(out / "probe" / "images" / f"{name}.jpg", quality=int(jpeg_quality))
            Image.fromarray(inked.astype(np.uint8) * 255).save(out / "probe" / "masks" / f"{name}_segmentation.png")
        rows.append(
            {
                "image_name": name,
                "patient_id": f"SP_{owner[index]:05d}",
                "sex": patient.sex,
                "age_approx": "" if math.isnan(patient.age) else f"{patient.age:.1f}",
                "anatom_site_general_challenge": "" if site_missing[index] else SITES[sites[index]],
                "diagnosis": "melanoma" if malignant[index] else _BENIGN_DIAGNOSES[diagnosis_draw[index]],
                "benign_malignant": "malignant" if malignant[index] else "benign",
                "target": int(malignant[index]),
            }
        )
        if progress is not None:
            progress(index + 1, n_images)
    if n_folds:
        write_fold_table([{"image": f"images/{row['image_name']}.jpg", "patient": row["patient_id"],
                           "label": row["target"], "fold": int(fold)} for row, fold in zip(rows, folds)],
                         out / "folds.csv")
    csv_path = out / "train.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=DERMOSCOPY_CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "name": "medgain synthetic dermoscopy",
        "generator": "medgain.synth.dermoscopy.make_dermoscopy_dataset",
        "seed": int(seed),
        "n_images": int(n_images),
        "n_patients": int(n_patients),
        "prevalence": float(prevalence),
        "shortcut_rate": float(shortcut_rate),
        "images_per_patient": float(images_per_patient),
        "min_size": int(min_size),
        "max_size": int(max_size),
        "missing_rate": float(missing_rate),
        "malignant": int(malignant.sum()),
        "ink_markings": int(ink.sum()),
        "n_folds": int(n_folds),
        "test_fraction": float(test_fraction) if n_folds else None,
        "shortcut_folds": None if shortcut_folds is None else sorted(int(f) for f in shortcut_folds),
        "ink_probe": bool(ink_probe),
        "folds": {str(f): {"images": int((folds == f).sum()), "malignant": int((malignant & (folds == f)).sum()),
                           "ink_markings": int((ink & (folds == f)).sum())}
                  for f in sorted(set(folds.tolist()))} if n_folds else None,
        "layout": {
            "csv": "train.csv",
            "images": "images/<image_name>.jpg",
            "masks": "masks/<image_name>_segmentation.png",
            **({"folds": "folds.csv"} if n_folds else {}),
            **({"probe_images": "probe/images/<image_name>.jpg", "probe_ink_masks":
                "probe/masks/<image_name>_segmentation.png"} if ink_probe else {}),
        },
    }
    (out / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    return csv_path
