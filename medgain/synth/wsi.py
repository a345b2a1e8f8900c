"""Synthetic H&E whole-slide images: pyramidal tiled TIFFs with known tissue and tumour geometry.

Each slide is rendered strip by strip at level 0 (so that slides of 16k-100k px fit in memory) as white glass
with pink, nucleus-textured tissue islands; tumour slides add tumour regions with denser, larger and paler
nuclei on lilac cytoplasm, one large region and small metastases of a few hundred microns. Geometry is
polygonal, so the written annotations (ASAP XML as in Camelyon16, QuPath-style GeoJSON) are exactly what was
rendered. The TIFF has 256-px tiles, JPEG or deflate compression, 2x sub-resolution levels and resolution tags
in pixels per centimetre (microns per pixel = 1e4 / resolution).
"""

from __future__ import annotations

import csv
import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from skimage.draw import polygon as fill_polygon

__all__ = [
    "WSI_COMPRESSIONS",
    "SlideSpec",
    "make_wsi_dataset",
    "make_wsi_slide",
    "write_asap_xml",
    "write_geojson",
    "write_pyramidal_tiff",
]

WSI_COMPRESSIONS = ("jpeg", "deflate")

_WHITE = np.array([242.0, 240.0, 244.0])
_STROMA = np.array([232.0, 166.0, 200.0])
_TUMOUR_CYTOPLASM = np.array([206.0, 156.0, 212.0])
_NUCLEUS = np.array([92.0, 54.0, 140.0])
_TUMOUR_NUCLEUS = np.array([120.0, 78.0, 170.0])
_POLYGON_VERTICES = 96


@dataclass(frozen=True)
class _Nuclei:
    """Nuclei on a jittered grid: ``cell`` px per grid cell, ``density`` = chance of a nucleus per cell,
    radii in px, ``salt`` separates the hash streams."""

    cell: int
    density: float
    radius: tuple[float, float]
    salt: int


@dataclass(frozen=True)
class SlideSpec:
    """What was rendered: polygons are (N, 2) arrays of (x, y) in level-0 pixels.

    Attributes:
        path: the TIFF written.
        size: (height, width) at level 0.
        mpp: microns per pixel at level 0 (None when written without resolution tags).
        tissue: tissue island polygons.
        tumours: tumour polygons (empty for a normal slide), each inside a tissue island.
    """

    path: Path
    size: tuple[int, int]
    mpp: float | None
    tissue: tuple[np.ndarray, ...]
    tumours: tuple[np.ndarray, ...]

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


def _plan_slide(
    rng: np.random.Generator, size: int, mpp: float, tumour: bool
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Tissue islands and (on tumour slides) tumour polygons that lie inside them."""
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


def _render_strip(
    y0: int, height: int, width: int, spec: SlideSpec, seed: int, index: int, noise: np.ndarray
) -> np.ndarray:
    """RGB uint8 rows ``y0 .. y0 + height`` of a slide."""
    salt = (seed * 1_000_003 + index) * 4
    tissue = _polygon_rows(spec.tissue, y0, height, width)
    tumour = _polygon_rows(spec.tumours, y0, height, width) & tissue
    img = np.broadcast_to(_WHITE, (height, width, 3)).copy()
    if tissue.any():
        # slow colour variation: bilinear look-up in a coarse noise grid covering the slide
        gy = (np.arange(y0, y0 + height) + 0.5) / spec.size[0] * (noise.shape[0] - 1)
        gx = (np.arange(width) + 0.5) / spec.size[1] * (noise.shape[1] - 1)
        iy, ix = np.minimum(gy.astype(int), noise.shape[0] - 2), np.minimum(gx.astype(int), noise.shape[1] - 2)
        fy, fx = (gy - iy)[:, None], (gx - ix)[None, :]
        shade = (
            noise[iy][:, ix] * (1 - fy) * (1 - fx)
            + noise[iy + 1][:, ix] * fy * (1 - fx)
            + noise[iy][:, ix + 1] * (1 - fy) * fx
            + noise[iy + 1][:, ix + 1] * fy * fx
        )
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
    """
    if compression not in WSI_COMPRESSIONS:
        raise ValueError(f"compression must be one of {WSI_COMPRESSIONS}, got {compression!r}")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
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
        "compressionargs": {"level": 90} if compression == "jpeg" else {"level": 6},
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
) -> SlideSpec:
    """Render and write one synthetic slide (see the module docstring).

    Args:
        path: the TIFF to write.
        seed: random seed; together with ``index`` it fixes the slide.
        index: slide number within a data set.
        size: level-0 height and width in pixels (at least 512).
        tumour: add tumour regions (one large, one or two small metastases).
        mpp: microns per pixel at level 0 (sizes of small metastases are set in microns); None writes no
            resolution tags (geometry then assumes 0.5).
        compression: "jpeg" or "deflate".

    Returns:
        the rendered geometry.
    """
    if size < 512:
        raise ValueError(f"size must be at least 512 px, got {size}")
    if mpp is not None and not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    rng = np.random.default_rng([seed, index])
    tissue, tumours = _plan_slide(rng, size, mpp or 0.5, tumour)
    spec = SlideSpec(Path(path), (size, size), mpp, tissue, tumours)
    noise = rng.uniform(-1.0, 1.0, (24, 24))
    tile = 256

    def strips() -> Iterator[np.ndarray]:
        for y0 in range(0, size, tile):
            yield _render_strip(y0, min(tile, size - y0), size, spec, seed, index, noise)

    write_pyramidal_tiff(path, strips(), (size, size), mpp, tile=tile, compression=compression)
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
) -> Path:
    """Write ``n_slides`` synthetic slides, their annotations and a slide-label CSV into ``out``.

    Layout: ``images/slide_NNN.tif``; for tumour slides ``annotations/slide_NNN.xml`` (ASAP) and
    ``annotations/slide_NNN.geojson``; ``labels.csv`` with columns slide, label (1 = tumour), image,
    annotation_xml, annotation_geojson (paths relative to ``out``; empty for normal slides).

    Args:
        out: output directory.
        n_slides: number of slides (at least 1).
        seed: random seed.
        size: level-0 side of every slide in pixels (at least 512).
        tumour_rate: fraction of tumour slides; round(n_slides * tumour_rate) slides, chosen at random.
        mpp: microns per pixel at level 0.
        compression: "jpeg" or "deflate".

    Returns:
        the path of ``labels.csv``.
    """
    if n_slides < 1:
        raise ValueError(f"n_slides must be at least 1, got {n_slides}")
    if not 0.0 <= tumour_rate <= 1.0:
        raise ValueError(f"tumour_rate must be in [0, 1], got {tumour_rate}")
    if compression not in WSI_COMPRESSIONS:
        raise ValueError(f"compression must be one of {WSI_COMPRESSIONS}, got {compression!r}")
    out = Path(out)
    n_tumour = int(round(n_slides * tumour_rate))
    order = np.random.default_rng([seed, 0x57A1]).permutation(n_slides)
    is_tumour = np.zeros(n_slides, dtype=bool)
    is_tumour[order[:n_tumour]] = True
    rows = []
    for i in range(n_slides):
        name = f"slide_{i:03d}"
        image = Path("images") / f"{name}.tif"
        spec = make_wsi_slide(
            out / image, seed=seed, index=i, size=size, tumour=bool(is_tumour[i]), mpp=mpp, compression=compression
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
    labels = out / "labels.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return labels
