"""medgain.study: grids of bundle configurations × seeds (× data variants), run through ``monai.bundle run`` and
reported with bootstrap confidence intervals (``medgain study run|report``), with the marker-reliance probe of a
shortcut study."""

from medgain.study.report import (
    MetricDef,
    RunData,
    bootstrap_gap_closed,
    bootstrap_mean,
    bootstrap_paired_difference,
    load_runs,
    metric_value,
    probe_metrics,
    study_metrics,
    write_report,
)
from medgain.study.probe import PROBE_FILE, marker_attention, probe_frames, run_marker_probe
from medgain.study.runner import RESULT_FILE, RunOutcome, default_workers, prepare_data, run_study, study_parent_run
from medgain.study.spec import VARIANT_SEPARATOR, RunKey, StudySpec, load_study

__all__ = [
    "PROBE_FILE",
    "RESULT_FILE",
    "VARIANT_SEPARATOR",
    "MetricDef",
    "RunData",
    "RunKey",
    "RunOutcome",
    "StudySpec",
    "bootstrap_gap_closed",
    "bootstrap_mean",
    "bootstrap_paired_difference",
    "default_workers",
    "load_runs",
    "load_study",
    "marker_attention",
    "metric_value",
    "prepare_data",
    "probe_frames",
    "probe_metrics",
    "run_marker_probe",
    "run_study",
    "study_metrics",
    "study_parent_run",
    "write_report",
]
