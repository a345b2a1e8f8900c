"""medgain.study: grids of bundle configurations × seeds, run through ``monai.bundle run`` and reported with
bootstrap confidence intervals (``medgain study run|report``)."""

from medgain.study.report import (
    MetricDef,
    RunData,
    bootstrap_gap_closed,
    bootstrap_mean,
    bootstrap_paired_difference,
    load_runs,
    metric_value,
    study_metrics,
    write_report,
)
from medgain.study.runner import RESULT_FILE, RunOutcome, default_workers, prepare_data, run_study, study_parent_run
from medgain.study.spec import RunKey, StudySpec, load_study

__all__ = [
    "RESULT_FILE",
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
    "metric_value",
    "prepare_data",
    "run_study",
    "study_metrics",
    "study_parent_run",
    "write_report",
]
