"""Tumour annotations: ASAP XML (Camelyon) and QuPath GeoJSON polygons, checked and rasterised at any level."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from skimage.draw import polygon as fill_polygon

__all__ = [
    "EXCLUSION_GROUPS",
    "Annotation",
    "AnnotationError",
    "read_annotations",
    "tumour_mask",
]

#: groups / classifications whose polygons mark non-tumour areas cut out of tumour ones (Camelyon16 "_2").
EXCLUSION_GROUPS = ("_2", "exclusion", "ignore", "ignore*")

_ASAP_POLYGON_TYPES = ("polygon", "spline", "rectangle")


class AnnotationError(ValueError):
    """An annotation file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Annotation:
    """One annotated polygon.

    Attributes:
        name: the annotation's name (ASAP ``Name``, GeoJSON ``name`` or feature index).
        group: ASAP ``PartOfGroup`` / GeoJSON classification name.
        exterior: (N, 2) float64 (x, y) vertices in level-0 pixels, not repeating the first.
        holes: interior rings (GeoJSON), same layout.
    """

    name: str
    group: str
    exterior: np.ndarray
    holes: tuple[np.ndarray, ...] = field(default=())

    @property
    def is_exclusion(self) -> bool:
        """True when the group marks an area cut out of tumours (see :data:`EXCLUSION_GROUPS`)."""
        return self.group.strip().lower() in EXCLUSION_GROUPS


def _ring(points: list, path: Path, what: str) -> np.ndarray:
    try:
        ring = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise AnnotationError(f"{path}: {what} has coordinates that are not numbers") from None
    if ring.ndim != 2 or ring.shape[1] < 2:
        raise AnnotationError(f"{path}: {what} must be a list of (x, y) points")
    ring = ring[:, :2]
    if not np.isfinite(ring).all():
        raise AnnotationError(f"{path}: {what} has non-finite coordinates")
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    keep = np.ones(len(ring), dtype=bool)
    keep[1:] = np.any(ring[1:] != ring[:-1], axis=1)  # drop repeated consecutive vertices
    ring = ring[keep]
    if len(ring) < 3:
        raise AnnotationError(f"{path}: {what} has {len(ring)} distinct vertices; a polygon needs at least 3")
    return ring


def _read_asap(path: Path) -> list[Annotation]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise AnnotationError(f"{path}: not well-formed XML: {err}") from None
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(
            f"{path}: not an ASAP annotation file (root element <{root.tag}>, expected <ASAP_Annotations>)"
        )
    out = []
    for i, ann in enumerate(root.iter("Annotation")):
        name = ann.get("Name") or f"Annotation {i}"
        kind = (ann.get("Type") or "Polygon").lower()
        if kind not in _ASAP_POLYGON_TYPES:
            raise AnnotationError(
                f"{path}: annotation {name!r} has type {ann.get('Type')!r}; only polygons (Polygon, Spline, "
                "Rectangle) can be rasterised"
            )
        coords = sorted(ann.iter("Coordinate"), key=lambda c: float(c.get("Order", 0)))
        try:
            points = [[float(c.get("X")), float(c.get("Y"))] for c in coords]
        except (TypeError, ValueError):
            raise AnnotationError(f"{path}: annotation {name!r} has a Coordinate without numeric X / Y") from None
        out.append(Annotation(name, ann.get("PartOfGroup") or "", _ring(points, path, f"annotation {name!r}")))
    return out


def _geojson_group(props: dict) -> str:
    cls = props.get("classification")
    if isinstance(cls, dict):
        return str(cls.get("name", ""))
    if isinstance(cls, str):
        return cls
    return str(props.get("group", props.get("name", "")))


def _read_geojson(path: Path) -> list[Annotation]:
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: not valid JSON: {err}") from None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features", [])
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, list):
        features = doc
    else:
        raise AnnotationError(f"{path}: not a GeoJSON FeatureCollection, Feature or list of features")
    out = []
    for i, feat in enumerate(features):
        geom = (feat or {}).get("geometry") or {}
        props = (feat or {}).get("properties") or {}
        name = str(props.get("name", f"feature {i}"))
        kind = geom.get("type")
        if kind == "Polygon":
            polygons = [geom.get("coordinates") or []]
        elif kind == "MultiPolygon":
            polygons = geom.get("coordinates") or []
        else:
            raise AnnotationError(
                f"{path}: {name!r} has geometry type {kind!r}; only Polygon and MultiPolygon can be rasterised"
            )
        for j, rings in enumerate(polygons):
            if not rings:
                raise AnnotationError(f"{path}: {name!r} has an empty polygon")
            what = f"{name!r}" + (f" part {j}" if len(polygons) > 1 else "")
            exterior = _ring(rings[0], path, what)
            holes = tuple(_ring(r, path, f"{what} hole {k}") for k, r in enumerate(rings[1:]))
            out.append(
                Annotation(name if len(polygons) == 1 else f"{name} [{j}]", _geojson_group(props), exterior, holes)
            )
    return out


def _segments_cross(ring: np.ndarray, chunk: int = 512) -> tuple[int, int] | None:
    """Indices (i, j) of two non-adjacent edges of a closed ring that cross properly, or None."""
    a = ring
    b = np.roll(ring, -1, axis=0)
    n = len(ring)

    def orient(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
        return np.sign(
            (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])
        )

    idx = np.arange(n)
    for start in range(0, n, chunk):
        i = idx[start : start + chunk, None]
        ai, bi = a[i[:, 0]][:, None, :], b[i[:, 0]][:, None, :]
        aj, bj = a[None, :, :], b[None, :, :]
        d1 = orient(ai, bi, aj)
        d2 = orient(ai, bi, bj)
        d3 = orient(aj, bj, ai)
        d4 = orient(aj, bj, bi)
        cross = (d1 * d2 < 0) & (d3 * d4 < 0)
        j = idx[None, :]
        adjacent = (np.abs(i - j) <= 1) | (np.abs(i - j) == n - 1)
        hits = np.argwhere(cross & ~adjacent & (j > i))
        if hits.size:
            return int(start + hits[0, 0]), int(hits[0, 1])
    return None


def _validate(annotations: list[Annotation], path: Path, slide_shape: tuple[int, int] | None) -> None:
    for ann in annotations:
        for k, ring in enumerate((ann.exterior, *ann.holes)):
            what = f"annotation {ann.name!r}" + (f" hole {k - 1}" if k else "")
            if slide_shape is not None:
                h, w = slide_shape
                outside = (ring[:, 0] < 0) | (ring[:, 0] > w) | (ring[:, 1] < 0) | (ring[:, 1] > h)
                if outside.any():
                    x, y = ring[int(np.argmax(outside))]
                    raise AnnotationError(
                        f"{path}: {what} has {int(outside.sum())} vertices outside the slide ({w}x{h} px), e.g. "
                        f"({x:.1f}, {y:.1f}); is it drawn on another slide or at another level?"
                    )
            crossing = _segments_cross(ring)
            if crossing is not None:
                i, j = crossing
                raise AnnotationError(
                    f"{path}: {what} is self-intersecting (edge {i} from ({ring[i, 0]:.1f}, {ring[i, 1]:.1f}) crosses "
                    f"edge {j} from ({ring[j, 0]:.1f}, {ring[j, 1]:.1f})); fix the polygon in the annotation tool"
                )


@lru_cache(maxsize=64)
def _cached(path: str, mtime: float, slide_shape: tuple[int, int] | None) -> tuple[Annotation, ...]:
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".xml":
        annotations = _read_asap(p)
    elif suffix in (".geojson", ".json"):
        annotations = _read_geojson(p)
    else:
        raise AnnotationError(f"{p}: unknown annotation format {suffix!r}; expected ASAP .xml or .geojson / .json")
    _validate(annotations, p, slide_shape)
    return tuple(annotations)


def read_annotations(path: str | os.PathLike, slide_shape: tuple[int, int] | None = None) -> tuple[Annotation, ...]:
    """Polygons of an ASAP XML (``.xml``) or GeoJSON (``.geojson`` / ``.json``) annotation file.

    Files are cached (keyed by path, modification time and ``slide_shape``), so data loaders may call this for
    every patch.

    Args:
        path: the annotation file; coordinates are level-0 pixels.
        slide_shape: (height, width) of the slide at level 0; when given, every vertex must lie on the slide.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        AnnotationError: for XML that is not ASAP, malformed JSON / XML, unsupported geometry, polygons with
            fewer than 3 vertices, vertices outside the slide, or self-intersecting polygons; the message names
            the file and the annotation.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such annotation file")
    shape = None if slide_shape is None else (int(slide_shape[0]), int(slide_shape[1]))
    return _cached(str(p.resolve()), p.stat().st_mtime, shape)


def _fill(out: np.ndarray, ring: np.ndarray, origin: tuple[float, float], downsample: float, value: bool) -> None:
    # pixel (r, c) of the output covers level-0 [origin + c * d, origin + (c + 1) * d); its centre is inside
    rows = (ring[:, 1] - origin[0]) / downsample - 0.5
    cols = (ring[:, 0] - origin[1]) / downsample - 0.5
    rr, cc = fill_polygon(rows, cols, shape=out.shape)
    out[rr, cc] = value


def tumour_mask(
    annotations: tuple[Annotation, ...] | list[Annotation],
    shape: tuple[int, int],
    downsample: float = 1.0,
    origin: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Rasterise tumour polygons into a boolean (height, width) mask.

    Tumour polygons are filled (their holes cleared), then polygons of exclusion groups (see
    :data:`EXCLUSION_GROUPS`) are cleared. A pixel is tumour when its centre lies inside.

    Args:
        annotations: from :func:`read_annotations`.
        shape: (height, width) of the mask.
        downsample: level-0 pixels per mask pixel (the level's downsample for a whole-level mask).
        origin: (top, left) of the mask in level-0 pixels (a patch's location for a patch mask).
    """
    out = np.zeros(tuple(int(v) for v in shape), dtype=bool)
    for ann in sorted(annotations, key=lambda a: a.is_exclusion):
        _fill(out, ann.exterior, origin, downsample, not ann.is_exclusion)
        for hole in ann.holes:
            _fill(out, hole, origin, downsample, ann.is_exclusion)
    return out
