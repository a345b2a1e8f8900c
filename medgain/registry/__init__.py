"""medgain.registry: reviewing registered model versions, the promotion gate, partner packages and their
verification, and the PHI scan of what leaves the hospital."""

from medgain.registry.figures import (
    FPR_BUDGETS,
    REVIEW_BUDGETS,
    RecordArrays,
    bootstrap_figures,
    calibration,
    compare_figures,
    confusion,
    operating_table,
    point_figures,
    subgroup_figures,
)
from medgain.registry.gate import GateRule, PromotionRefused, check_gate, load_gate, load_review, promote
from medgain.registry.package import build_package, parse_model_ref, standalone_inference_config
from medgain.registry.layouts import DataLayout, DatalistLayout, DermoscopyLayout, PatchTableLayout, data_layout
from medgain.registry.phi import PHI_TAGS, dicom_identifiers, scan_for_identifiers, store_locations
from medgain.registry.records import FrameRecordWriter
from medgain.registry.report import render_report
from medgain.registry.review import (
    bundle_folder,
    evaluate_checkpoint,
    fetch_checkpoint,
    model_card,
    registry_client,
    resolve_version,
    review_model,
    sha256_file,
)
from medgain.registry.verify import (
    PackageVerificationError,
    load_private_key,
    load_public_key,
    public_key_id,
    verify_package,
)

__all__ = [
    "FPR_BUDGETS",
    "PHI_TAGS",
    "DataLayout",
    "DatalistLayout",
    "DermoscopyLayout",
    "PatchTableLayout",
    "REVIEW_BUDGETS",
    "FrameRecordWriter",
    "GateRule",
    "PackageVerificationError",
    "PromotionRefused",
    "RecordArrays",
    "bootstrap_figures",
    "build_package",
    "bundle_folder",
    "calibration",
    "check_gate",
    "compare_figures",
    "confusion",
    "data_layout",
    "dicom_identifiers",
    "evaluate_checkpoint",
    "fetch_checkpoint",
    "load_gate",
    "load_private_key",
    "load_public_key",
    "load_review",
    "model_card",
    "operating_table",
    "parse_model_ref",
    "point_figures",
    "promote",
    "public_key_id",
    "registry_client",
    "render_report",
    "resolve_version",
    "review_model",
    "scan_for_identifiers",
    "sha256_file",
    "standalone_inference_config",
    "store_locations",
    "subgroup_figures",
    "verify_package",
]
