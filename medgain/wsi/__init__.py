"""medgain.wsi: whole-slide images on MONAI's WSI stack — reading, annotations, tissue, patch tables, stain
augmentation and slide inference."""

from medgain.wsi.annotations import EXCLUSION_GROUPS, Annotation, AnnotationError, read_annotations, tumour_mask
from medgain.wsi.dataset import (
    SLIDE_SUFFIXES,
    SPLITS,
    make_patch_dataset,
    patch_datalist,
    scan_slides,
    split_mpp,
    split_slides,
    split_slides_table,
)
from medgain.wsi.evaluate import evaluate_inference, read_slide_labels
from medgain.wsi.inference import (
    LESION_COLUMNS,
    MPP_TOLERANCE,
    PatchReading,
    SlideInferer,
    SlideMaps,
    collect_slide_scores,
    output_id,
    run_inference,
    write_slide_outputs,
)
from medgain.wsi.patch_mask import LesionPatchMaskd
from medgain.wsi.patch_meta import PatchIdd
from medgain.wsi.patches import (
    PATCH_COLUMNS,
    balance_patches,
    grid_locations,
    patch_items,
    patch_table,
    read_patch_table,
    slides_patch_table,
    write_patch_table,
)
from medgain.wsi.slide import WSI_BACKENDS, ComputedLevels, Slide, SlideError, TiledTiffFileWSIReader, wsi_reader
from medgain.wsi.stain import RandHEDJitterd, hed_jitter
from medgain.wsi.tissue import TISSUE_DOWNSAMPLE, area_fraction, slide_tissue_mask, tissue_mask

__all__ = [
    "EXCLUSION_GROUPS",
    "LESION_COLUMNS",
    "MPP_TOLERANCE",
    "PATCH_COLUMNS",
    "SLIDE_SUFFIXES",
    "SPLITS",
    "TISSUE_DOWNSAMPLE",
    "WSI_BACKENDS",
    "Annotation",
    "AnnotationError",
    "ComputedLevels",
    "LesionPatchMaskd",
    "PatchIdd",
    "PatchReading",
    "RandHEDJitterd",
    "Slide",
    "SlideError",
    "SlideInferer",
    "SlideMaps",
    "TiledTiffFileWSIReader",
    "area_fraction",
    "balance_patches",
    "collect_slide_scores",
    "evaluate_inference",
    "grid_locations",
    "patch_items",
    "hed_jitter",
    "make_patch_dataset",
    "patch_datalist",
    "patch_table",
    "read_annotations",
    "read_patch_table",
    "read_slide_labels",
    "output_id",
    "run_inference",
    "scan_slides",
    "slide_tissue_mask",
    "slides_patch_table",
    "split_mpp",
    "split_slides",
    "split_slides_table",
    "tissue_mask",
    "tumour_mask",
    "wsi_reader",
    "write_patch_table",
    "write_slide_outputs",
]
