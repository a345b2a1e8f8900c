"""Synthetic H&E whole-slide images: pyramidal tiled TIFFs with known tissue and tumour geometry.

Each slide is rendered strip by strip at level 0 (so that slides of 16k-100k px fit in memory) as white glass
with pink, nucleus-textured tissue islands; tumour slides add tumour regions with denser, larger and paler
nuclei on lilac cytoplasm, one large region and small metastases of a few hundred microns. Geometry is
polygonal, so the written annotations (ASAP XML as in Camelyon16, QuPath-style GeoJSON) are exactly what was
rendered. The TIFF has 256-px tiles, JPEG or deflate compression, 2x sub-resolution levels and resolution tags
in pixels per centimetre (microns per pixel = 1e4 / resolution).

``difficulty="hard"`` makes slides on which a patch classifier has something to learn: metastases from isolated
tumour cells (ITC, < 200 um) through micro- to macro-metastases (> 2 mm), with tumour appearance drawn per slide
closer to normal tissue; per-slide stain (H&E stain vectors and intensities jittered in optical density) and
scanner variation (white balance, focus blur, sensor noise, JPEG quality); tissue folds (darker bands of doubled
tissue), pen marks (ink strokes over glass and tissue, on normal slides too) and out-of-focus patches; and normal
structures that resemble tumour (dense lymphoid aggregates, some with pale, large-nucleus germinal centres) with
no annotation. Tumour pixels are still exactly the annotated polygons (inside the tissue); only the scanner's
blur spreads their colour by a few pixels.
"""

from __future__ import annotations

import csv
import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tifffile
from scipy.ndimage import gaussian_filter
from skimage.color import hed_from_rgb, rgb_from_hed
from skimage.draw import polygon as fill_polygon
from skimage.measure import points_in_poly

__all__ = [
    "LESION_CLASSES",
    "WSI_COMPRESSIONS",
    "WSI_DIFFICULTIES",
    "SlideLook",
    "SlideSpec",
    "lesion_class",
    "lesion_diameter_um",
    "make_wsi_dataset",
    "make_wsi_slide",
    "write_asap_xml",
    "write_geojson",
    "write_pyramidal_tiff",
]

WSI_COMPRESSIONS = ("jpeg", "deflate")
WSI_DIFFICULTIES = ("standard", "hard")
LESION_CLASSES = ("itc", "micro", "macro")
_ITC_MAX_UM = 200.0  # isolated tumour cells below, macro-metastases above 2 mm (longest diameter)
_MACRO_MIN_UM = 2000.0

_WHITE = np.array([242.0, 240.0, 244.0])
_STROMA = np.array([232.0, 166.0, 200.0])
_TUMOUR_CYTOPLASM = np.array([206.0, 156.0, 212.0])
_NUCLEUS = np.array([92.0, 54.0, 140.0])
_TUMOUR_NUCLEUS = np.array([120.0, 78.0, 170.0])
_LYMPH_NUCLEUS = np.array([78.0, 46.0, 128.0])
_GERMINAL_CYTOPLASM = np.array([214.0, 162.0, 210.0])
_GERMINAL_NUCLEUS = np.array([112.0, 74.0, 162.0])
_INKS = (  # pen ink transmission: green, blue, black, red
    np.array([70.0, 150.0, 100.0]),
    np.array([60.0, 90.0, 180.0]),
    np.array([55.0, 55.0, 65.0]),
    np.array([190.0, 55.0, 75.0]),
)
_POLYGON_VERTICES = 96
_BLUR_MARGIN = 16  # rows rendered above and below a strip so that blur (sigma <= 4 px) sees its neighbours


@dataclass(frozen=True)
class _Nuclei:
    """Nuclei on a jittered grid: ``cell`` px per grid cell, ``density`` = chance of a nucleus per cell,
    radii in px, ``salt`` separates the hash streams."""

    cell: int
    density: float
    radius: tuple[float, float]
    salt: int


@dataclass(frozen=True)
class SlideLook:
    """Per-slide appearance of a hard slide (stain, scanner, tissue texture and artefact strengths).

    Attributes:
        colour: (3, 3) matrix applied to optical densities (row vectors): the reference H&E-DAB decomposition,
            the slide's H and E intensities and its jittered H and E stain vectors.
        white: (3,) per-channel scanner gain (white balance and brightness).
        focus: scanner blur of the whole slide, Gaussian sigma in pixels (0: sharp).
        noise: sensor noise, standard deviation in grey levels.
        jpeg_quality: JPEG quality of the tiles (when written as JPEG).
        normal_nuclei: nuclei of normal tissue (``salt`` is set when rendering).
        tumour_nuclei: nuclei of tumour tissue.
        tumour_cytoplasm: RGB of tumour cytoplasm (between normal stroma and the standard tumour lilac).
        tumour_nucleus: RGB of tumour nuclei.
        fold_darkness: power applied to the transmission of tissue under one fold (doubled tissue: about 2).
        pen_inks: (3,) RGB transmission of each pen mark's ink.
        pen_strengths: ink density of each pen mark (power of its transmission).
        blur_sigmas: Gaussian sigma in pixels of each out-of-focus patch.
    """

    colour: np.ndarray
    white: np.ndarray
    focus: float
    noise: float
    jpeg_quality: int
    normal_nuclei: _Nuclei
    tumour_nuclei: _Nuclei
    tumour_cytoplasm: np.ndarray
    tumour_nucleus: np.ndarray
    fold_darkness: float
    pen_inks: tuple[np.ndarray, ...]
    pen_strengths: tuple[float, ...]
    blur_sigmas: tuple[float, ...]


@dataclass(frozen=True)
class SlideSpec:
    """What was rendered: polygons are (N, 2) arrays of (x, y) in level-0 pixels.

    Attributes:
        path: the TIFF written.
        size: (height, width) at level 0.
        mpp: microns per pixel at level 0 (None when written without resolution tags).
        tissue: tissue island polygons.
        tumours: tumour polygons (empty for a normal slide), each inside a tissue island.
        mimics: tumour-like normal structures (dense lymphoid aggregates), not annotated; hard slides only.
        germinal_centres: pale, large-nucleus centres inside some mimics, not annotated; hard slides only.
        folds: tissue-fold bands (darker where they cross tissue); hard slides only.
        pen_marks: ink strokes (over glass and tissue); hard slides only.
        blur_patches: out-of-focus regions; hard slides only.
        look: the per-slide appearance of a hard slide; None for a standard one.
    """

    path: Path
    size: tuple[int, int]
    mpp: float | None
    tissue: tuple[np.ndarray, ...]
    tumours: tuple[np.ndarray, ...]
    mimics: tuple[np.ndarray, ...] = ()
    germinal_centres: tuple[np.ndarray, ...] = ()
    folds: tuple[np.ndarray, ...] = ()
    pen_marks: tuple[np.ndarray, ...] = ()
    blur_patches: tuple[np.ndarray, ...] = ()
    look: SlideLook | None = None

    @property
    def difficulty(self) -> str:
        """``"hard"`` or ``"standard"``."""
        return "standard" if self.look is None else "hard"

    @property
    def label(self) -> int:
        """1 for a tumour slide, 0 for a normal one."""
        return int(bool(self.tumours))


def _hash_uniform(iy: np.ndarray, ix: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic uniform [0, 1) numbers per integer grid cell (splitmix-style 64-bit mixing)."""
    h = iy.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h ^= ix.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
    h ^= np.uint64(salt & 0xFFFFFFFFFFFFFFFF)
    for mult in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        h ^= h >> np.uint64(33)
        h *= np.uint64(mult)
    h ^= h >> np.uint64(33)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _nuclei_alpha(y0: int, height: int, width: int, nuclei: _Nuclei) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (height, width) in [0, 1] of the nuclei over rows ``y0 .. y0 + height`` and a per-pixel
    darkness factor, from the nuclei of each pixel's own grid cell."""
    c = nuclei.cell
    rows = np.arange(y0, y0 + height)
    cols = np.arange(width)
    cy = rows // c
    cx = cols // c
    gy, gx = np.meshgrid(np.arange(cy[0], cy[-1] + 1), np.arange(cx[0], cx[-1] + 1), indexing="ij")
    u = [_hash_uniform(gy, gx, nuclei.salt * 8 + k) for k in range(5)]
    radius = nuclei.radius[0] + u[3] * (nuclei.radius[1] - nuclei.radius[0])
    present = u[0] < nuclei.density
    free = np.maximum(c - 2 * radius, 0.0)
    centre_y = gy * c + radius + u[1] * free
    centre_x = gx * c + radius + u[2] * free
    ry = cy - cy[0]
    rx = cx - cx[0]
    dy = rows[:, None] - centre_y[ry][:, rx]
    dx = cols[None, :] - centre_x[ry][:, rx]
    r = radius[ry][:, rx]
    alpha = np.clip(r - np.sqrt(dy * dy + dx * dx) + 0.5, 0.0, 1.0) * present[ry][:, rx]
    return alpha, 0.75 + 0.5 * u[4][ry][:, rx]


def _wobbly_polygon(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float, wobble: float) -> np.ndarray:
    """A rotated ellipse with a smooth random border (radius within ``1 +- wobble``), (N, 2) (x, y)."""
    theta = np.linspace(0.0, 2.0 * math.pi, _POLYGON_VERTICES, endpoint=False)
    harmonics = np.arange(2, 6)
    amps = rng.uniform(0.0, 1.0, harmonics.size)
    amps *= wobble / max(amps.sum(), 1e-9)
    phases = rng.uniform(0.0, 2.0 * math.pi, harmonics.size)
    scale = 1.0 + (amps[:, None] * np.cos(harmonics[:, None] * theta[None, :] + phases[:, None])).sum(0)
    angle = rng.uniform(0.0, math.pi)
    x = rx * scale * np.cos(theta)
    y = ry * scale * np.sin(theta)
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack([cx + ca * x - sa * y, cy + sa * x + ca * y], axis=1)


def _plan_islands(rng: np.random.Generator, size: int) -> tuple[list[np.ndarray], list[tuple[float, float, float]]]:
    """Tissue island polygons and, per island, (cx, cy, radius) of a disc inside it."""
    n_islands = int(rng.integers(1, 4))
    tissue, inner = [], []
    for k in range(n_islands):
        # islands spread along a random axis so that they rarely overlap much
        t = (k + 0.5) / n_islands
        r_main = size * rng.uniform(0.28, 0.36) / math.sqrt(n_islands)
        rx, ry = r_main * rng.uniform(0.8, 1.2), r_main * rng.uniform(0.8, 1.2)
        cx = size * (0.2 + 0.6 * t) + rng.uniform(-0.05, 0.05) * size
        cy = size * rng.uniform(0.35, 0.65)
        if rng.random() < 0.5:
            cx, cy = cy, cx
        tissue.append(_wobbly_polygon(rng, cx, cy, rx, ry, 0.08))
        inner.append((cx, cy, min(rx, ry) * 0.92))
    return tissue, inner


def _plan_slide(
    rng: np.random.Generator, size: int, mpp: float, tumour: bool
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Tissue islands and (on tumour slides) tumour polygons that lie inside them."""
    tissue, inner = _plan_islands(rng, size)
    n_islands = len(tissue)
    tumours: list[np.ndarray] = []
    if tumour:
        cx, cy, r_in = inner[int(rng.integers(n_islands))]
        radius = r_in * rng.uniform(0.3, 0.45)
        off = r_in * 0.4 * rng.uniform(0.0, 1.0)
        phi = rng.uniform(0.0, 2.0 * math.pi)
        tumours.append(
            _wobbly_polygon(
                rng, cx + off * math.cos(phi), cy + off * math.sin(phi), radius, radius * rng.uniform(0.7, 1.0), 0.12
            )
        )
        for _ in range(int(rng.integers(1, 3))):
            cx, cy, r_in = inner[int(rng.integers(n_islands))]
            diameter_px = math.exp(rng.uniform(math.log(150.0), math.log(600.0))) / mpp
            radius = min(diameter_px / 2.0, r_in * 0.3)
            off = r_in * 0.55 * rng.uniform(0.0, 1.0)
            phi = rng.uniform(0.0, 2.0 * math.pi)
            tumours.append(
                _wobbly_polygon(
                    rng,
                    cx + off * math.cos(phi),
                    cy + off * math.sin(phi),
                    radius,
                    radius * rng.uniform(0.75, 1.0),
                    0.1,
                )
            )
    return tuple(tissue), tuple(tumours)


def lesion_diameter_um(polygon: np.ndarray, mpp: float) -> float:
    """Longest diameter (largest distance between two vertices) of a polygon in microns.

    Args:
        polygon: (N, 2) vertices (x, y) in level-0 pixels.
        mpp: microns per pixel at level 0.
    """
    diff = polygon[:, None, :] - polygon[None, :, :]
    return float(np.sqrt((diff**2).sum(-1)).max() * mpp)


def lesion_class(diameter_um: float) -> str:
    """``"itc"`` below 200 um, ``"macro"`` above 2 mm, else ``"micro"`` (longest diameter)."""
    if diameter_um < _ITC_MAX_UM:
        return "itc"
    return "macro" if diameter_um > _MACRO_MIN_UM else "micro"


def _place_blob(
    rng: np.random.Generator,
    island: np.ndarray,
    inner: tuple[float, float, float],
    diameter_px: float,
    wobble: float,
) -> np.ndarray:
    """A wobbly blob of longest diameter ``diameter_px`` whose vertices all lie inside ``island``, placed at
    random within the island's inner disc (shrunk by 10 % per failed try)."""
    cx, cy, r_in = inner
    while True:
        for _ in range(16):
            unit = _wobbly_polygon(rng, 0.0, 0.0, 1.0, rng.uniform(0.7, 1.0), wobble)
            unit *= diameter_px / lesion_diameter_um(unit, 1.0)
            reach = float(np.sqrt((unit**2).sum(1)).max())
            off = max(r_in - reach, 0.0) * math.sqrt(rng.uniform(0.0, 1.0))
            phi = rng.uniform(0.0, 2.0 * math.pi)
            poly = unit + np.array([cx + off * math.cos(phi), cy + off * math.sin(phi)])
            if points_in_poly(poly, island).all():
                return poly
        diameter_px *= 0.9


def _stroke(
    rng: np.random.Generator, start: np.ndarray, length: float, width: float, amplitude: float
) -> np.ndarray:
    """Polygon of a gently waving band: ``length`` along a random direction from ``start``, ``width`` across."""
    angle = rng.uniform(0.0, 2.0 * math.pi)
    along = np.array([math.cos(angle), math.sin(angle)])
    across = np.array([-along[1], along[0]])
    t = np.linspace(0.0, 1.0, 48)
    wave = amplitude * np.sin(2.0 * math.pi * rng.uniform(0.5, 1.5) * t + rng.uniform(0.0, 2.0 * math.pi))
    centre = start[None, :] + t[:, None] * length * along[None, :] + wave[:, None] * across[None, :]
    tangent = np.gradient(centre, axis=0)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    half = width / 2.0 * (1.0 + 0.15 * np.sin(2.0 * math.pi * t + rng.uniform(0.0, 2.0 * math.pi)))[:, None]
    return np.concatenate([centre + half * normal, (centre - half * normal)[::-1]])


def _plan_look(rng: np.random.Generator, n_pens: int, n_blurs: int) -> SlideLook:
    """Draw the stain, scanner and texture parameters of a hard slide."""
    stains = rgb_from_hed.copy()
    stains[:2] = np.clip(stains[:2] + rng.normal(0.0, 0.09, (2, 3)), 0.02, None)
    stains[:2] /= np.linalg.norm(stains[:2], axis=1, keepdims=True)
    intensity = np.array([rng.uniform(0.65, 1.4), rng.uniform(0.65, 1.4), 1.0])
    t_cyto, t_nucleus = rng.uniform(0.35, 1.0), rng.uniform(0.3, 1.0)
    return SlideLook(
        colour=hed_from_rgb @ np.diag(intensity) @ stains,
        white=rng.uniform(0.94, 1.03, 3),
        focus=float(rng.uniform(0.4, 1.3)) if rng.random() < 0.7 else 0.0,
        noise=float(rng.uniform(1.5, 7.0)),
        jpeg_quality=int(rng.integers(55, 96)),
        normal_nuclei=_Nuclei(22, float(rng.uniform(0.3, 0.5)), (3.0, 5.0), 0),
        tumour_nuclei=_Nuclei(
            int(rng.integers(16, 23)), float(rng.uniform(0.55, 0.9)), (4.5, float(rng.uniform(6.0, 8.0))), 0
        ),
        tumour_cytoplasm=_STROMA + t_cyto * (_TUMOUR_CYTOPLASM - _STROMA),
        tumour_nucleus=_NUCLEUS + t_nucleus * (_TUMOUR_NUCLEUS - _NUCLEUS),
        fold_darkness=float(rng.uniform(1.6, 2.3)),
        pen_inks=tuple(_INKS[int(rng.integers(len(_INKS)))] for _ in range(n_pens)),
        pen_strengths=tuple(float(rng.uniform(0.5, 0.9)) for _ in range(n_pens)),
        blur_sigmas=tuple(float(rng.uniform(1.5, 4.0)) for _ in range(n_blurs)),
    )


def _plan_hard(rng: np.random.Generator, size: int, mpp: float, tumour: bool) -> dict:
    """Geometry and look of a hard slide, as keyword arguments of :class:`SlideSpec` (without path, size, mpp).

    A tumour slide has 1-3 metastases; the first is an ITC, micro- or macro-metastasis (macro only where an
    island is large enough), the others ITC or micro. Every slide gets 2-6 lymphoid mimics (half with a
    germinal centre), and, each with probability one half, 1-2 folds, 1-3 pen marks and 1-2 blur patches.
    """
    tissue, inner = _plan_islands(rng, size)
    n_islands = len(tissue)
    tumours: list[np.ndarray] = []
    if tumour:
        largest = int(np.argmax([r for _, _, r in inner]))
        room_um = 2.0 * 0.95 * inner[largest][2] * mpp
        for k in range(int(rng.integers(1, 4))):
            if k == 0:
                kind = LESION_CLASSES[int(rng.choice(3, p=[0.3, 0.35, 0.35]))]
            else:
                kind = ("itc", "micro")[int(rng.integers(2))]
            if kind == "macro" and room_um > 1.1 * _MACRO_MIN_UM:
                island = largest
                diameter_um = rng.uniform(1.05 * _MACRO_MIN_UM, min(room_um, 3.0 * _MACRO_MIN_UM))
            else:
                island = int(rng.integers(n_islands))
                room = 2.0 * 0.85 * inner[island][2] * mpp
                low, high = (40.0, 0.9 * _ITC_MAX_UM) if kind == "itc" else (1.2 * _ITC_MAX_UM, 0.9 * _MACRO_MIN_UM)
                high = max(min(high, room * 0.5), 1.01 * low)  # a small island takes a smaller metastasis
                diameter_um = math.exp(rng.uniform(math.log(low), math.log(high)))
            tumours.append(_place_blob(rng, tissue[island], inner[island], diameter_um / mpp, 0.12))
    mimics, germinal = [], []
    for _ in range(int(rng.integers(2, 7))):
        island = int(rng.integers(n_islands))
        diameter_px = min(math.exp(rng.uniform(math.log(150.0), math.log(900.0))) / mpp, inner[island][2] * 0.6)
        blob = _place_blob(rng, tissue[island], inner[island], diameter_px, 0.1)
        mimics.append(blob)
        if rng.random() < 0.5:
            centre = blob.mean(axis=0)
            germinal.append(centre + (blob - centre) * rng.uniform(0.45, 0.7))
    folds, pens, blurs = [], [], []
    if rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 3))):
            cx, cy, r_in = inner[int(rng.integers(n_islands))]
            width = r_in * rng.uniform(0.05, 0.15)
            start = np.array([cx, cy]) + rng.uniform(-0.3, 0.3, 2) * r_in
            band = _stroke(rng, start, 1.3 * r_in, width, 0.3 * width)
            folds.append(band - (band.mean(axis=0) - start))  # centred on ``start``, across the island
    n_pens = int(rng.integers(1, 4)) if rng.random() < 0.5 else 0
    for _ in range(n_pens):
        cx, cy, r_in = inner[int(rng.integers(n_islands))]
        phi = rng.uniform(0.0, 2.0 * math.pi)
        start = np.array([cx, cy]) + rng.uniform(0.6, 1.3) * r_in * np.array([math.cos(phi), math.sin(phi)])
        pens.append(_stroke(rng, start, size * rng.uniform(0.1, 0.35), size * rng.uniform(0.006, 0.016), size * 0.02))
    n_blurs = int(rng.integers(1, 3)) if rng.random() < 0.5 else 0
    for _ in range(n_blurs):
        island = int(rng.integers(n_islands))
        cx, cy, r_in = inner[island]
        phi, off = rng.uniform(0.0, 2.0 * math.pi), r_in * rng.uniform(0.0, 0.8)
        radius = r_in * rng.uniform(0.15, 0.4)
        blurs.append(
            _wobbly_polygon(rng, cx + off * math.cos(phi), cy + off * math.sin(phi), radius, radius * 0.8, 0.1)
        )
    return {
        "tissue": tuple(tissue),
        "tumours": tuple(tumours),
        "mimics": tuple(mimics),
        "germinal_centres": tuple(germinal),
        "folds": tuple(folds),
        "pen_marks": tuple(pens),
        "blur_patches": tuple(blurs),
        "look": _plan_look(rng, n_pens, n_blurs),
    }


def _polygon_rows(polygons: Sequence[np.ndarray], y0: int, height: int, width: int) -> np.ndarray:
    """Boolean (height, width) raster of the union of ``polygons`` over rows ``y0 .. y0 + height``.

    Pixel (r, c) is inside when its centre (c + 0.5, r + 0.5) is.
    """
    out = np.zeros((height, width), dtype=bool)
    for poly in polygons:
        if poly[:, 1].max() < y0 or poly[:, 1].min() > y0 + height:
            continue
        rr, cc = fill_polygon(poly[:, 1] - y0 - 0.5, poly[:, 0] - 0.5, shape=(height, width))
        out[rr, cc] = True
    return out


def _shade(y0: int, height: int, width: int, size: tuple[int, int], noise: np.ndarray) -> np.ndarray:
    """Slow colour variation (height, width) in [-1, 1]: bilinear look-up in a coarse noise grid covering the
    slide."""
    gy = (np.arange(y0, y0 + height) + 0.5) / size[0] * (noise.shape[0] - 1)
    gx = (np.arange(width) + 0.5) / size[1] * (noise.shape[1] - 1)
    iy, ix = np.minimum(gy.astype(int), noise.shape[0] - 2), np.minimum(gx.astype(int), noise.shape[1] - 2)
    fy, fx = (gy - iy)[:, None], (gx - ix)[None, :]
    return (
        noise[iy][:, ix] * (1 - fy) * (1 - fx)
        + noise[iy + 1][:, ix] * fy * (1 - fx)
        + noise[iy][:, ix + 1] * (1 - fy) * fx
        + noise[iy + 1][:, ix + 1] * fy * fx
    )


def _render_hard_strip(
    y0: int, height: int, width: int, spec: SlideSpec, look: SlideLook, seed: int, index: int, noise: np.ndarray
) -> np.ndarray:
    """RGB uint8 rows ``y0 .. y0 + height`` of a hard slide of appearance ``look``.

    Rows are rendered with a margin above and below, so that blur near a strip's edge sees the neighbouring
    rows: tissue (normal, lymphoid mimics and their germinal centres, tumour over both) → folds → stain →
    pen ink → out-of-focus patches and scanner focus → white balance → sensor noise.
    """
    top = max(y0 - _BLUR_MARGIN, 0)
    bottom = min(y0 + height + _BLUR_MARGIN, spec.size[0])
    rows = bottom - top
    salt = (seed * 1_000_003 + index) * 8
    tissue = _polygon_rows(spec.tissue, top, rows, width)
    img = np.broadcast_to(_WHITE, (rows, width, 3)).copy()
    if tissue.any():
        tumour = _polygon_rows(spec.tumours, top, rows, width) & tissue
        lymphoid = _polygon_rows(spec.mimics, top, rows, width) & tissue & ~tumour
        germinal = _polygon_rows(spec.germinal_centres, top, rows, width) & lymphoid
        shade = _shade(top, rows, width, spec.size, noise)[..., None]
        stroma = _STROMA * (0.93 + 0.1 * shade)
        stroma = np.where(germinal[..., None], _GERMINAL_CYTOPLASM * (0.95 + 0.08 * shade), stroma)
        stroma = np.where(tumour[..., None], look.tumour_cytoplasm * (0.95 + 0.08 * shade), stroma)
        alpha, dark = _nuclei_alpha(top, rows, width, replace(look.normal_nuclei, salt=salt + 1))
        colour = np.broadcast_to(_NUCLEUS, (rows, width, 3))
        layers = (
            (lymphoid, _Nuclei(10, 0.85, (2.5, 3.8), salt + 3), _LYMPH_NUCLEUS),
            (germinal, _Nuclei(16, 0.8, (4.0, 6.5), salt + 4), _GERMINAL_NUCLEUS),
            (tumour, replace(look.tumour_nuclei, salt=salt + 2), look.tumour_nucleus),
        )
        for region, nuclei, rgb in layers:
            if region.any():
                layer_alpha, layer_dark = _nuclei_alpha(top, rows, width, nuclei)
                alpha = np.where(region, layer_alpha, alpha)
                dark = np.where(region, layer_dark, dark)
                colour = np.where(region[..., None], rgb, colour)
        tissue_rgb = stroma * (1 - alpha[..., None]) + colour * dark[..., None] * alpha[..., None]
        if spec.folds:
            layers_folded = sum(_polygon_rows([band], top, rows, width).astype(np.float64) for band in spec.folds)
            power = look.fold_darkness ** layers_folded[..., None]
            tissue_rgb = 255.0 * (tissue_rgb / 255.0) ** power
        img = np.where(tissue[..., None], tissue_rgb, img)
    optical_density = -np.log(np.maximum(img, 1.0) / 255.0)
    img = 255.0 * np.exp(-(optical_density @ look.colour))
    for stroke, ink, strength in zip(spec.pen_marks, look.pen_inks, look.pen_strengths):
        inked = _polygon_rows([stroke], top, rows, width)
        if inked.any():
            img[inked] *= (ink / 255.0) ** strength
    for patch, sigma in zip(spec.blur_patches, look.blur_sigmas):
        blurred_region = _polygon_rows([patch], top, rows, width)
        if blurred_region.any():
            img = np.where(blurred_region[..., None], gaussian_filter(img, (sigma, sigma, 0)), img)
    if look.focus > 0:
        img = gaussian_filter(img, (look.focus, look.focus, 0))
    img = img[y0 - top : y0 - top + height] * look.white
    rng = np.random.default_rng([seed, index, y0])
    img += rng.normal(0.0, look.noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _render_strip(
    y0: int, height: int, width: int, spec: SlideSpec, seed: int, index: int, noise: np.ndarray
) -> np.ndarray:
    """RGB uint8 rows ``y0 .. y0 + height`` of a slide."""
    if spec.look is not None:
        return _render_hard_strip(y0, height, width, spec, spec.look, seed, index, noise)
    salt = (seed * 1_000_003 + index) * 4
    tissue = _polygon_rows(spec.tissue, y0, height, width)
    tumour = _polygon_rows(spec.tumours, y0, height, width) & tissue
    img = np.broadcast_to(_WHITE, (height, width, 3)).copy()
    if tissue.any():
        shade = _shade(y0, height, width, spec.size, noise)
        stroma = _STROMA[None, None, :] * (0.93 + 0.1 * shade[..., None])
        stroma = np.where(
            tumour[..., None], _TUMOUR_CYTOPLASM[None, None, :] * (0.95 + 0.08 * shade[..., None]), stroma
        )
        normal_alpha, normal_dark = _nuclei_alpha(y0, height, width, _Nuclei(22, 0.35, (3.0, 5.0), salt + 1))
        alpha, dark = normal_alpha, normal_dark
        if tumour.any():
            tumour_alpha, tumour_dark = _nuclei_alpha(y0, height, width, _Nuclei(18, 0.9, (5.5, 8.0), salt + 2))
            alpha = np.where(tumour, tumour_alpha, normal_alpha)
            dark = np.where(tumour, tumour_dark, normal_dark)
        nucleus = np.where(tumour[..., None], _TUMOUR_NUCLEUS, _NUCLEUS) * dark[..., None]
        tissue_rgb = stroma * (1 - alpha[..., None]) + nucleus * alpha[..., None]
        img = np.where(tissue[..., None], tissue_rgb, img)
    rng = np.random.default_rng([seed, index, y0])
    img += rng.normal(0.0, 3.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_pyramidal_tiff(
    path: str | os.PathLike,
    strips: Iterator[np.ndarray],
    shape: tuple[int, int],
    mpp: float | None,
    *,
    tile: int = 256,
    compression: str = "jpeg",
    min_level_size: int = 512,
    jpeg_quality: int = 90,
) -> Path:
    """Write an RGB pyramidal tiled TIFF from level-0 row strips.

    Level 0 is written tile by tile while it is produced; each further level halves the previous one (2x2
    mean) until its longer side is at most ``min_level_size``. Levels are consecutive pages (reduced-resolution
    sub-file type), as read by tifffile, OpenSlide and MONAI's ``WSIReader``.

    Args:
        path: output file.
        strips: (tile, width, 3) uint8 row strips from the top (the last one may be shorter).
        shape: (height, width) at level 0.
        mpp: microns per pixel at level 0, written as X/Y resolution in pixels per centimetre; None writes no
            resolution tags.
        tile: tile side in pixels (a multiple of 16).
        compression: "jpeg" (quality 90) or "deflate".
        min_level_size: stop adding levels once the longer side is at most this.
        jpeg_quality: JPEG quality (1-100) with ``compression="jpeg"``.
    """
    if compression not in WSI_COMPRESSIONS:
        raise ValueError(f"compression must be one of {WSI_COMPRESSIONS}, got {compression!r}")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    height, width = shape
    half = np.zeros(((height + 1) // 2, (width + 1) // 2, 3), dtype=np.uint8)

    def tiles() -> Iterator[np.ndarray]:
        y = 0
        for strip in strips:
            if strip.shape[1:] != (width, 3):
                raise ValueError(f"strip of shape {strip.shape} does not match width {width}")
            padded = np.pad(strip, ((0, (-strip.shape[0]) % 2), (0, width % 2), (0, 0)), mode="edge")
            small = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2, 3).mean(axis=(1, 3))
            half[y // 2 : y // 2 + small.shape[0]] = np.rint(small).astype(np.uint8)
            for x in range(0, width, tile):
                block = strip[:, x : x + tile]
                if block.shape[:2] != (tile, tile):
                    block = np.pad(block, ((0, tile - block.shape[0]), (0, tile - block.shape[1]), (0, 0)))
                yield block
            y += strip.shape[0]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options: dict = {
        "tile": (tile, tile),
        "photometric": "rgb",
        "compression": compression,
        "compressionargs": {"level": jpeg_quality} if compression == "jpeg" else {"level": 6},
    }
    level_mpp = mpp
    with tifffile.TiffWriter(path, bigtiff=height * width * 3 > 2**31) as writer:

        def write(data: np.ndarray | Iterator[np.ndarray], level_shape: tuple[int, int], level: int) -> None:
            res = (
                {}
                if level_mpp is None
                else {"resolution": (1e4 / level_mpp, 1e4 / level_mpp), "resolutionunit": "CENTIMETER"}
            )
            if isinstance(data, np.ndarray):
                writer.write(data, subfiletype=1 if level else 0, **res, **options)
            else:
                writer.write(data, shape=(*level_shape, 3), dtype=np.uint8, subfiletype=0, **res, **options)

        write(tiles(), (height, width), 0)
        level, current = 1, half
        while True:
            if level_mpp is not None:
                level_mpp *= 2.0
            write(current, current.shape[:2], level)
            if max(current.shape[:2]) <= min_level_size:
                break
            h, w = current.shape[:2]
            padded = np.pad(current, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            current = np.rint(
                padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2, 3).mean(axis=(1, 3))
            ).astype(np.uint8)
            level += 1
    return path


def make_wsi_slide(
    path: str | os.PathLike,
    *,
    seed: int,
    index: int = 0,
    size: int = 4096,
    tumour: bool = True,
    mpp: float | None = 0.5,
    compression: str = "jpeg",
    difficulty: str = "standard",
) -> SlideSpec:
    """Render and write one synthetic slide (see the module docstring).

    Args:
        path: the TIFF to write.
        seed: random seed; together with ``index`` it fixes the slide.
        index: slide number within a data set.
        size: level-0 height and width in pixels (at least 512).
        tumour: add tumour regions (standard: one large region and one or two small metastases; hard: one to
            three metastases from ITC to macro size).
        mpp: microns per pixel at level 0 (sizes of small metastases are set in microns); None writes no
            resolution tags (geometry then assumes 0.5).
        compression: "jpeg" or "deflate".
        difficulty: "standard" or "hard" (see the module docstring).

    Returns:
        the rendered geometry.

    Raises:
        ValueError: for a size under 512, a non-positive mpp, or an unknown compression or difficulty.
    """
    if size < 512:
        raise ValueError(f"size must be at least 512 px, got {size}")
    if mpp is not None and not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if difficulty not in WSI_DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {WSI_DIFFICULTIES}, got {difficulty!r}")
    rng = np.random.default_rng([seed, index])
    if difficulty == "hard":
        spec = SlideSpec(Path(path), (size, size), mpp, **_plan_hard(rng, size, mpp or 0.5, tumour))
    else:
        tissue, tumours = _plan_slide(rng, size, mpp or 0.5, tumour)
        spec = SlideSpec(Path(path), (size, size), mpp, tissue, tumours)
    noise = rng.uniform(-1.0, 1.0, (24, 24))
    tile = 256

    def strips() -> Iterator[np.ndarray]:
        for y0 in range(0, size, tile):
            yield _render_strip(y0, min(tile, size - y0), size, spec, seed, index, noise)

    quality = 90 if spec.look is None else spec.look.jpeg_quality
    write_pyramidal_tiff(
        path, strips(), (size, size), mpp, tile=tile, compression=compression, jpeg_quality=quality
    )
    return spec


def write_asap_xml(path: str | os.PathLike, polygons: Sequence[np.ndarray], group: str = "Tumor") -> Path:
    """Write polygons ((N, 2) x, y level-0 pixels) as an ASAP annotation file (Camelyon16 layout)."""
    root = ET.Element("ASAP_Annotations")
    annotations = ET.SubElement(root, "Annotations")
    for i, poly in enumerate(polygons):
        ann = ET.SubElement(
            annotations,
            "Annotation",
            {"Name": f"Annotation {i}", "Type": "Polygon", "PartOfGroup": group, "Color": "#F4FA58"},
        )
        coords = ET.SubElement(ann, "Coordinates")
        for order, (x, y) in enumerate(poly):
            ET.SubElement(coords, "Coordinate", {"Order": str(order), "X": f"{x:.3f}", "Y": f"{y:.3f}"})
    groups = ET.SubElement(root, "AnnotationGroups")
    group_el = ET.SubElement(groups, "Group", {"Name": group, "PartOfGroup": "None", "Color": "#64FE2E"})
    ET.SubElement(group_el, "Attributes")
    ET.indent(root)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path


def write_geojson(path: str | os.PathLike, polygons: Sequence[np.ndarray], classification: str = "Tumor") -> Path:
    """Write polygons ((N, 2) x, y level-0 pixels) as a QuPath-style GeoJSON FeatureCollection."""
    features = []
    for poly in polygons:
        ring = [[round(float(x), 3), round(float(y), 3)] for x, y in poly]
        ring.append(ring[0])
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "annotation", "classification": {"name": classification}},
            }
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def make_wsi_dataset(
    out: str | os.PathLike,
    n_slides: int,
    *,
    seed: int,
    size: int = 16384,
    tumour_rate: float = 0.5,
    mpp: float = 0.5,
    compression: str = "jpeg",
    difficulty: str = "standard",
) -> Path:
    """Write ``n_slides`` synthetic slides, their annotations and a slide-label CSV into ``out``.

    Layout: ``images/slide_NNN.tif``; for tumour slides ``annotations/slide_NNN.xml`` (ASAP) and
    ``annotations/slide_NNN.geojson``; ``labels.csv`` with columns slide, label (1 = tumour), image,
    annotation_xml, annotation_geojson (paths relative to ``out``; empty for normal slides); ``lesions.csv`` with
    one row per annotated lesion: slide, lesion (its index in the annotation files), diameter_um (longest
    diameter), class (itc, micro or macro).

    Args:
        out: output directory.
        n_slides: number of slides (at least 1).
        seed: random seed.
        size: level-0 side of every slide in pixels (at least 512).
        tumour_rate: fraction of tumour slides; round(n_slides * tumour_rate) slides, chosen at random.
        mpp: microns per pixel at level 0.
        compression: "jpeg" or "deflate".
        difficulty: "standard" or "hard" (see the module docstring).

    Returns:
        the path of ``labels.csv``.
    """
    if n_slides < 1:
        raise ValueError(f"n_slides must be at least 1, got {n_slides}")
    if not 0.0 <= tumour_rate <= 1.0:
        raise ValueError(f"tumour_rate must be in [0, 1], got {tumour_rate}")
    if compression not in WSI_COMPRESSIONS:
        raise ValueError(f"compression must be one of {WSI_COMPRESSIONS}, got {compression!r}")
    if difficulty not in WSI_DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {WSI_DIFFICULTIES}, got {difficulty!r}")
    out = Path(out)
    n_tumour = int(round(n_slides * tumour_rate))
    order = np.random.default_rng([seed, 0x57A1]).permutation(n_slides)
    is_tumour = np.zeros(n_slides, dtype=bool)
    is_tumour[order[:n_tumour]] = True
    rows, lesions = [], []
    for i in range(n_slides):
        name = f"slide_{i:03d}"
        image = Path("images") / f"{name}.tif"
        spec = make_wsi_slide(
            out / image,
            seed=seed,
            index=i,
            size=size,
            tumour=bool(is_tumour[i]),
            mpp=mpp,
            compression=compression,
            difficulty=difficulty,
        )
        for k, poly in enumerate(spec.tumours):
            diameter = lesion_diameter_um(poly, mpp)
            lesions.append(
                {"slide": name, "lesion": k, "diameter_um": f"{diameter:.1f}", "class": lesion_class(diameter)}
            )
        xml = geojson = ""
        if spec.tumours:
            xml = str(Path("annotations") / f"{name}.xml")
            geojson = str(Path("annotations") / f"{name}.geojson")
            write_asap_xml(out / xml, spec.tumours)
            write_geojson(out / geojson, spec.tumours)
        rows.append(
            {
                "slide": name,
                "label": spec.label,
                "image": str(image),
                "annotation_xml": xml,
                "annotation_geojson": geojson,
            }
        )
    _write_csv(out / "lesions.csv", ["slide", "lesion", "diameter_um", "class"], lesions)
    return _write_csv(out / "labels.csv", list(rows[0]), rows)


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> Path:
    """Write a CSV atomically (temporary file in the same folder, then rename)."""
    tmp = path.with_name(f".{path.name}.partial")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path
