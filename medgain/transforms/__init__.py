"""medgain.transforms: frame / label-map loading and lesion-mask transforms."""

from .hair import DrawHair, DrawHaird, hair_alpha
from .io import DICOM_SUFFIXES, LoadFramed, LoadLabelMapd, count_frames, iter_frames, read_frame, read_label_map
from .meta import WithoutMetad
from .label_map import LabelMapToMaskd, ResizeLesionMaskd, as_label_tuple, resize_lesion_mask
from .resize import ResizeImaged

__all__ = [
    "DrawHair",
    "DrawHaird",
    "hair_alpha",
    "DICOM_SUFFIXES",
    "LabelMapToMaskd",
    "LoadFramed",
    "LoadLabelMapd",
    "ResizeImaged",
    "ResizeLesionMaskd",
    "as_label_tuple",
    "count_frames",
    "iter_frames",
    "read_frame",
    "read_label_map",
    "resize_lesion_mask",
    "WithoutMetad",
]
