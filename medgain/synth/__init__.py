"""medgain.synth: synthetic data sets with known lesion masks, one generator a module."""

from medgain.synth.capsule import LESION_KINDS, make_capsule_dataset, make_capsule_frame, make_capsule_frame_lesions
from medgain.synth.dermoscopy import DERMOSCOPY_CSV_COLUMNS, make_dermoscopy_dataset, make_dermoscopy_image
from medgain.synth.wsi import WSI_COMPRESSIONS, SlideSpec, make_wsi_dataset, make_wsi_slide, write_asap_xml, write_geojson, write_pyramidal_tiff
from medgain.synth.patterns import PATTERN_KINDS, make_pattern_dataset, make_pattern_image

__all__ = [
    "WSI_COMPRESSIONS",
    "SlideSpec",
    "make_wsi_dataset",
    "make_wsi_slide",
    "write_asap_xml",
    "write_geojson",
    "write_pyramidal_tiff",
    "DERMOSCOPY_CSV_COLUMNS",
    "make_dermoscopy_dataset",
    "make_dermoscopy_image",
    "LESION_KINDS",
    "PATTERN_KINDS",
    "make_capsule_dataset",
    "make_capsule_frame",
    "make_capsule_frame_lesions",
    "make_pattern_dataset",
    "make_pattern_image",
]
