"""One self-contained HTML page per study when inference completes (:mod:`medgain.reports.study`)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medgain.handlers.utils import attach_once
from medgain.model_file import load_checkpoint, load_operating_point
from medgain.reports.study import DEFAULT_TOP_K, StudyIndex, write_study_reports

if TYPE_CHECKING:
    from ignite.engine import Engine

    from medgain.handlers.heatmap_writer import HeatmapWriter

__all__ = ["StudyReportWriter"]

logger = logging.getLogger(__name__)


def model_words(checkpoint: str | Path) -> str:
    """The model of a model file in words: its registered name and version when it has them, its epoch, and the
    first 12 hex digits of the file's SHA-256 (which names the exact weights)."""
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    saved = load_checkpoint(checkpoint)
    saved = saved if isinstance(saved, Mapping) else {}
    provenance = saved.get("provenance") or {}
    name = (f"{provenance['model_name']} version {provenance['model_version']}"
            if provenance.get("model_name") and provenance.get("model_version") else "unregistered model")
    epoch = f", epoch {saved['epoch']}" if saved.get("epoch") is not None else ""
    return f"{name}{epoch}, file sha256 {digest.hexdigest()[:12]}"


class StudyReportWriter:
    """Writes ``output_dir/studies/<study>/study_report.html`` for each study when the engine completes.

    Reads what the other handlers wrote (attach it after :class:`~medgain.handlers.PredictionCSVWriter` and
    :class:`~medgain.handlers.HeatmapWriter`): the predictions file, the errors file and the overlay PNGs. Each
    page is self-contained (overlays embedded); see :mod:`medgain.reports.study` for what it shows and how frames
    map to studies.

    Args:
        output_dir: the run's output folder.
        studies: the study of each input file (:class:`~medgain.reports.StudyIndex` of the inference items).
        checkpoint: the model file (its version and operating point are stated).
        heatmap_writer: the run's heatmap writer, whose overlays are embedded; None embeds none.
        top_k: frames shown as the most suspicious of a study without a flagged frame.
        max_images: overlays embedded per page at most.
    """

    def __init__(
        self,
        output_dir: str,
        studies: StudyIndex,
        checkpoint: str,
        heatmap_writer: HeatmapWriter | None = None,
        top_k: int = DEFAULT_TOP_K,
        max_images: int = 120,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.studies = studies
        self.checkpoint = checkpoint
        self.heatmap_writer = heatmap_writer
        self.top_k = top_k
        self.max_images = max_images
        self.pages: dict[str, Path] = {}

    def attach(self, engine: Engine) -> None:
        """Write the pages when ``engine`` completes."""
        from ignite.engine import Events

        attach_once(engine, [(Events.COMPLETED, self)])

    def _overlay(self, file: str, frame: int) -> Path | None:
        writer = self.heatmap_writer
        if writer is None:
            return None
        path = writer.output_dir / f"{writer.file_stem(file)}_f{frame}.png"
        return path if path.is_file() else None

    def __call__(self, engine: Engine | None = None) -> dict[str, Path]:
        """Write the page of every study; returns them by study name.

        Raises:
            ValueError: naming the predictions file when it is malformed.
            OSError: naming a page that cannot be written.
        """
        try:
            point: dict[str, Any] | None = load_operating_point(self.checkpoint)
        except ValueError:
            point = None
        if point is not None and point.get("threshold") is None:
            point = None
        self.pages = write_study_reports(
            self.output_dir, self.studies, model_words(self.checkpoint), point, self._overlay,
            top_k=self.top_k, max_images=self.max_images,
        )
        logger.info("study reports: %d page(s) under %s", len(self.pages), self.output_dir / "studies")
        return self.pages
