"""Synthetic small-bowel capsule-endoscopy frames with known lesion masks.

Real capsule-endoscopy data cannot be redistributed, so this module renders RGB frames that share the
visual structure of capsule video (mucosa texture and folds in a circular field of view, bubbles, debris,
specular highlights) with four lesion kinds whose pixel masks are known exactly.  The output is a MONAI
datalist split by synthetic study, ready for :class:`monai.data.Dataset`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import gaussian_filter

from medgain.synth.progress import ProgressCallback

__all__ = [
    "LESION_KINDS",
    "SPLITS",
    "VL_ENDOSCOPIC_IMAGE_STORAGE",
    "burn_marker",
    "make_capsule_dataset",
    "make_capsule_frame",
    "make_capsule_frame_lesions",
    "marker_mask",
]

LESION_KINDS: dict[str, int] = {"ulcer": 1, "bleeding": 2, "angioectasia": 3, "polyp": 4}

VL_ENDOSCOPIC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.1"
SPLITS = ("training", "validation", "test")

# independent random streams: numpy.random.default_rng([seed, stream, ...])
_STREAM_STYLE, _STREAM_FRAME, _STREAM_PLAN, _STREAM_SHORTCUT = 1, 2, 3, 4

# lesion area as a fraction of the frame (log-uniform range), per kind
_LESION_AREA = {
    "ulcer": (0.006, 0.05),
    "bleeding": (0.015, 0.08),
    "angioectasia": (0.002, 0.012),
    "polyp": (0.01, 0.06),
}
_LESION_WOBBLE = {"ulcer": 0.1, "bleeding": 0.16, "angioectasia": 0.12, "polyp": 0.05}
_MAX_ELONGATION = 1.8
_MAX_LESIONS = 5


@dataclass(frozen=True)
class _StudyStyle:
    """Appearance shared by all frames of one synthetic study."""

    base: np.ndarray  # mucosa RGB albedo, float32 (3,)
    brightness: float
    texture: tuple[float, float, float]  # amplitudes of low / mid / fine texture
    fold_rate: float
    fold_depth: float
    vignette: float
    blur: float
    bubble_rate: float
    debris_rate: float
    highlight_rate: float
    kinds: tuple[str, ...]


@dataclass(frozen=True)
class _Lesion:
    """Shape parameters of one lesion; ``extent`` bounds its reach from the centre in pixels."""

    kind: str
    radius: float
    elongation: float
    angle: float
    wobble: np.ndarray
    phase: np.ndarray

    @property
    def extent(self) -> float:
        return self.radius * math.sqrt(self.elongation) * (1.0 + float(self.wobble.sum())) + 1.0


def _study_style(seed: int, study: int) -> _StudyStyle:
    rng = np.random.default_rng([seed, _STREAM_STYLE, study])
    red = rng.uniform(185.0, 245.0)
    base = np.array([red, red * rng.uniform(0.48, 0.72), red * rng.uniform(0.28, 0.6)], np.float32)
    n_kinds = int(rng.integers(2, 4))
    kinds = tuple(sorted(rng.choice(list(LESION_KINDS), size=n_kinds, replace=False), key=LESION_KINDS.get))
    return _StudyStyle(
        base=base,
        brightness=float(rng.uniform(0.75, 1.1)),
        texture=(float(rng.uniform(0.08, 0.2)), float(rng.uniform(0.04, 0.12)), float(rng.uniform(0.02, 0.06))),
        fold_rate=float(rng.uniform(1.0, 4.0)),
        fold_depth=float(rng.uniform(0.3, 0.6)),
        vignette=float(rng.uniform(0.25, 0.55)),
        blur=float(rng.uniform(0.0, 0.8)),
        bubble_rate=float(rng.uniform(0.2, 0.7)),
        debris_rate=float(rng.uniform(0.1, 0.5)),
        highlight_rate=float(rng.uniform(1.0, 5.0)),
        kinds=kinds,
    )


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


@lru_cache(maxsize=16)
def _lowpass(size: int, cells: float) -> np.ndarray:
    """Gaussian low-pass filter on the ``rfft2`` grid of a (size, size) field."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    return np.exp(-(fy**2 + fx**2) * (size / cells) ** 2).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field with features about ``size / cells`` pixels wide."""
    lowpass = _lowpass(size, cells)
    spectrum = rng.standard_normal((2, *lowpass.shape), dtype=np.float32) * lowpass
    field = np.fft.irfft2(spectrum[0] + 1j * spectrum[1], s=(size, size)).astype(np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


def _local_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-smoothed noise on a small window."""
    field = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return (field - field.mean()) / (field.std() + 1e-6)


def _patch(cx: float, cy: float, reach: float, size: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Slices of the square window of half-width ``reach`` around (cx, cy) and its pixel offsets."""
    y0, y1 = max(int(np.floor(cy - reach)), 0), min(int(np.ceil(cy + reach)) + 1, size)
    x0, x1 = max(int(np.floor(cx - reach)), 0), min(int(np.ceil(cx + reach)) + 1, size)
    dy = (np.arange(y0, y1, dtype=np.float32) - cy)[:, None]
    dx = (np.arange(x0, x1, dtype=np.float32) - cx)[None, :]
    return (slice(y0, y1), slice(x0, x1)), dx, dy


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _blend(region: np.ndarray, colour: np.ndarray | Sequence[float], alpha: np.ndarray) -> None:
    """In place: ``region = region * (1 - alpha) + colour * alpha`` for an (h, w, 3) region."""
    a = alpha[..., None]
    region *= 1.0 - a
    region += a * np.asarray(colour, np.float32)


def _blob_rho(lesion: _Lesion, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Normalised radial coordinate of an irregular, elongated blob: < 1 inside, 1 on its outline."""
    c, s = math.cos(lesion.angle), math.sin(lesion.angle)
    e = math.sqrt(lesion.elongation)
    u = (dx * c + dy * s) / e
    v = (dy * c - dx * s) * e
    theta = np.arctan2(v, u)
    outline = np.ones_like(theta)
    for k, (amp, phase) in enumerate(zip(lesion.wobble, lesion.phase), start=2):
        outline += float(amp) * np.cos(k * theta + float(phase))
    return np.hypot(u, v) / (lesion.radius * outline)


def _sample_lesion(rng: np.random.Generator, kind: str, size: int) -> _Lesion:
    lo, hi = _LESION_AREA[kind]
    area = math.exp(rng.uniform(math.log(lo), math.log(hi))) * size * size
    return _Lesion(
        kind=kind,
        radius=max(math.sqrt(area / math.pi), 2.0),
        elongation=float(rng.uniform(1.0, _MAX_ELONGATION)),
        angle=float(rng.uniform(0.0, np.pi)),
        wobble=rng.uniform(0.0, _LESION_WOBBLE[kind], 3),
        phase=rng.uniform(0.0, 2.0 * np.pi, 3),
    )


def _disc_points(rng: np.random.Generator, n: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """``n`` uniform points (x, y) in a disc, shape (n, 2)."""
    r = radius * np.sqrt(rng.random(n))
    t = rng.uniform(0.0, 2.0 * np.pi, n)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _away_from(points: np.ndarray, reach: np.ndarray, keep_out: list[tuple[float, float, float]]) -> np.ndarray:
    """Mask of points whose discs of radius ``reach`` do not touch any (x, y, radius) keep-out disc."""
    ok = np.ones(len(points), bool)
    for x, y, r in keep_out:
        ok &= np.hypot(points[:, 0] - x, points[:, 1] - y) > r + reach
    return ok


def _place_lesions(
    rng: np.random.Generator,
    style: _StudyStyle,
    fov: tuple[float, float, float],
    light: np.ndarray,
    size: int,
    count: tuple[int, int] | None = None,
) -> list[tuple[_Lesion, float, float]]:
    """Lesions of the study's kinds, inside the field of view, well lit and not overlapping: 1-2 (65 % one)
    or, with ``count = (low, high)``, a uniform number in [low, high] (fewer when the frame has no room)."""
    cx, cy, fr = fov
    n = (1 if rng.random() < 0.65 else 2) if count is None else int(rng.integers(count[0], count[1] + 1))
    placed: list[tuple[_Lesion, float, float]] = []
    for _ in range(n):
        lesion = _sample_lesion(rng, str(rng.choice(style.kinds)), size)
        cand = _disc_points(rng, 48, cx, cy, max(fr - lesion.extent - 2.0, 0.0))
        ok = _away_from(cand, np.full(len(cand), lesion.extent), [(x, y, les.extent) for les, x, y in placed])
        if not ok.any():
            continue
        iy = np.clip(np.rint(cand[:, 1]).astype(int), 0, size - 1)
        ix = np.clip(np.rint(cand[:, 0]).astype(int), 0, size - 1)
        score = np.where(ok, light[iy, ix], -1.0)
        bright = np.flatnonzero(score > 0.6)
        best = bright[0] if bright.size else int(np.argmax(score))
        placed.append((lesion, float(cand[best, 0]), float(cand[best, 1])))
    return placed


def _draw_lesion(
    rng: np.random.Generator,
    albedo: np.ndarray,
    label: np.ndarray,
    lesion: _Lesion,
    cx: float,
    cy: float,
    instances: np.ndarray,
    index: int,
) -> None:
    """Paint one lesion onto the mucosa albedo, its kind into the label map and ``index`` into the instance map."""
    size = albedo.shape[0]
    sl, dx, dy = _patch(cx, cy, lesion.extent * 1.3, size)
    region = albedo[sl]
    rho = _blob_rho(lesion, dx, dy)
    texture = _local_noise(rng, rho.shape, max(lesion.radius / 4.0, 0.7))
    if lesion.kind == "ulcer":
        rim = np.exp(-(((rho - 0.9) / 0.18) ** 2)) * rng.uniform(0.6, 0.85)
        _blend(region, [rng.uniform(180, 215), rng.uniform(40, 70), rng.uniform(40, 65)], rim)
        pale = np.array([rng.uniform(220, 245), rng.uniform(205, 232), rng.uniform(140, 190)], np.float32)
        core = _sigmoid((0.72 - rho) / 0.06) * 0.95
        region *= 1.0 - core[..., None]
        region += core[..., None] * pale * (1.0 + 0.06 * texture[..., None])
        inside = rho < 1.0
    elif lesion.kind == "bleeding":
        blood = np.array([rng.uniform(95, 175), rng.uniform(8, 30), rng.uniform(8, 30)], np.float32)
        alpha = _sigmoid((1.0 - rho) / 0.08) * rng.uniform(0.8, 0.95)
        region *= 1.0 - alpha[..., None]
        region += alpha[..., None] * blood * (1.0 + 0.12 * texture[..., None])
        inside = rho < 1.0
    elif lesion.kind == "angioectasia":
        rho = rho * (1.0 + 0.15 * np.clip(texture, 0.0, None))  # feathery outline, never beyond the blob
        red = [rng.uniform(215, 250), rng.uniform(25, 65), rng.uniform(35, 75)]
        _blend(region, red, _sigmoid((1.0 - rho) / 0.1) * 0.95)
        inside = rho < 1.0
    else:  # polyp: a rounded, slightly redder and brighter mound lit from one side
        t = rng.uniform(0.0, 2.0 * np.pi)
        toward = -(dx * math.cos(t) + dy * math.sin(t)) / lesion.radius
        dome = np.sqrt(np.clip(1.0 - rho**2, 0.0, 1.0))
        alpha = _sigmoid((1.0 - rho) / 0.05)
        gain = (1.0 + 0.15 * dome + 0.3 * np.clip(toward, -1.0, 1.0) * dome)[..., None]
        tint = np.array([rng.uniform(1.08, 1.18), rng.uniform(0.72, 0.85), rng.uniform(0.72, 0.85)], np.float32)
        region *= 1.0 + alpha[..., None] * (tint * gain - 1.0)
        direction = np.clip(-toward / np.maximum(np.hypot(dx, dy) / lesion.radius, 1e-3), 0.0, 1.0)
        region *= (1.0 - 0.35 * np.exp(-(((rho - 1.08) / 0.1) ** 2)) * direction)[..., None]
        inside = rho < 1.0
    label[sl][inside] = LESION_KINDS[lesion.kind]
    instances[sl][inside] = index


def _draw_debris(rng: np.random.Generator, albedo: np.ndarray, cx: float, cy: float, radius: float) -> None:
    sl, dx, dy = _patch(cx, cy, radius * 1.6, albedo.shape[0])
    wobble = _local_noise(rng, (dy.shape[0], dx.shape[1]), max(radius / 3.0, 0.8))
    rho = np.hypot(dx, dy) / radius + 0.25 * wobble
    brown = [rng.uniform(95, 140), rng.uniform(60, 90), rng.uniform(20, 45)]
    green = [rng.uniform(70, 110), rng.uniform(95, 130), rng.uniform(25, 55)]
    _blend(albedo[sl], brown if rng.random() < 0.5 else green, _sigmoid((1.0 - rho) / 0.1) * rng.uniform(0.7, 0.95))


def _draw_bubble(img: np.ndarray, cx: float, cy: float, radius: float) -> None:
    sl, dx, dy = _patch(cx, cy, radius + 2.0, img.shape[0])
    d = np.hypot(dx, dy)
    region = img[sl]
    _blend(region, [235.0, 232.0, 220.0], _sigmoid((radius - d) / 0.5) * 0.22)
    _blend(region, [250.0, 250.0, 245.0], np.exp(-(((d - radius) / max(0.5, 0.12 * radius)) ** 2)) * 0.75)
    glint = np.exp(-((dx + 0.35 * radius) ** 2 + (dy + 0.35 * radius) ** 2) / (2.0 * (0.15 * radius + 0.3) ** 2))
    _blend(region, [255.0, 255.0, 255.0], glint * 0.9)


def _draw_highlight(img: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> None:
    sl, dx, dy = _patch(cx, cy, 3.0 * max(sx, sy), img.shape[0])
    g = np.exp(-0.5 * ((dx / sx) ** 2 + (dy / sy) ** 2))
    _blend(img[sl], [255.0, 255.0, 255.0], np.clip(1.5 * g, 0.0, 1.0))


def _folds(
    rng: np.random.Generator, style: _StudyStyle, fov: tuple[float, float, float], warp: np.ndarray, size: int
) -> np.ndarray:
    """Multiplicative (H, W, 3) shading of curved mucosal folds, some of them red-tinted."""
    yy, xx = _grid(size)
    cx, cy, fr = fov
    dark = np.zeros((size, size), np.float32)
    red = np.zeros((size, size), np.float32)
    edge = np.zeros((size, size), np.float32)
    for _ in range(min(int(rng.poisson(style.fold_rate)), 7)):
        px, py = _disc_points(rng, 1, cx, cy, 0.85 * fr)[0].tolist()
        curvature = rng.uniform(0.3, 1.5) * size
        normal = rng.uniform(0.0, 2.0 * np.pi)
        ox, oy = px + curvature * math.cos(normal), py + curvature * math.sin(normal)
        half_angle = rng.uniform(0.15, 0.45) * size / curvature
        width = max(rng.uniform(0.012, 0.04) * size, 1.0)
        wiggle = rng.uniform(0.01, 0.03) * size
        # work in the bounding box of the arc, padded by the line profile and the warp
        arc = normal + np.pi + np.linspace(-half_angle, half_angle, 9)
        ax, ay = ox + curvature * np.cos(arc), oy + curvature * np.sin(arc)
        pad = 5.0 * width + 4.0 * wiggle + 0.01 * size + 1.0
        y0, y1 = max(int(ay.min() - pad), 0), min(int(ay.max() + pad) + 2, size)
        x0, x1 = max(int(ax.min() - pad), 0), min(int(ax.max() + pad) + 2, size)
        depth = style.fold_depth * rng.uniform(0.7, 1.2)
        tint = rng.uniform(0.2, 0.45) if rng.random() < 0.3 else 0.0
        if y0 >= y1 or x0 >= x1:
            continue
        sl = (slice(y0, y1), slice(x0, x1))
        dy, dx = yy[sl] - oy, xx[sl] - ox
        signed = np.hypot(dx, dy) - curvature + wiggle * warp[sl]
        delta = (np.arctan2(dy, dx) - normal) % (2.0 * np.pi) - np.pi  # angle from the arc middle
        window = np.clip(1.0 - np.square(np.square(delta / half_angle)), 0.0, 1.0)
        line = np.exp(-np.square(signed / width)) * window
        dark[sl] += depth * line
        edge[sl] += np.exp(-np.square((signed - 1.5 * width) / width)) * window
        red[sl] += tint * line
    dark = np.clip(dark, 0.0, 0.85)
    shade = np.stack([1.0 - 0.75 * dark, 1.0 - dark - 0.5 * red, 1.0 - dark - 0.5 * red], axis=-1)
    shade += 0.1 * np.clip(edge, 0.0, 1.0)[..., None]
    return np.clip(shade, 0.05, None)


def make_capsule_frame(
    seed: int,
    study: int,
    frame: int,
    size: int = 256,
    positive: bool = False,
    lesions_per_frame: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic capsule-endoscopy frame and its lesion label map.

    The frame depends only on its arguments, never on other frames or on generation order.

    Args:
        seed: data set seed.
        study: index of the synthetic study; frames of a study share colour and texture style.
        frame: index of the frame within its study.
        size: height and width in pixels, at least 32.
        positive: draw lesions of the study's lesion kinds.
        lesions_per_frame: ``(low, high)``: a positive frame gets a uniform number of lesions in [low, high]
            (fewer when they do not fit); None: 1-2 lesions (65 % one), the generator's original rule.

    Returns:
        ``(image, label_map)``: (size, size, 3) uint8 RGB and (size, size) uint8 with 0 for background and
        :data:`LESION_KINDS` values on lesion pixels.
    """
    image, label_map, _ = make_capsule_frame_lesions(seed, study, frame, size, positive, lesions_per_frame)
    return image, label_map


def make_capsule_frame_lesions(
    seed: int,
    study: int,
    frame: int,
    size: int = 256,
    positive: bool = False,
    lesions_per_frame: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`make_capsule_frame` plus the per-lesion label map.

    Returns:
        ``(image, label_map, lesion_map)``; ``lesion_map`` is (size, size) uint8 with 0 for background and k on
        the pixels of the k-th lesion (lesions never overlap).
    """
    _check_frame_args(seed, study, frame, size)
    if lesions_per_frame is not None:
        _check_lesion_count(lesions_per_frame)
    style = _study_style(seed, study)
    rng = np.random.default_rng([seed, _STREAM_FRAME, study, frame])
    yy, xx = _grid(size)

    cx = size / 2.0 + rng.uniform(-0.01, 0.01) * size
    cy = size / 2.0 + rng.uniform(-0.01, 0.01) * size
    fr = rng.uniform(0.465, 0.495) * size
    fov = (cx, cy, fr)
    radial = np.hypot(xx - cx, yy - cy) / fr

    # lighting: radial fall-off, a directional gradient and, often, the dark lumen
    t, tilt = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.0, 0.25)
    light = (1.0 - style.vignette * radial**2) * (1.0 + tilt * ((xx - cx) * math.cos(t) + (yy - cy) * math.sin(t)) / fr)
    if rng.random() < 0.55:
        lx, ly = _disc_points(rng, 1, cx, cy, 0.7 * fr)[0].tolist()
        sigma = rng.uniform(0.07, 0.18) * size
        light *= 1.0 - rng.uniform(0.6, 0.9) * np.exp(-((xx - lx) ** 2 + (yy - ly) ** 2) / (2.0 * sigma**2))

    low, mid, fine = _smooth_noise(rng, size, 4), _smooth_noise(rng, size, 12), _smooth_noise(rng, size, size / 3.0)
    tex = style.texture[0] * low + style.texture[1] * mid + style.texture[2] * fine
    base = style.base * np.exp(rng.normal(0.0, 0.04, 3)).astype(np.float32)
    albedo = base * np.exp(tex[..., None] * np.array([0.45, 1.0, 1.15], np.float32))

    if rng.random() < 0.3:  # diffuse reddish area: a look-alike, not a lesion
        hx, hy = _disc_points(rng, 1, cx, cy, 0.8 * fr)[0].tolist()
        sigma = rng.uniform(0.08, 0.2) * size
        weight = rng.uniform(0.3, 0.6) * np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (2.0 * sigma**2))
        albedo *= 1.0 + weight[..., None] * np.array([0.06, -0.12, -0.12], np.float32)

    label = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.uint8)
    lesions = _place_lesions(rng, style, fov, light, size, lesions_per_frame) if positive else []
    for index, (lesion, x, y) in enumerate(lesions, start=1):
        _draw_lesion(rng, albedo, label, lesion, x, y, instances, index)
    keep_out = [(x, y, lesion.extent) for lesion, x, y in lesions]

    if rng.random() < style.debris_rate:
        n = int(rng.integers(1, 4))
        radii = rng.uniform(0.02, 0.07, n) * size + 1.0
        pts = _disc_points(rng, n, cx, cy, 0.85 * fr)
        ok = _away_from(pts, 1.6 * radii, keep_out)
        for (x, y), r in zip(pts[ok], radii[ok]):
            _draw_debris(rng, albedo, float(x), float(y), float(r))

    img = albedo * (style.brightness * rng.uniform(0.9, 1.1) * light)[..., None] * _folds(rng, style, fov, low, size)

    n_bubbles = int(rng.poisson(1.0)) + (int(rng.integers(2, 14)) if rng.random() < style.bubble_rate else 0)
    if n_bubbles:
        # a cluster around one point plus one stray bubble
        cluster = _disc_points(rng, 1, cx, cy, 0.7 * fr) + rng.normal(0.0, 0.08 * size, (n_bubbles - 1, 2))
        pts = np.concatenate([cluster, _disc_points(rng, 1, cx, cy, 0.9 * fr)])
        radii = np.maximum(rng.uniform(0.012, 0.045, n_bubbles) * size, 1.5)
        ok = (np.hypot(pts[:, 0] - cx, pts[:, 1] - cy) < fr - radii) & _away_from(pts, radii + 2.0, keep_out)
        for (x, y), r in zip(pts[ok], radii[ok]):
            _draw_bubble(img, float(x), float(y), float(r))

    n_spots = int(rng.poisson(style.highlight_rate))
    pts = _disc_points(rng, n_spots, cx, cy, 0.92 * fr)
    spread = rng.uniform(0.3, 1.4, (n_spots, 2)) * max(size / 64.0, 1.0)
    ok = _away_from(pts, 3.0 * spread.max(1), keep_out)
    for (x, y), (sx, sy) in zip(pts[ok], spread[ok]):
        _draw_highlight(img, float(x), float(y), float(sx), float(sy))

    sigma = style.blur * rng.uniform(0.5, 1.0) * size / 128.0
    if sigma > 0.2:
        img = gaussian_filter(img, (sigma, sigma, 0.0))
    img += 1.5 * rng.standard_normal(img.shape, dtype=np.float32)
    inside_fov = np.clip(fr - radial * fr + 0.5, 0.0, 1.0)[..., None]
    outside = rng.uniform(0.0, 6.0) + np.abs(rng.standard_normal((size, size, 1), dtype=np.float32))
    img = img * inside_fov + outside * (1.0 - inside_fov)
    return np.clip(img + 0.5, 0.0, 255.0).astype(np.uint8), label, instances


def _apportion(total: int, weights: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Split the integer ``total`` proportionally to ``weights`` (largest remainder, random tie-break)."""
    w = np.asarray(weights, np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(int)
    order = np.lexsort((rng.random(len(w)), -(exact - counts)))
    counts[order[: total - counts.sum()]] += 1
    return counts


def _plan(
    n_frames: int, frames_per_study: int, prevalence: float, split_fractions: Sequence[float], rng: np.random.Generator
) -> tuple[list[str], np.ndarray]:
    """Assign whole studies to splits and choose the positive frames.

    Returns:
        the split name of every study and a boolean "positive" flag per frame.
    """
    sizes = np.diff(np.append(np.arange(0, n_frames, frames_per_study), n_frames))
    n_studies = len(sizes)
    per_split = _apportion(n_studies, split_fractions, rng)
    wanted = np.asarray(split_fractions) > 0
    while n_studies >= wanted.sum() and (per_split[wanted] == 0).any():  # every requested split gets a study
        per_split[int(np.argmax(per_split))] -= 1
        per_split[int(np.flatnonzero(wanted & (per_split == 0))[0])] += 1
    order = rng.permutation(n_studies)
    study_split = [""] * n_studies
    for name, chunk in zip(SPLITS, np.split(order, np.cumsum(per_split)[:-1])):
        for s in chunk:
            study_split[s] = name

    split_studies = [np.flatnonzero(np.array(study_split) == name) for name in SPLITS]
    split_frames = np.array([sizes[s].sum() for s in split_studies])
    quota = _apportion(int(np.floor(n_frames * prevalence + 0.5)), split_frames, rng)
    used = split_frames > 0
    # every used split gets a positive and a negative frame where the totals allow it
    while (used & (quota == 0)).any() and (quota >= 2).any():
        quota[int(np.argmax(quota))] -= 1
        quota[int(np.flatnonzero(used & (quota == 0))[0])] += 1
    while (used & (quota == split_frames)).any() and (split_frames - quota >= 2).any():
        quota[int(np.flatnonzero(used & (quota == split_frames))[0])] -= 1
        quota[int(np.argmax(split_frames - quota))] += 1

    positive = np.zeros(n_frames, bool)
    starts = np.arange(0, n_frames, frames_per_study)
    for studies, q in zip(split_studies, quota):
        if studies.size == 0:
            continue
        for s, k in zip(studies, _apportion(int(q), sizes[studies], rng)):
            positive[starts[s] + rng.choice(sizes[s], size=k, replace=False)] = True
    return study_split, positive


def burn_marker(image: np.ndarray) -> np.ndarray:
    """The shortcut confounder of :func:`make_capsule_dataset`: a white "L" burnt into the top-left corner of a
    frame, outside the field of view (what ``shortcut_rate`` adds to the marked positives).

    Args:
        image: (H, W, 3) uint8 RGB frame (H == W, as the generator writes them).

    Returns:
        A new (H, W, 3) uint8 frame with the marker; ``image`` is left unchanged.

    Raises:
        ValueError: when ``image`` is not a square (H, W, 3) uint8 array.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"burn_marker: needs a square (H, W, 3) uint8 RGB frame, got {image.dtype} {image.shape}")
    size = image.shape[0]
    pil = Image.fromarray(image)
    font = ImageFont.load_default(size=max(8, size // 10))
    ImageDraw.Draw(pil).text((round(0.02 * size), round(0.01 * size)), "L", fill=(255, 255, 255), font=font)
    return np.asarray(pil)


def marker_mask(size: int) -> np.ndarray:
    """The (size, size) bool mask of the pixels :func:`burn_marker` draws on a frame of that size (on a black
    frame: every pixel it touches)."""
    _check_int("size", size, 1)
    return burn_marker(np.zeros((size, size, 3), np.uint8)).any(axis=2)


def _write_dicom(path: Path, image: np.ndarray, seed: int, study: int, frame: int) -> None:
    """Write ``image`` as a VL Endoscopic Image Storage instance with UIDs derived from seed/study/frame."""
    study_id = f"study{study:04d}"
    tag = ["medgain.synth_capsule", str(seed), study_id]
    sop_uid = generate_uid(entropy_srcs=[*tag, "instance", str(frame)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VL_ENDOSCOPIC_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = VL_ENDOSCOPIC_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = f"SYNTHETIC^{study_id.upper()}"
    ds.PatientID = f"MEDGAIN-{seed}-{study_id}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*tag, "study"])
    ds.StudyID = study_id
    ds.StudyDate = "20000101"
    ds.StudyTime = "000000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*tag, "series"])
    ds.SeriesNumber = 1
    ds.Modality = "ES"
    ds.Manufacturer = "medgain synthetic"
    ds.InstanceNumber = frame + 1
    ds.ContentDate = "20000101"
    ds.ContentTime = f"{frame // 3600 % 24:02d}{frame // 60 % 60:02d}{frame % 60:02d}"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.LossyImageCompression = "00"
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.set_pixel_data(image, photometric_interpretation="RGB", bits_stored=8, generate_instance_uid=False)
    dcmwrite(path, ds, enforce_file_format=True)


def _write_label_map(stem: Path, label_map: np.ndarray) -> None:
    """``stem``.png and ``stem``.nii.gz (the array as-is, identity affine) of a uint8 label map."""
    Image.fromarray(label_map).save(stem.with_name(f"{stem.name}.png"))
    nifti = nib.Nifti1Image(label_map, np.eye(4))
    nifti.set_data_dtype(np.uint8)
    nib.save(nifti, stem.with_name(f"{stem.name}.nii.gz"))


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


def _check_frame_args(seed: int, study: int, frame: int, size: int) -> None:
    for name, value, low in (("seed", seed, 0), ("study", study, 0), ("frame", frame, 0), ("size", size, 32)):
        _check_int(name, value, low)


def _check_lesion_count(lesions_per_frame: Sequence[int]) -> None:
    count = tuple(lesions_per_frame)
    if (
        len(count) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in count)
        or not 1 <= count[0] <= count[1] <= _MAX_LESIONS
    ):
        raise ValueError(
            f"lesions_per_frame must be (low, high) with 1 <= low <= high <= {_MAX_LESIONS}, got {lesions_per_frame!r}."
        )


def _check_args(
    n_frames: int,
    seed: int,
    size: int,
    prevalence: float,
    shortcut_rate: float,
    frames_per_study: int,
    split_fractions: Sequence[float],
    shortcut_splits: Sequence[str] = SPLITS,
) -> None:
    for name, value, low in (("n_frames", n_frames, 1), ("frames_per_study", frames_per_study, 1)):
        _check_int(name, value, low)
    _check_frame_args(seed, 0, 0, size)
    for name, value in (("prevalence", prevalence), ("shortcut_rate", shortcut_rate)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
    fractions = np.asarray(split_fractions, np.float64)
    if fractions.shape != (len(SPLITS),) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(
            f"split_fractions must be {len(SPLITS)} non-negative numbers summing to 1 "
            f"({', '.join(SPLITS)}), got {split_fractions!r}."
        )
    unknown = sorted(set(shortcut_splits) - set(SPLITS))
    if unknown or not shortcut_splits:
        raise ValueError(f"shortcut_splits must name some of {', '.join(SPLITS)}, got {list(shortcut_splits)!r}.")


def make_capsule_dataset(
    out_dir: str | Path,
    n_frames: int,
    seed: int = 0,
    size: int = 256,
    prevalence: float = 0.1,
    shortcut_rate: float = 0.0,
    dicom: bool = False,
    frames_per_study: int = 20,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    lesions_per_frame: tuple[int, int] | None = None,
    shortcut_splits: Sequence[str] = SPLITS,
    progress: ProgressCallback | None = None,
) -> Path:
    """Write a synthetic capsule-endoscopy data set and its MONAI datalist.

    Frames are grouped into studies of ``frames_per_study`` consecutive frames sharing one style; whole studies
    are assigned to the ``training`` / ``validation`` / ``test`` splits, and positives are spread over the
    studies at about the ``prevalence`` rate so that every split holds positives and negatives whenever the
    counts allow.  Written under ``out_dir``:

    - ``images/<name>.png`` (RGB uint8) or, with ``dicom=True``, ``images/<name>.dcm`` with the same pixels;
    - ``labels/<name>.png`` and ``labels/<name>.nii.gz``: the (H, W) uint8 lesion label map (0 background,
      else the :data:`LESION_KINDS` value); the NIfTI holds the array as-is with an identity affine, so
      ``nib.load(p).get_fdata()`` equals the PNG array without transposition;
    - with ``lesions_per_frame``: ``lesions/<name>.png`` and ``lesions/<name>.nii.gz``, the per-lesion label
      map (0 background, k on the k-th lesion), and the datalist items also carry ``"lesion_map"`` (its PNG) and
      ``"n_lesions"``;
    - ``datalist.json`` with items ``{"image", "label", "label_map", "study", "lesion_kinds", "shortcut"}``
      (paths relative to ``out_dir``), and ``dataset.json`` with the generation parameters and split counts.

    The output is byte-identical for identical arguments.

    Args:
        out_dir: output directory, created if missing; existing files of the same names are overwritten.
        n_frames: number of frames.
        seed: random seed (non-negative).
        size: frame height and width in pixels, at least 32.
        prevalence: fraction of frames that contain lesions.
        shortcut_rate: fraction of the positive frames that also carry a white "L" marker in the top-left
            corner, a confounder unrelated to the lesion.
        shortcut_splits: the splits whose positives may carry the marker; e.g. ``("training", "validation")``
            confounds the data a model learns from while its test split stays clean (a shortcut study).
        dicom: write frames as DICOM VL Endoscopic Image Storage instead of PNG.
        frames_per_study: frames per synthetic study (the last study may be shorter).
        split_fractions: fractions of studies for the training, validation and test splits.
        lesions_per_frame: ``(low, high)`` lesions per positive frame (see :func:`make_capsule_frame`); None
            keeps the original 1-2 rule and writes exactly what earlier versions wrote for the same seed.
        progress: called as ``progress(done, n_frames)`` after each frame (e.g.
            :func:`medgain.synth.progress.print_progress`).

    Returns:
        path of ``datalist.json``.

    Raises:
        ValueError: for an invalid argument, or when ``out_dir`` exists and is not a directory.
    """
    _check_args(n_frames, seed, size, prevalence, shortcut_rate, frames_per_study, split_fractions, shortcut_splits)
    if lesions_per_frame is not None:
        _check_lesion_count(lesions_per_frame)
        lesions_per_frame = (int(lesions_per_frame[0]), int(lesions_per_frame[1]))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory.")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    if lesions_per_frame is not None:
        (out / "lesions").mkdir(parents=True, exist_ok=True)

    plan_rng = np.random.default_rng([seed, _STREAM_PLAN])
    study_split, positive = _plan(n_frames, frames_per_study, prevalence, split_fractions, plan_rng)
    in_shortcut_split = np.isin(np.asarray(study_split)[np.arange(n_frames) // frames_per_study], list(shortcut_splits))
    positives = np.flatnonzero(positive & in_shortcut_split)
    shortcut = np.zeros(n_frames, bool)
    shortcut_rng = np.random.default_rng([seed, _STREAM_SHORTCUT])
    n_shortcuts = int(np.floor(len(positives) * shortcut_rate + 0.5))
    shortcut[shortcut_rng.choice(positives, size=n_shortcuts, replace=False)] = True

    datalist: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for index in range(n_frames):
        study, frame = divmod(index, frames_per_study)
        name = f"study{study:04d}_frame{frame:03d}"
        image, label_map, lesion_map = make_capsule_frame_lesions(
            seed, study, frame, size=size, positive=bool(positive[index]), lesions_per_frame=lesions_per_frame
        )
        if shortcut[index]:
            image = burn_marker(image)
        image_path = f"images/{name}.dcm" if dicom else f"images/{name}.png"
        if dicom:
            _write_dicom(out / image_path, image, seed, study, frame)
        else:
            Image.fromarray(image).save(out / image_path, compress_level=1)
        _write_label_map(out / f"labels/{name}", label_map)
        item = {
            "image": image_path,
            "label": int(positive[index]),
            "label_map": f"labels/{name}.png",
            "study": f"study{study:04d}",
            "lesion_kinds": [int(k) for k in np.unique(label_map) if k],
            "shortcut": bool(shortcut[index]),
        }
        if lesions_per_frame is not None:
            _write_label_map(out / f"lesions/{name}", lesion_map)
            item.update(lesion_map=f"lesions/{name}.png", n_lesions=int(lesion_map.max()))
        datalist[study_split[study]].append(item)
        if progress is not None:
            progress(index + 1, n_frames)

    summary = {
        "name": "medgain synthetic capsule endoscopy",
        "generator": "medgain.synth.capsule.make_capsule_dataset",
        "seed": int(seed),
        "n_frames": int(n_frames),
        "size": int(size),
        "prevalence": float(prevalence),
        "shortcut_rate": float(shortcut_rate),
        "shortcut_splits": [s for s in SPLITS if s in shortcut_splits],
        "dicom": bool(dicom),
        "frames_per_study": int(frames_per_study),
        "split_fractions": [float(f) for f in split_fractions],
        **({} if lesions_per_frame is None else {"lesions_per_frame": list(lesions_per_frame)}),
        "lesion_kinds": LESION_KINDS,
        "splits": {
            name: {
                "frames": len(items),
                "positives": sum(item["label"] for item in items),
                "studies": len({item["study"] for item in items}),
                "shortcuts": sum(item["shortcut"] for item in items),
            }
            for name, items in datalist.items()
        },
    }
    (out / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    datalist_path = out / "datalist.json"
    datalist_path.write_text(json.dumps(datalist, indent=2) + "\n")
    return datalist_path
