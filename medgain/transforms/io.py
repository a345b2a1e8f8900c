"""Reading capsule-endoscopy frames (PNG / JPEG / DICOM) and lesion label maps (PNG / NIfTI)."""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, iter_pixels, pixel_array

__all__ = [
    "DICOM_SUFFIXES",
    "read_frame",
    "iter_frames",
    "count_frames",
    "read_label_map",
    "LoadFramed",
    "LoadLabelMapd",
]

DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_GREY_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
_COLOUR_PHOTOMETRIC = ("RGB", "YBR_FULL", "YBR_FULL_422")
_PALETTE_PHOTOMETRIC = "PALETTE COLOR"
_PALETTE_COLOURS = ("Red", "Green", "Blue")
_PIL_DIRECT_MODES = ("1", "L", "LA", "RGB", "RGBA", "RGBX", "P", "PA")
_PIL_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I")


def _is_dicom(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")


def _pil_to_rgb(path: Path, img: Image.Image) -> np.ndarray:
    """Normalise a decoded PIL image of any supported mode to (H, W, 3) float32 in [0, 1]."""
    if img.mode in _PIL_16BIT_MODES:
        grey = np.asarray(img).astype(np.float32)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise ValueError(f"{path}: mode {img.mode} values outside the 16-bit range [0, 65535]")
        return np.repeat((grey / 65535.0)[..., None], 3, axis=-1)
    if img.mode not in _PIL_DIRECT_MODES:
        raise ValueError(f"{path}: unsupported image mode {img.mode!r}")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _read_pil(path: Path, frame: int) -> np.ndarray:
    if frame != 0:
        raise ValueError(f"{path}: frame index {frame} out of range, the file holds 1 frame")
    try:
        with Image.open(path) as img:
            img.load()
            return _pil_to_rgb(path, img)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{path}: cannot decode image ({err})") from err


def _read_dicom_header(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: cannot read DICOM header ({err})") from err


def _dicom_num_frames(path: Path, ds: pydicom.Dataset) -> int:
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid NumberOfFrames {ds.get('NumberOfFrames')!r}") from err
    if n_frames < 1:
        raise ValueError(f"{path}: invalid NumberOfFrames {n_frames}, expected at least 1")
    return n_frames


def _dicom_check_header(path: Path, ds: pydicom.Dataset) -> None:
    if "PhotometricInterpretation" not in ds:
        raise ValueError(f"{path}: DICOM header has no PhotometricInterpretation (not an image, or truncated)")
    photometric = str(ds.PhotometricInterpretation).strip()
    supported = (*_GREY_PHOTOMETRIC, *_COLOUR_PHOTOMETRIC, _PALETTE_PHOTOMETRIC)
    if photometric not in supported:
        raise ValueError(
            f"{path}: unsupported photometric interpretation {photometric!r}, "
            f"expected one of {', '.join(supported)}"
        )
    if photometric == _PALETTE_PHOTOMETRIC:
        for colour in _PALETTE_COLOURS:
            has_data = any(f"{kind}{colour}PaletteColorLookupTableData" in ds for kind in ("", "Segmented"))
            if f"{colour}PaletteColorLookupTableDescriptor" not in ds or not has_data:
                raise ValueError(
                    f"{path}: PALETTE COLOR image has no {colour} Palette Color Lookup Table (Descriptor and Data)"
                )


def _palette_to_rgb(path: Path, ds: pydicom.Dataset, indices: np.ndarray) -> np.ndarray:
    """Apply the colour lookup table of a PALETTE COLOR frame; scale by the table's bits per entry."""
    if indices.ndim != 2:
        raise ValueError(f"{path}: PALETTE COLOR frame has shape {indices.shape}, expected (rows, columns)")
    try:
        rgb = apply_color_lut(indices, ds)[..., :3]
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as err:
        raise ValueError(f"{path}: cannot apply the palette colour lookup table ({err})") from err
    top = 2**bits - 1
    if rgb.size and int(rgb.max()) > top:
        raise ValueError(f"{path}: palette colour lookup table holds values above its {bits} bits per entry")
    return rgb.astype(np.float32) / float(top)


def _require_finite(path: Path, frame: int, values: np.ndarray) -> None:
    """Refuse NaN / infinite pixel values: such a frame cannot be read as an image."""
    if values.dtype.kind != "f" or np.isfinite(values).all():
        return
    n_nan = int(np.isnan(values).sum())
    n_inf = int(np.isinf(values).sum())
    raise ValueError(
        f"{path}: frame {frame} holds non-finite pixel values ({n_nan} NaN, {n_inf} infinite); "
        "it cannot be read as an image"
    )


def _has_modality_lut(ds: pydicom.Dataset) -> bool:
    return any(k in ds for k in ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence"))


def _first_value(value: Any) -> float:
    return float(value[0]) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else float(value)


def _window(path: Path, ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The first VOI window (centre, width) of the header, or None when it has none."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center, width = _first_value(ds.WindowCenter), _first_value(ds.WindowWidth)
    except (TypeError, ValueError, IndexError) as err:
        raise ValueError(f"{path}: invalid WindowCenter / WindowWidth ({err})") from err
    if not (math.isfinite(center) and math.isfinite(width)) or width < 1:
        raise ValueError(f"{path}: invalid VOI window (centre {center}, width {width}), the width must be >= 1")
    return center, width


def _stored_range(path: Path, ds: pydicom.Dataset) -> tuple[int, int]:
    """The smallest and largest stored integer value that ``BitsStored`` / ``PixelRepresentation`` allow."""
    if "BitsStored" not in ds:
        raise ValueError(f"{path}: DICOM header has no BitsStored")
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _grey_to_unit(path: Path, ds: pydicom.Dataset, pixels: np.ndarray) -> np.ndarray:
    """Scale one grey frame to [0, 1] by what its values are (see :func:`read_frame`)."""
    is_float = pixels.dtype.kind == "f"
    if not is_float and not _has_modality_lut(ds) and _window(path, ds) is None:
        low, high = _stored_range(path, ds)
        return (pixels.astype(np.float64) - low) / float(high - low)
    try:
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as err:
        raise ValueError(f"{path}: cannot apply the modality LUT / rescale slope and intercept ({err})") from err
    window = _window(path, ds)
    if window is not None:  # DICOM PS3.3 C.11.2.1.2.1, linear VOI function
        center, width = window
        if width == 1.0:  # a threshold
            return (values > center - 0.5).astype(np.float64)
        return (values - (center - 0.5)) / (width - 1.0) + 0.5
    if is_float:
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    else:
        ends = np.asarray(apply_modality_lut(np.asarray(_stored_range(path, ds), dtype=pixels.dtype), ds), float)
        low, high = float(ends.min()), float(ends.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _dicom_to_rgb(path: Path, ds: pydicom.Dataset, pixels: np.ndarray, frame: int) -> np.ndarray:
    """Scale one decoded DICOM frame and convert it to (H, W, 3) float32 in [0, 1] (see :func:`read_frame`).

    pydicom already converts YBR_FULL / YBR_FULL_422 pixel data to RGB when decoding (``raw=False``). PALETTE
    COLOR frames hold lookup-table indices: the table is applied and scaled by its bits per entry instead.
    """
    _require_finite(path, frame, pixels)
    photometric = str(ds.PhotometricInterpretation).strip()
    if photometric == _PALETTE_PHOTOMETRIC:
        return _palette_to_rgb(path, ds, pixels)
    if photometric in _GREY_PHOTOMETRIC:
        if pixels.ndim != 2:
            raise ValueError(f"{path}: {photometric} frame has shape {pixels.shape}, expected (rows, columns)")
        values = np.clip(_grey_to_unit(path, ds, pixels), 0.0, 1.0)
        if photometric == "MONOCHROME1":
            values = 1.0 - values
        return np.repeat(values.astype(np.float32)[..., None], 3, axis=-1)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"{path}: {photometric} frame has shape {pixels.shape}, expected (rows, columns, 3)")
    if pixels.dtype.kind == "f":
        raise ValueError(f"{path}: {photometric} frame holds floating-point pixel data, supported for grey images only")
    low, high = _stored_range(path, ds)
    return np.clip((pixels.astype(np.float32) - low) / float(high - low), 0.0, 1.0).astype(np.float32)


def _read_dicom(path: Path, frame: int) -> np.ndarray:
    ds = _read_dicom_header(path)
    _dicom_check_header(path, ds)
    n_frames = _dicom_num_frames(path, ds)
    if not 0 <= frame < n_frames:
        raise ValueError(f"{path}: frame index {frame} out of range, the file holds {n_frames} frame(s)")
    try:
        pixels = pixel_array(path, index=frame)
    except Exception as err:  # pydicom raises many exception types for damaged pixel data
        raise ValueError(f"{path}: cannot decode pixel data of frame {frame} ({err})") from err
    return _dicom_to_rgb(path, ds, pixels, frame)


def read_frame(path: str | os.PathLike, frame: int = 0) -> np.ndarray:
    """Read one frame of a PNG / JPEG / DICOM file as RGB.

    Args:
        path: image file; DICOM is recognised by the suffix ``.dcm`` / ``.dicom``, anything else is read by PIL.
        frame: frame index (only multi-frame DICOM holds more than frame 0).

    Returns:
        (H, W, 3) float32 array in [0, 1]. Grey images are repeated to 3 channels, alpha is dropped,
        palettes are expanded, 16-bit PNGs are scaled by 65535, MONOCHROME1 is inverted and YBR_FULL /
        YBR_FULL_422 converted to RGB. DICOM pixel values are scaled by what they are:

        - integer pixel data without rescale or window: by the range ``BitsStored`` / ``PixelRepresentation``
          allow (``2**BitsStored - 1`` levels);
        - grey data with Rescale Slope / Intercept or a Modality LUT (``pydicom.pixels.apply_modality_lut``) or
          with floating-point pixel data (Float / Double Float Pixel Data) are first mapped to their modality
          values (e.g. Hounsfield units); then
        - grey data with a VOI window (the first Window Center / Width) are windowed (the linear function of
          DICOM PS3.3 C.11.2.1.2.1: window bottom 0, top 1);
        - without a window, rescaled integer data are scaled by the modality values of their stored range, and
          floating-point data (which have no nominal range) by the minimum and maximum of the frame.

        PALETTE COLOR DICOM goes through its Red / Green / Blue Palette Color Lookup Tables
        (``pydicom.pixels.apply_color_lut``) and is scaled by ``2**bits - 1`` of the tables' bits per entry
        (8 or 16, the descriptor's third value).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: for a corrupt or truncated file, an out-of-range frame, an unsupported format, or NaN /
            infinite pixel values (naming the file, the frame and how many).
    """
    path = Path(path)
    _check_exists(path)
    frame = int(frame)
    return _read_dicom(path, frame) if _is_dicom(path) else _read_pil(path, frame)


def iter_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Decode every frame of an image file once, in order (memory-efficient for long DICOM clips).

    Args:
        path: image file, as for :func:`read_frame`.

    Yields:
        (H, W, 3) float32 arrays in [0, 1], as :func:`read_frame` returns them.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: for a corrupt or truncated file, an unsupported format or NaN / infinite pixel values.
    """
    path = Path(path)
    _check_exists(path)
    if not _is_dicom(path):
        yield _read_pil(path, 0)
        return
    ds = _read_dicom_header(path)
    _dicom_check_header(path, ds)
    n_frames = _dicom_num_frames(path, ds)
    frames = iter_pixels(path)
    try:
        for index in range(n_frames):
            try:
                pixels = next(frames)
            except StopIteration as err:
                raise ValueError(f"{path}: pixel data ends before frame {index} of {n_frames}") from err
            except Exception as err:  # pydicom raises many exception types for damaged pixel data
                raise ValueError(f"{path}: cannot decode pixel data of frame {index} ({err})") from err
            yield _dicom_to_rgb(path, ds, pixels, index)
    finally:
        frames.close()


def count_frames(path: str | os.PathLike) -> int:
    """Number of frames of an image file, reading only its header (no pixel is decoded).

    The header must describe an image :func:`read_frame` can read: a PIL mode it converts, or a DICOM photometric
    interpretation it supports (with its palette tables). Pixel data that cannot be decoded is found only when
    the frame is read.

    Args:
        path: image file, as for :func:`read_frame`.

    Returns:
        1 for PNG / JPEG, ``NumberOfFrames`` (default 1) for DICOM.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the header cannot be read or describes an image that cannot be read (naming the file).
    """
    path = Path(path)
    _check_exists(path)
    if _is_dicom(path):
        ds = _read_dicom_header(path)
        _dicom_check_header(path, ds)
        return _dicom_num_frames(path, ds)
    try:
        with Image.open(path) as img:  # lazy: reads the header, decodes nothing
            mode = img.mode
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{path}: cannot read image header ({err})") from err
    if mode not in (*_PIL_DIRECT_MODES, *_PIL_16BIT_MODES):
        raise ValueError(f"{path}: unsupported image mode {mode!r}")
    return 1


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D integer label map from a PNG (via PIL) or NIfTI file (via nibabel, array stored as-is).

    Args:
        path: ``.png`` (mode 1 / L / P / I;16 / I, palette indices are kept) or ``.nii`` / ``.nii.gz`` file.

    Returns:
        (H, W) int64 array.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the file cannot be decoded, is not 2D single-channel, or holds non-integer values.
    """
    path = Path(path)
    _check_exists(path)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        try:
            values = np.asanyarray(nib.load(path).dataobj)
        except Exception as err:  # nibabel raises many exception types for damaged files
            raise ValueError(f"{path}: cannot read NIfTI label map ({err})") from err
        while values.ndim > 2 and values.shape[-1] == 1:
            values = values[..., 0]
    else:
        try:
            with Image.open(path) as img:
                img.load()
                if img.mode not in ("1", "L", "P", *_PIL_16BIT_MODES):
                    raise ValueError(
                        f"{path}: label map must be single-channel (mode 1/L/P/I;16/I), got mode {img.mode}"
                    )
                values = np.asarray(img)
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"{path}: cannot decode label map ({err})") from err
    if values.ndim != 2:
        raise ValueError(f"{path}: label map must be 2D (H, W), got shape {values.shape}")
    if not (np.issubdtype(values.dtype, np.integer) or values.dtype == bool):
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise ValueError(f"{path}: label map holds non-integer values (dtype {values.dtype})")
    return values.astype(np.int64)


class LoadFramed(MapTransform):
    """Load image files (PNG / JPEG / DICOM frame) named in the data dict as (3, H, W) float32 RGB tensors.

    The source path is kept in ``d[key + path_key_postfix]`` and the frame index in ``d[frame_key]``.

    By default a frame that cannot be read raises (training: the data set is wrong). With ``refused_key`` (inference
    over a folder scanned by its headers only, :func:`medgain.data.scan_folder` with ``decode=False``) it is
    *refused* instead, so the batch goes on: ``d[refused_key]`` receives the reason (the reader's message, naming
    the file and what is wrong) and ``d[key]`` a (3, 1, 1) zero image that stands in for it (a resize after this
    transform brings it to the batch's size); a frame that was read gets ``""``. The handlers that write outputs
    (:class:`~medgain.handlers.PredictionCSVWriter`, :class:`~medgain.handlers.HeatmapWriter`) give a refused
    frame no score, no decision and no heatmap, and list it in ``errors.csv`` with its reason.

    Args:
        keys: keys of the image paths to load.
        frame_key: key of the frame index (read when present, 0 otherwise; always written).
        path_key_postfix: postfix of the key that receives the source path string.
        allow_missing_keys: don't raise when a key is missing.
        refused_key: key that receives why a frame could not be read (``""`` when it was); None: raise instead.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        frame_key: str = "frame",
        path_key_postfix: str = "_path",
        allow_missing_keys: bool = False,
        refused_key: str | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.frame_key = frame_key
        self.path_key_postfix = path_key_postfix
        self.refused_key = refused_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        frame = int(d.get(self.frame_key, 0))
        reasons = []
        for key in self.key_iterator(d):
            path = str(d[key])
            try:
                d[key] = torch.from_numpy(np.ascontiguousarray(read_frame(path, frame).transpose(2, 0, 1)))
            except (ValueError, OSError) as err:
                if self.refused_key is None:
                    raise
                d[key] = torch.zeros(3, 1, 1)
                reasons.append(str(err))
            d[f"{key}{self.path_key_postfix}"] = path
        d[self.frame_key] = frame
        if self.refused_key is not None:
            d[self.refused_key] = "; ".join(reasons)
        return d


class LoadLabelMapd(MapTransform):
    """Load label maps (PNG / NIfTI) named in the data dict as (1, H, W) int64 tensors.

    The label map must have the spatial size of the already loaded reference image. Its source path is kept in
    ``d[key + path_key_postfix]`` (named in the errors of :class:`~medgain.transforms.LabelMapToMaskd`).

    Args:
        keys: keys of the label map paths; missing keys are left absent by default.
        reference_key: key of the loaded (C, H, W) reference image.
        allow_missing_keys: don't raise when a key is missing.
        path_key_postfix: postfix of the key holding the reference image's source path (as written by
            :class:`LoadFramed`), used in error messages, and of the key that receives the label map's path.
    """

    def __init__(
        self,
        keys: KeysCollection = ("label_map",),
        reference_key: str = "image",
        allow_missing_keys: bool = True,
        path_key_postfix: str = "_path",
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key
        self.path_key_postfix = path_key_postfix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            reference = d.get(self.reference_key)
            if not isinstance(reference, (torch.Tensor, np.ndarray)) or reference.ndim != 3:
                raise ValueError(
                    f"{path}: reference '{self.reference_key}' must be loaded as a (C, H, W) image "
                    "before its label map (put LoadFramed first)"
                )
            values = read_label_map(path)
            if tuple(values.shape) != tuple(reference.shape[1:]):
                reference_path = d.get(f"{self.reference_key}{self.path_key_postfix}", "(unknown file)")
                raise ValueError(
                    f"{path}: label map of size {tuple(values.shape)} does not match image {reference_path} "
                    f"of size {tuple(reference.shape[1:])}"
                )
            d[key] = torch.from_numpy(values[None])
            d[f"{key}{self.path_key_postfix}"] = path
        return d

