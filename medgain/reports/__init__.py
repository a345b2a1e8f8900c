"""medgain.reports: what a physician opens after inference, one self-contained HTML page per study."""

from medgain.reports.study import (
    DEFAULT_TOP_K,
    Finding,
    FrameResult,
    StudyIndex,
    StudyReport,
    build_study_report,
    flagged_runs,
    render_study_report,
    score_plot_svg,
    write_study_reports,
)

__all__ = [
    "DEFAULT_TOP_K",
    "Finding",
    "FrameResult",
    "StudyIndex",
    "StudyReport",
    "build_study_report",
    "flagged_runs",
    "render_study_report",
    "score_plot_svg",
    "write_study_reports",
]
