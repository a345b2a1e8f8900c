"""Whole-slide images through MONAI's ``WSIReader`` stack, with the checks a slide needs before use.

:class:`Slide` opens a slide with a configurable backend (``tifffile`` by default, ``openslide`` or ``cucim``
when installed), validates it (readable, not truncated, a compression that can be decoded), finds its microns
per pixel in the file's own metadata and reads regions at any level. :class:`TiledTiffFileWSIReader` is MONAI's
tifffile reader with two changes: its levels are the pyramid of the file's main image series (so Aperio SVS,
OME-TIFF and Hamamatsu NDPI pyramids are read as the vendor wrote them, without thumbnail, label or macro
pages), and a region decodes only the tiles (or strips) it overlaps, where MONAI's decodes the whole level for
every patch. It is a ``BaseWSIReader``, so it can also be given to MONAI's ``PatchWSIDataset`` family as
``reader``. The readers of :func:`wsi_reader` (all backends) give a slide with a single level lower levels
computed on read (:class:`ComputedLevels`), and :class:`Slide` reads through them, so training, evaluation and
inference see the same levels and the same pixels.
"""

from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data.wsi_reader import BaseWSIReader, CuCIMWSIReader, OpenSlideWSIReader, TiffFileWSIReader
from tifffile import COMPRESSION, TIFF
from tifffile.tifffile import svs_description_metadata

__all__ = [
    "WSI_BACKENDS",
    "ComputedLevels",
    "ComputedLevelsCuCIMWSIReader",
    "ComputedLevelsOpenSlideWSIReader",
    "Slide",
    "SlideError",
    "TiledTiffFileWSIReader",
    "wsi_reader",
]

logger = logging.getLogger(__name__)

WSI_BACKENDS = ("tifffile", "openslide", "cucim")

# TIFF ResolutionUnit values -> (name, microns per unit); 1 (no unit) gives no physical size
_RESOLUTION_UNITS = {
    2: ("inch", 25400.0), 3: ("centimeter", 10000.0), 4: ("millimeter", 1000.0), 5: ("micrometer", 1.0),
}
# OME-XML PhysicalSizeXUnit values -> microns per unit (OME's default unit is the micrometre)
_OME_UNITS = {
    "\u00b5m": 1.0, "\u03bcm": 1.0, "um": 1.0, "nm": 1e-3, "pm": 1e-6, "\u00c5": 1e-4, "mm": 1e3, "cm": 1e4, "m": 1e6,
}
# resolution tags coarser than this are a screen or print resolution (72 dpi = 353 µm), not a microscope's
_MAX_TAG_MPP = 20.0
# a single-level slide gets computed levels, each half the one above, until the longer side is at most this
_COMPUTED_LEVEL_SIDE = 256
# level-0 pixels per side of the blocks a computed level is reduced from (bounds the memory of one read)
_REDUCE_BLOCK = 4096


class SlideError(ValueError):
    """A slide that cannot be used; the message names the file and what is wrong."""


def _levels(wsi: Any) -> list[Any]:
    """The keyframe (first page) of each pyramid level of a TiffFile's main image series."""
    return [level.keyframe for level in wsi.series[0].levels]


class ComputedLevels(BaseWSIReader):
    """Mixin for a MONAI WSI reader: a slide with a single stored level gets lower levels, each half the
    one above, until the longer side is at most 256 px; their regions are the mean of ``factor``-px squares of
    level 0, rounded. Level count, sizes, downsample ratios, microns per pixel and ``get_data`` cover them; the
    first time a file's levels are listed, a warning says that computed levels are slow. Put it first among
    the bases: ``class Reader(ComputedLevels, SomeWSIReader)``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._warned: set[str] = set()

    def get_stored_level_count(self, wsi: Any) -> int:
        """The number of levels stored in the file."""
        return int(super().get_level_count(wsi))

    def _computed_factors(self, wsi: Any) -> list[int]:
        """Downsample factors of the computed levels; empty unless the file stores a single level."""
        if self.get_stored_level_count(wsi) != 1:
            return []
        h, w = (int(v) for v in super().get_size(wsi, 0))
        factors: list[int] = []
        factor = 1
        while max(h, w) // factor > _COMPUTED_LEVEL_SIDE and min(h, w) // (factor * 2) >= 1:
            factor *= 2
            factors.append(factor)
        path = self.get_file_path(wsi)
        if factors and path not in self._warned:
            self._warned.add(path)
            logger.warning(
                "%s: a single stored level (%dx%d); lower levels are computed from it on every read, which is "
                "slow for large images (store a tiled pyramid, e.g. `vips tiffsave --tile --pyramid`, for speed)",
                path, w, h,
            )
        return factors

    def get_level_count(self, wsi: Any) -> int:
        return self.get_stored_level_count(wsi) + len(self._computed_factors(wsi))

    def _factor(self, wsi: Any, level: int) -> int | None:
        """The downsample factor of ``level`` when it is computed, None when it is stored."""
        stored = self.get_stored_level_count(wsi)
        if level < stored:
            return None
        factors = self._computed_factors(wsi)
        if level - stored >= len(factors):
            raise ValueError(
                f"{self.get_file_path(wsi)}: level {level} out of range (the slide has {stored + len(factors)})"
            )
        return factors[level - stored]

    def get_size(self, wsi: Any, level: int) -> tuple[int, int]:
        factor = self._factor(wsi, level)
        if factor is None:
            return super().get_size(wsi, level)
        h, w = super().get_size(wsi, 0)
        return (int(h) // factor, int(w) // factor)

    def get_downsample_ratio(self, wsi: Any, level: int) -> float:
        factor = self._factor(wsi, level)
        return super().get_downsample_ratio(wsi, level) if factor is None else float(factor)

    def _get_patch(
        self, wsi: Any, location: tuple[int, int], size: tuple[int, int], level: int, dtype: Any, mode: str
    ) -> np.ndarray:
        factor = self._factor(wsi, level)
        if factor is None:
            return super()._get_patch(wsi, location, size, level, dtype, mode)
        height, width = int(size[0]), int(size[1])
        out: np.ndarray | None = None
        step = max(1, _REDUCE_BLOCK // factor)  # level-0 blocks of at most _REDUCE_BLOCK px a side
        for r in range(0, height, step):
            for c in range(0, width, step):
                bh, bw = min(step, height - r), min(step, width - c)
                origin = (int(location[0]) + r * factor, int(location[1]) + c * factor)
                block = np.moveaxis(
                    super()._get_patch(wsi, origin, (bh * factor, bw * factor), 0, dtype, mode), self.channel_dim, -1
                )
                if out is None:
                    out = np.empty((height, width, block.shape[-1]), dtype=block.dtype)
                reduced = block.reshape(bh, factor, bw, factor, -1).mean(axis=(1, 3))
                out[r : r + bh, c : c + bw] = np.round(reduced).astype(block.dtype)
        return np.moveaxis(out, -1, self.channel_dim)


class _TileTiffFileWSIReader(TiffFileWSIReader):
    """MONAI's tifffile WSI reader over the main series' pyramid (stored levels only), decoding only the tiles a
    region overlaps."""

    @staticmethod
    def get_level_count(wsi: Any) -> int:
        return len(wsi.series[0].levels)

    def get_size(self, wsi: Any, level: int) -> tuple[int, int]:
        page = _levels(wsi)[level]
        return (page.imagelength, page.imagewidth)

    def get_downsample_ratio(self, wsi: Any, level: int) -> float:
        levels = _levels(wsi)
        return float(levels[0].imagelength) / float(levels[level].imagelength)

    def get_mpp(self, wsi: Any, level: int) -> tuple[float, float]:
        mpp, _, _ = _tiff_metadata(wsi)
        if mpp is None:
            raise ValueError(f"{wsi.filehandle.path}: no microns per pixel in the file's metadata")
        ratio = self.get_downsample_ratio(wsi, level)
        return (mpp * ratio, mpp * ratio)

    def _get_patch(
        self, wsi: Any, location: tuple[int, int], size: tuple[int, int], level: int, dtype: Any, mode: str
    ) -> np.ndarray:
        page = _levels(wsi)[level]
        if page.imagedepth != 1 or (page.samplesperpixel > 1 and page.planarconfig != 1):
            return super()._get_patch(wsi, location, size, level, dtype, mode)
        ratio = self.get_downsample_ratio(wsi, level)
        top, left = (round(location[i] / ratio) for i in range(2))
        height, width = int(size[0]), int(size[1])
        spp = page.samplesperpixel
        out = np.full((height, width, spp), 255, dtype=page.dtype)
        if page.is_tiled:
            th, tw = page.tilelength, page.tilewidth
        else:
            th, tw = min(page.rowsperstrip or page.imagelength, page.imagelength), page.imagewidth
        across = -(-page.imagewidth // tw)
        y0, y1 = max(top, 0), min(top + height, page.imagelength)
        x0, x1 = max(left, 0), min(left + width, page.imagewidth)
        if y0 < y1 and x0 < x1:
            indices = [
                ty * across + tx
                for ty in range(y0 // th, (y1 - 1) // th + 1)
                for tx in range(x0 // tw, (x1 - 1) // tw + 1)
            ]
            offsets = [page.dataoffsets[i] for i in indices]
            counts = [page.databytecounts[i] for i in indices]
            decode = page.decode
            for data, i in wsi.filehandle.read_segments(offsets, counts, indices, sort=True):
                try:
                    tile, _, _ = decode(data, i, jpegtables=page.jpegtables, jpegheader=page.jpegheader)
                except Exception as err:  # imagecodecs raises one error type per codec
                    raise SlideError(
                        f"{wsi.filehandle.path}: tile {i} of level {level} cannot be decoded "
                        f"({_compression_name(page)}; corrupt data?): {type(err).__name__}: {err}"
                    ) from err
                if tile is None:  # a tile with no data (sparse file): left white
                    continue
                ty, tx = divmod(i, across)
                ys, xs = ty * th, tx * tw
                a0, a1 = max(y0, ys), min(y1, ys + th)
                b0, b1 = max(x0, xs), min(x1, xs + tw)
                out[a0 - top : a1 - top, b0 - left : b1 - left] = tile[0, a0 - ys : a1 - ys, b0 - xs : b1 - xs]
        patch = np.moveaxis(out.astype(dtype, copy=False), -1, self.channel_dim)
        if mode in "RGB":
            if spp not in (3, 4):
                raise ValueError(
                    f"The image is expected to have three or four color channels in '{mode}' mode but has {spp}."
                )
            patch = np.take(patch, [0, 1, 2], self.channel_dim)
        return patch


class TiledTiffFileWSIReader(ComputedLevels, _TileTiffFileWSIReader):
    """MONAI's tifffile WSI reader over the main series' pyramid, decoding only the tiles a region overlaps, with
    computed lower levels for a single-level slide (:class:`ComputedLevels`).

    Levels are ``wsi.series[0].levels`` (tifffile's pyramid of the main image: sub-IFDs of OME-TIFF, the
    levels of SVS and NDPI without their thumbnail, label and macro images, reduced-resolution pages of a
    generic TIFF). Regions may extend past the level's border; pixels outside are white (255). Tiled and
    stripped pages are decoded piecewise; other layouts (planar, volumetric) fall back to MONAI's whole-level
    read. Same arguments as ``monai.data.wsi_reader.TiffFileWSIReader``.

    Raises (from ``get_data``):
        SlideError: naming the file, the level and the tile, when a tile cannot be decoded (corrupt data).
    """


class ComputedLevelsOpenSlideWSIReader(ComputedLevels, OpenSlideWSIReader):
    """MONAI's OpenSlide WSI reader with computed lower levels for a single-level slide (:class:`ComputedLevels`)."""


class ComputedLevelsCuCIMWSIReader(ComputedLevels, CuCIMWSIReader):
    """MONAI's cuCIM WSI reader with computed lower levels for a single-level slide (:class:`ComputedLevels`)."""


def wsi_reader(backend: str = "tifffile", **kwargs: Any) -> ComputedLevels:
    """A MONAI WSI reader for ``backend``, with computed lower levels for single-level slides:
    :class:`TiledTiffFileWSIReader` for "tifffile", :class:`ComputedLevelsOpenSlideWSIReader` for "openslide",
    :class:`ComputedLevelsCuCIMWSIReader` for "cucim".

    Raises:
        ValueError: for an unknown backend, or one whose library is not installed (the message says which
            packages to install).
    """
    name = backend.lower()
    if name not in WSI_BACKENDS:
        raise ValueError(f"unknown WSI backend {backend!r}; choose one of {WSI_BACKENDS}")
    if name == "tifffile":
        return TiledTiffFileWSIReader(**kwargs)
    module, packages = ("openslide", "openslide-python openslide-bin") if name == "openslide" else ("cucim", "cucim")
    try:
        __import__(module)
    except ImportError as err:
        raise ValueError(f"WSI backend {name!r} needs {packages} (pip install {packages}): {err}") from None
    reader = ComputedLevelsOpenSlideWSIReader if name == "openslide" else ComputedLevelsCuCIMWSIReader
    return reader(**kwargs)


def _compression_name(page: Any) -> str:
    code = int(page.tags.valueof("Compression", 1))
    try:
        return f"compression {COMPRESSION(code).name}"
    except ValueError:
        return f"compression {code}"


def _check_tiff(wsi: Any, path: Path) -> None:
    """Raise :class:`SlideError` when a pyramid level's tiles point past the end of the file (a truncated copy)
    or use a compression that cannot be decoded."""
    size = path.stat().st_size
    for level, page in enumerate(_levels(wsi)):
        code = int(page.tags.valueof("Compression", 1))
        if code not in TIFF.DECOMPRESSORS:
            raise SlideError(
                f"{path}: level {level} uses {_compression_name(page)}, which the installed tifffile / imagecodecs "
                "cannot decode (unsupported compression); convert the slide or use the openslide backend"
            )
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
        if ends and max(ends) > size:
            missing = sum(1 for e in ends if e > size)
            raise SlideError(
                f"{path}: truncated TIFF: {missing} of {len(ends)} tiles of level {level} lie past the end of the "
                f"file ({size} bytes)"
            )


def _resolution_mpp(page: Any, path: Path) -> float | None:
    """Microns per pixel from a page's XResolution / ResolutionUnit, None without a physical unit or when the
    value is a screen or print resolution (coarser than :data:`_MAX_TAG_MPP`)."""
    tags = page.tags
    unit, xres = tags.get("ResolutionUnit"), tags.get("XResolution")
    if unit is None or xres is None or int(unit.value) not in _RESOLUTION_UNITS:
        return None
    num, den = xres.value
    if not num or not den:
        return None
    name, microns = _RESOLUTION_UNITS[int(unit.value)]
    mpp = microns * den / num
    if mpp > _MAX_TAG_MPP:
        logger.warning(
            "%s: resolution tags of %g pixels per %s (%.4g microns per pixel) are a screen or print resolution, not "
            "a microscope's; ignored",
            path, num / den, name, mpp,
        )
        return None
    return mpp


def _ome_mpp(xml: str, path: Path) -> float | None:
    """Microns per pixel from the first image's ``Pixels`` ``PhysicalSizeX`` (and its unit) of OME-XML."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as err:
        raise SlideError(f"{path}: the OME-XML metadata cannot be parsed: {err}") from err
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    unit = pixels.get("PhysicalSizeXUnit", "\u00b5m")
    if unit not in _OME_UNITS:
        raise SlideError(f"{path}: OME PhysicalSizeXUnit {unit!r} is not a length unit ({sorted(_OME_UNITS)})")
    try:
        value = float(pixels.get("PhysicalSizeX")) * _OME_UNITS[unit]
    except ValueError as err:
        raise SlideError(f"{path}: OME PhysicalSizeX {pixels.get('PhysicalSizeX')!r} is not a number") from err
    return value if math.isfinite(value) and value > 0 else None


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _tiff_metadata(wsi: Any) -> tuple[float | None, str | None, float | None]:
    """``(mpp, source, magnification)`` of a TiffFile's level 0, from the vendor's metadata first: the Aperio
    description (``MPP``, ``AppMag``), OME-XML (``PhysicalSizeX`` with its unit), the Hamamatsu NDPI
    magnification tag, then the resolution tags. Missing values are None."""
    path = Path(wsi.filehandle.path)
    page = _levels(wsi)[0]
    magnification = None
    if wsi.is_svs:
        try:
            meta = svs_description_metadata(wsi.pages.first.description)
        except ValueError as err:
            raise SlideError(f"{path}: the Aperio image description cannot be parsed: {err}") from err
        magnification = _positive(meta.get("AppMag"))
        mpp = _positive(meta.get("MPP"))
        if mpp is not None:
            return mpp, "Aperio MPP", magnification
    if wsi.is_ome and wsi.ome_metadata:
        mpp = _ome_mpp(wsi.ome_metadata, path)
        if mpp is not None:
            return mpp, "OME PhysicalSizeX", magnification
    if wsi.is_ndpi:
        magnification = _positive(page.tags.valueof(65421))  # NDPI Magnification
    mpp = _resolution_mpp(page, path)
    return mpp, (None if mpp is None else "TIFF resolution tags"), magnification


class Slide:
    """An open whole-slide image.

    Microns per pixel come from the file's own metadata (Aperio ``MPP``, OME ``PhysicalSizeX``, TIFF resolution
    tags in a physical unit, OpenSlide's ``openslide.mpp-x``); ``default_mpp`` is used only when there is none.
    A slide with a single level (an exported region, a small scan) gets lower levels, each half the one above,
    computed from level 0 on every read by its reader (:class:`ComputedLevels`, the same levels and pixels as
    MONAI's ``PatchWSIDataset`` reads with :func:`wsi_reader`): slower than a stored pyramid, which a warning says.

    Args:
        path: the slide file (for a DICOM whole-slide image with the openslide backend: one ``.dcm`` of the
            series; for MIRAX: the ``.mrxs`` file).
        backend: "tifffile" (default), "openslide" or "cucim".
        default_mpp: microns per pixel to assume when the slide's metadata has none (stated in a warning when
            used); None makes :meth:`mpp_at` fail for such slides.

    Attributes:
        mpp: level-0 microns per pixel from the file, or None.
        mpp_source: where ``mpp`` was read ("Aperio MPP", "OME PhysicalSizeX", "TIFF resolution tags",
            "openslide.mpp-x", ...), or None.
        magnification: the scanner's objective magnification (Aperio ``AppMag``, NDPI magnification,
            ``openslide.objective-power``), or None.
        level_count, level_shapes, downsamples: the levels, stored and computed.
        stored_levels: how many of the levels are stored in the file.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: for an unknown backend, or one that is not installed.
        SlideError: when the file cannot be read by the backend, is truncated, uses a compression that cannot
            be decoded or has unusable metadata; the message names the file and the cause.
    """

    def __init__(self, path: str | os.PathLike, backend: str = "tifffile", default_mpp: float | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such slide file")
        self.backend = backend.lower()
        self.reader = wsi_reader(self.backend)
        try:
            self.wsi = self.reader.read(str(self.path))
        except Exception as err:  # the backends raise many types for unreadable files
            raise SlideError(
                f"{self.path}: cannot be read as a whole-slide image with the {self.backend} backend: "
                f"{type(err).__name__}: {err}"
            ) from err
        try:
            if self.backend == "tifffile":
                _check_tiff(self.wsi, self.path)
            self.stored_levels = self.reader.get_stored_level_count(self.wsi)
            self.level_count = int(self.reader.get_level_count(self.wsi))
            self.level_shapes = [
                tuple(int(v) for v in self.reader.get_size(self.wsi, k)) for k in range(self.level_count)
            ]
            self.downsamples = [float(self.reader.get_downsample_ratio(self.wsi, k)) for k in range(self.level_count)]
            self.mpp, self.mpp_source, self.magnification = self._read_metadata()
        except Exception as err:
            self.close()
            if isinstance(err, SlideError):
                raise
            raise SlideError(
                f"{self.path}: cannot be read as a whole-slide image with the {self.backend} backend: "
                f"{type(err).__name__}: {err}"
            ) from err
        self.default_mpp = default_mpp

    def _read_metadata(self) -> tuple[float | None, str | None, float | None]:
        if self.backend == "tifffile":
            return _tiff_metadata(self.wsi)
        if self.backend == "openslide":
            props = self.wsi.properties
            magnification = _positive(props.get("openslide.objective-power"))
            mpp = _positive(props.get("openslide.mpp-x"))
            if mpp is not None and props.get("openslide.vendor") == "generic-tiff" and mpp > _MAX_TAG_MPP:
                logger.warning("%s: resolution tags give %.4g microns per pixel, not a microscope's; ignored",
                               self.path, mpp)
                mpp = None
            return mpp, (None if mpp is None else "openslide.mpp-x"), magnification
        try:
            mpp = self.reader.get_mpp(self.wsi, 0)
        except (ValueError, KeyError):
            return None, None, None
        value = _positive(mpp[1] if isinstance(mpp, Sequence) else mpp)
        return value, (None if value is None else f"{self.backend} metadata"), None

    @property
    def name(self) -> str:
        """The slide id: the file name without its suffix."""
        return self.path.name.split(".")[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) at level 0."""
        return self.level_shapes[0]

    def mpp_at(self, level: int = 0, purpose: str = "this step") -> float:
        """Microns per pixel at ``level``: from the slide's metadata, else the assumed ``default_mpp`` (warned).

        Raises:
            SlideError: when the slide's metadata gives no microns per pixel and no ``default_mpp`` was given.
        """
        mpp = self.mpp
        if mpp is None:
            if self.default_mpp is None:
                raise SlideError(
                    f"{self.path}: no resolution tags or other microns-per-pixel metadata (Aperio MPP, OME "
                    f"PhysicalSizeX, resolution tags in cm or inch), which {purpose} needs; pass the value to assume: "
                    "--mpp (`medgain wsi patches`) or default_mpp (bundle configs)"
                )
            logger.warning("%s: no resolution tags; assuming %g microns per pixel", self.path, self.default_mpp)
            mpp = self.default_mpp
        return mpp * self.downsamples[level]

    def level_for_downsample(self, downsample: float) -> int:
        """The lowest-resolution level whose downsample is at most ``downsample`` (level 0 if none is)."""
        fitting = [k for k, d in enumerate(self.downsamples) if d <= downsample * 1.001]
        return max(fitting, key=lambda k: self.downsamples[k]) if fitting else 0

    def read_region(self, location: tuple[int, int], size: tuple[int, int], level: int) -> np.ndarray:
        """RGB pixels (3, h, w) uint8 of a region.

        Args:
            location: (top, left) in level-0 pixels.
            size: (height, width) at ``level``.
            level: pyramid level (stored or computed).

        Raises:
            SlideError: when the backend fails to decode the region (e.g. a corrupt tile); the message names the
                file and the cause.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range (the slide has {self.level_count})")
        location = (int(location[0]), int(location[1]))
        size = (int(size[0]), int(size[1]))
        try:
            data, _ = self.reader.get_data(self.wsi, location=location, size=size, level=level)
        except SlideError:
            raise
        except Exception as err:  # the backends raise many types for undecodable data
            raise SlideError(
                f"{self.path}: reading {tuple(size)} px at {tuple(location)} (level {level}) failed: "
                f"{type(err).__name__}: {err}"
            ) from err
        return np.asarray(data, dtype=np.uint8)

    def read_level(self, level: int) -> np.ndarray:
        """A whole level as (3, H, W) uint8 (meant for low-resolution levels)."""
        return self.read_region((0, 0), self.level_shapes[level], level)

    def close(self) -> None:
        """Release the file."""
        close = getattr(getattr(self, "wsi", None), "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
