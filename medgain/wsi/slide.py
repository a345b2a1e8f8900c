"""Whole-slide images through MONAI's ``WSIReader`` stack, with the checks a slide needs before use.

:class:`Slide` opens a slide with a configurable backend (``tifffile`` by default, ``openslide`` or ``cucim``
when installed), validates it (readable, not truncated, pyramidal) and reads regions at any level.
:class:`TiledTiffFileWSIReader` is MONAI's tifffile reader with one change: a region decodes only the tiles it
overlaps, where MONAI's decodes the whole level for every patch. It is a ``BaseWSIReader``, so it can also be
given to MONAI's ``PatchWSIDataset`` family as ``reader``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import WSIReader
from monai.data.wsi_reader import BaseWSIReader, TiffFileWSIReader

__all__ = ["WSI_BACKENDS", "Slide", "SlideError", "TiledTiffFileWSIReader", "wsi_reader"]

logger = logging.getLogger(__name__)

WSI_BACKENDS = ("tifffile", "openslide", "cucim")

# TIFF ResolutionUnit values -> microns per unit
_UNIT_MICRONS = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}


class SlideError(ValueError):
    """A slide that cannot be used; the message names the file and what is wrong."""


class TiledTiffFileWSIReader(TiffFileWSIReader):
    """MONAI's tifffile WSI reader, decoding only the tiles a region overlaps.

    Regions may extend past the level's border; pixels outside are white (255). Pages that are not tiled fall
    back to MONAI's whole-level read. Same arguments as ``monai.data.wsi_reader.TiffFileWSIReader``.
    """

    def _get_patch(
        self, wsi: Any, location: tuple[int, int], size: tuple[int, int], level: int, dtype: Any, mode: str
    ) -> np.ndarray:
        page = wsi.pages[level]
        if not page.is_tiled or page.imagedepth != 1:
            return super()._get_patch(wsi, location, size, level, dtype, mode)
        ratio = self.get_downsample_ratio(wsi, level)
        top, left = (round(location[i] / ratio) for i in range(2))
        height, width = int(size[0]), int(size[1])
        spp = page.samplesperpixel
        out = np.full((height, width, spp), 255, dtype=page.dtype)
        th, tw = page.tilelength, page.tilewidth
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
                tile, _, _ = decode(data, i, jpegtables=page.jpegtables, jpegheader=page.jpegheader)
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


def wsi_reader(backend: str = "tifffile", **kwargs: Any) -> BaseWSIReader:
    """A MONAI WSI reader for ``backend``: tile-exact :class:`TiledTiffFileWSIReader` for "tifffile", MONAI's
    ``WSIReader`` for "openslide" and "cucim".

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
    return WSIReader(backend=name, **kwargs)


def _check_tiff(wsi: Any, path: Path) -> None:
    """Raise :class:`SlideError` when a TIFF's tiles point past the end of the file (a truncated copy)."""
    size = path.stat().st_size
    for level, page in enumerate(wsi.pages):
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
        if ends and max(ends) > size:
            missing = sum(1 for e in ends if e > size)
            raise SlideError(
                f"{path}: truncated TIFF: {missing} of {len(ends)} tiles of level {level} lie past the end of the "
                f"file ({size} bytes)"
            )


def _tiff_mpp(wsi: Any) -> float | None:
    """Level-0 microns per pixel from a TIFF's resolution tags (or an SVS description), None when absent."""
    if getattr(wsi, "is_svs", False):
        mpp = (wsi.svs_metadata or {}).get("MPP")
        if mpp:
            return float(mpp)
    tags = wsi.pages[0].tags
    unit = tags.get("ResolutionUnit")
    xres = tags.get("XResolution")
    if unit is None or xres is None or int(unit.value) not in _UNIT_MICRONS:
        return None
    num, den = xres.value
    if not num or not den:
        return None
    return _UNIT_MICRONS[int(unit.value)] * den / num


class Slide:
    """An open whole-slide image.

    Args:
        path: the slide file.
        backend: "tifffile" (default), "openslide" or "cucim".
        default_mpp: microns per pixel to assume when the slide has no resolution tags (stated in a warning
            when used); None makes :meth:`mpp_at` fail for such slides.
        require_pyramid: reject single-level slides (every read of a large flat image decodes all of it).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        SlideError: when the file cannot be read by the backend, is truncated or (``require_pyramid``) has a
            single level.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        backend: str = "tifffile",
        default_mpp: float | None = None,
        require_pyramid: bool = True,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such slide file")
        self.backend = backend.lower()
        self.reader = wsi_reader(self.backend)
        try:
            self.wsi = self.reader.read(str(self.path))
        except Exception as err:  # the backends raise many types for unreadable files
            raise SlideError(
                f"{self.path}: cannot be read as a whole-slide image with the {self.backend} backend: {err}"
            ) from err
        try:
            if self.backend == "tifffile":
                _check_tiff(self.wsi, self.path)
            self.level_count = int(self.reader.get_level_count(self.wsi))
            self.level_shapes = [
                tuple(int(v) for v in self.reader.get_size(self.wsi, k)) for k in range(self.level_count)
            ]
            self.downsamples = [float(self.reader.get_downsample_ratio(self.wsi, k)) for k in range(self.level_count)]
            if require_pyramid and self.level_count < 2:
                h, w = self.level_shapes[0]
                raise SlideError(
                    f"{self.path}: not a pyramidal slide (a single {w}x{h} level); write it as a tiled pyramid "
                    "(e.g. tifffile with sub-resolution levels, or `vips tiffsave --tile --pyramid`)"
                )
            self.mpp = self._read_mpp()
        except Exception:
            self.close()
            raise
        self.default_mpp = default_mpp

    def _read_mpp(self) -> float | None:
        if self.backend == "tifffile":
            return _tiff_mpp(self.wsi)
        try:
            mpp = self.reader.get_mpp(self.wsi, 0)
        except (ValueError, KeyError):
            return None
        value = float(mpp[1] if isinstance(mpp, Sequence) else mpp)
        return value if math.isfinite(value) and value > 0 else None

    @property
    def name(self) -> str:
        """The slide id: the file name without its suffix."""
        return self.path.name.split(".")[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) at level 0."""
        return self.level_shapes[0]

    def mpp_at(self, level: int = 0, purpose: str = "this step") -> float:
        """Microns per pixel at ``level``: from the slide's tags, else the assumed ``default_mpp`` (warned).

        Raises:
            SlideError: when the slide has no resolution tags and no ``default_mpp`` was given.
        """
        mpp = self.mpp
        if mpp is None:
            if self.default_mpp is None:
                raise SlideError(
                    f"{self.path}: no resolution tags (microns per pixel), which {purpose} needs; give the "
                    "microns per pixel to assume (default_mpp)"
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
            level: pyramid level.

        Raises:
            SlideError: when the backend fails to decode the region (e.g. a corrupt tile).
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range (the slide has {self.level_count})")
        try:
            data, _ = self.reader.get_data(
                self.wsi, location=tuple(int(v) for v in location), size=tuple(int(v) for v in size), level=level
            )
        except Exception as err:
            raise SlideError(
                f"{self.path}: reading {tuple(size)} px at {tuple(location)} (level {level}) failed: {err}"
            ) from err
        return np.asarray(data, dtype=np.uint8)

    def read_level(self, level: int) -> np.ndarray:
        """A whole level as (3, H, W) uint8 (meant for low-resolution levels)."""
        return self.read_region((0, 0), self.level_shapes[level], level)

    def close(self) -> None:
        """Release the file."""
        close = getattr(self.wsi, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
