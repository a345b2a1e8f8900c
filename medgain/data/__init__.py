"""medgain.data: datalists, sampling and the erase fill colour."""

from medgain.data.capsule import check_study_splits, prepare_items, write_errors_csv
from medgain.data.datalist import apply_mask_budget, expand_frames, load_datalist, scan_folder
from medgain.data.fill_color import cached_fill_color, erase_fill
from medgain.data.sampler import PositiveFractionBatchSampler

__all__ = [
    "PositiveFractionBatchSampler",
    "apply_mask_budget",
    "cached_fill_color",
    "check_study_splits",
    "erase_fill",
    "expand_frames",
    "load_datalist",
    "prepare_items",
    "scan_folder",
    "write_errors_csv",
]
