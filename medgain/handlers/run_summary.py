"""Progress during an evaluation or inference run, and one summary of what it did when it ends."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medgain.handlers.utils import attach_once
from medgain.metrics.scores import score_to_probability
from medgain.model_file import load_operating_point
from medgain.outputs import write_atomic

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["RunSummary"]

logger = logging.getLogger(__name__)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


class RunSummary:
    """Logs the progress of an evaluation / inference engine and, when it completes, a summary of the run.

    Progress: a line each time another ``progress_percent`` % of the run's batches is done (batches, frames,
    seconds elapsed and left). Summary, at ``Events.COMPLETED``: the frames read; those decided (rows of
    ``predictions_filename`` with a decision) and, of them, flagged ill (decision 1); those refused (rows of
    ``errors_filename``, unreadable inputs and non-finite scores) with that file's path; the operating point
    used (threshold on the log-odds and as a probability, the false-alarm budget and what its rate is known to
    be); and the output folder. The same figures go to ``output_dir/summary_filename`` (JSON, written through a
    temporary file and a rename). Attach it after the handlers that write those files (handlers run in the
    order they are attached), e.g. last in a bundle's handler list. Without an engine (e.g. after whole-slide
    inference, which runs no Ignite engine), call :meth:`complete` alone: the items read are then the rows of the
    predictions file. A predictions file without a ``decision`` column is summarised as taking no decisions.

    Args:
        output_dir: the run's output folder, holding the predictions and errors files.
        name: what the run is, in the log lines (``"inference"``, ``"evaluation"``).
        checkpoint: the model file whose operating point is stated; None states none.
        predictions_filename: predictions CSV (columns ``decision``; empty = no decision).
        errors_filename: CSV of the refused inputs (one row each).
        summary_filename: JSON file of the summary, or None to only log it.
        progress_percent: progress step in percent of the run's batches, in (0, 100].
        unit: what one row / sample is, in the log lines (``"frames"``, ``"slides"``).
    """

    def __init__(
        self,
        output_dir: str,
        name: str = "inference",
        checkpoint: str | None = None,
        predictions_filename: str = "predictions.csv",
        errors_filename: str = "errors.csv",
        summary_filename: str | None = "run_summary.json",
        progress_percent: float = 10.0,
        unit: str = "frames",
    ) -> None:
        if not 0.0 < float(progress_percent) <= 100.0:
            raise ValueError(f"RunSummary: progress_percent must be in (0, 100], got {progress_percent}")
        self.output_dir = Path(output_dir)
        self.name = name
        self.checkpoint = checkpoint
        self.predictions_path = self.output_dir / predictions_filename
        self.errors_path = self.output_dir / errors_filename
        self.summary_path = None if summary_filename is None else self.output_dir / summary_filename
        self.progress_percent = float(progress_percent)
        self.unit = unit
        self.frames = 0
        self.summary: dict[str, Any] = {}
        self._started: float | None = None
        self._next_report = 0.0

    def attach(self, engine: Engine) -> None:
        """Count frames and log progress every iteration of ``engine``; summarise when it completes."""
        from ignite.engine import Events

        attach_once(
            engine,
            [(Events.STARTED, self.start), (Events.ITERATION_COMPLETED, self), (Events.COMPLETED, self.complete)],
        )

    def start(self, engine: Engine | None = None) -> None:
        """Reset the counts and the clock."""
        self.frames = 0
        self.summary = {}
        self._started = time.monotonic()
        self._next_report = self.progress_percent

    def __call__(self, engine: Engine) -> None:
        """Count the frames of one batch; log the progress when another step is done."""
        self.frames += self._batch_size(engine)
        total = engine.state.epoch_length
        if not total:
            return
        done = engine.state.iteration - (engine.state.epoch - 1) * total
        percent = 100.0 * done / total
        if percent + 1e-9 < self._next_report:
            return
        while self._next_report <= percent + 1e-9:
            self._next_report += self.progress_percent
        elapsed = time.monotonic() - (self._started or time.monotonic())
        left = elapsed * (total - done) / done if done else math.nan
        logger.info(
            "%s: %d / %d batches (%.0f %%), %d %s, %.1f s elapsed, about %.0f s left",
            self.name, done, total, percent, self.frames, self.unit, elapsed, left,
        )

    @staticmethod
    def _batch_size(engine: Engine) -> int:
        output = engine.state.output
        pred = output.get("pred") if isinstance(output, dict) else None
        if isinstance(pred, torch.Tensor):
            return int(pred.shape[0])
        batch = engine.state.batch
        image = batch.get("image") if isinstance(batch, dict) else None
        return int(image.shape[0]) if isinstance(image, torch.Tensor) else 0

    def _operating_point(self) -> dict[str, Any]:
        if self.checkpoint is None:
            return {"text": "none given"}
        try:
            point = load_operating_point(self.checkpoint)
        except ValueError as err:
            return {"text": f"none ({err})"}
        threshold = point.get("threshold")
        if threshold is None or not math.isfinite(float(threshold)):
            reason = point.get("reason") or "validation gave no finite threshold"
            return {"threshold": None, "text": f"none ({reason}): no decisions taken"}
        probability = float(score_to_probability(float(threshold)))
        text = f"log-odds >= {float(threshold):.6g} (p(ill) >= {probability:.4g})"
        if point.get("max_fpr") is not None:
            text += f", chosen on validation for a false-alarm rate <= {float(point['max_fpr']):g}"
        if point.get("statement"):
            text += f"; {point['statement']}"
        return {"threshold": float(threshold), "probability": probability, "max_fpr": point.get("max_fpr"),
                "text": text}

    def complete(self, engine: Engine | None = None) -> dict[str, Any]:
        """Log the summary (and write its JSON file).

        Returns:
            ``{"unit", "frames_read", "decided", "flagged", "refused", "errors_file", "operating_point",
            "output_dir"}``; ``decided`` and ``flagged`` are None when the predictions file has no decision column.

        Raises:
            OSError: naming the summary file when it cannot be written.
        """
        rows = _csv_rows(self.predictions_path)
        with_decisions = bool(rows) and "decision" in rows[0]
        decided = [row for row in rows if (row.get("decision") or "") != ""]
        flagged = sum(1 for row in decided if row["decision"] == "1")
        refused = len(_csv_rows(self.errors_path))
        read = self.frames if self._started is not None else len(rows)
        point = self._operating_point()
        self.summary = {
            "unit": self.unit,
            "frames_read": read,
            "decided": len(decided) if with_decisions or not rows else None,
            "flagged": flagged if with_decisions or not rows else None,
            "refused": refused,
            "errors_file": str(self.errors_path) if self.errors_path.is_file() else None,
            "operating_point": point,
            "output_dir": str(self.output_dir),
        }
        refused_text = f"{refused} refused" + (f" (listed in {self.errors_path})" if refused else "")
        if self.summary["decided"] is None:
            decided_text = f"no decisions ({self.predictions_path.name} has no decision column)"
        else:
            decided_text = f"{len(decided)} decided ({flagged} flagged ill)"
        logger.info(
            "%s finished: %d %s read, %s, %s; operating point: %s; outputs in %s",
            self.name, read, self.unit, decided_text, refused_text, point["text"], self.output_dir,
        )
        if self.summary_path is not None:
            content = json.dumps(self.summary, indent=2).encode()
            write_atomic(self.summary_path, lambda f: f.write(content))
        return self.summary
