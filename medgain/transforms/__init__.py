"""medgain.transforms: frame / label-map loading and lesion-mask transforms."""

from .io import DICOM_SUFFIXES, LoadFramed, LoadLabelMapd, count_frames, iter_frames, read_frame, read_label_map
from .label_map import LabelMapToMaskd, as_label_tuple

__all__ = [
    "DICOM_SUFFIXES",
    "LabelMapToMaskd",
    "LoadFramed",
    "LoadLabelMapd",
    "as_label_tuple",
    "count_frames",
    "iter_frames",
    "read_frame",
    "read_label_map",
]
