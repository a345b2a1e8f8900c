"""medgain.data: datalists, sampling and the erase fill colour."""

from medgain.data.capsule import check_image_splits, check_study_splits, prepare_items, write_errors_csv
from medgain.data.datalist import apply_mask_budget, expand_frames, load_datalist, require_full_batch, scan_folder
from medgain.data.dermoscopy import (
    DERMOSCOPY_LAYOUTS,
    LABEL_COLUMNS,
    MetadataEncoder,
    check_predictive_metadata,
    read_dermoscopy_csv,
)
from medgain.data.dermoscopy_splits import (
    TEST_FOLD,
    dermoscopy_cv_items,
    dermoscopy_inference_items,
    draw_patient_folds,
    fold_items,
    write_fold_table,
)
from medgain.data.fill_color import cached_fill_color, erase_fill
from medgain.data.folds import (
    FOLDS_COLUMNS,
    assign_folds,
    check_patient_splits,
    grouped_stratified_folds,
    read_folds_csv,
    write_folds_csv,
)
from medgain.data.phi import frame_ref, phi_salt, pseudonym, study_ref
from medgain.data.sampler import PositiveFractionBatchSampler

__all__ = [
    "DERMOSCOPY_LAYOUTS",
    "FOLDS_COLUMNS",
    "LABEL_COLUMNS",
    "MetadataEncoder",
    "TEST_FOLD",
    "dermoscopy_cv_items",
    "dermoscopy_inference_items",
    "draw_patient_folds",
    "fold_items",
    "write_fold_table",
    "assign_folds",
    "check_patient_splits",
    "check_predictive_metadata",
    "grouped_stratified_folds",
    "read_dermoscopy_csv",
    "read_folds_csv",
    "write_folds_csv",
    "PositiveFractionBatchSampler",
    "apply_mask_budget",
    "cached_fill_color",
    "check_image_splits",
    "check_study_splits",
    "erase_fill",
    "expand_frames",
    "load_datalist",
    "require_full_batch",
    "prepare_items",
    "scan_folder",
    "write_errors_csv",
    "frame_ref",
    "phi_salt",
    "pseudonym",
    "study_ref",
]
