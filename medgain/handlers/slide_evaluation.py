"""Slide-level evaluation at the end of a patch evaluation: slide inference, slide AUC and FROC, review images."""

from __future__ import annotations

import csv
import logging
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medgain.data.phi import study_ref
from medgain.handlers.utils import attach_once, log_artifact
from medgain.metrics import CAMELYON_FP_RATES
from medgain.model_file import load_operating_point
from medgain.wsi.evaluate import evaluate_inference, slide_operating_point
from medgain.wsi.inference import SlideInferer, collect_slide_scores, output_id, run_inference

if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

__all__ = ["LOGGED_SLIDE_COLUMNS", "SlideEvaluation"]

logger = logging.getLogger(__name__)

_REVIEW_FILES = ("thumbnail.png", "probability_overlay.png", "attention_overlay.png", "lesions.csv")
#: columns of the ``slides.csv`` logged to MLflow (no slide id, no path)
LOGGED_SLIDE_COLUMNS = ("ref", "label", "score", "probability", "n_patches", "n_lesions", "mpp")


class SlideEvaluation:
    """At ``Events.COMPLETED`` of an evaluator: runs the evaluated network over whole slides and scores them.

    Every slide goes through ``inferer`` (:class:`~medgain.wsi.SlideInferer`, built on the evaluator's network)
    into ``output_dir/<slide id>/`` with :func:`~medgain.wsi.run_inference` (failed slides are rows of
    ``output_dir/errors.csv``); ``output_dir/slides.csv`` lists the slide scores. The folder is emptied first,
    so that no output of an earlier model is counted, unless ``resume`` (finished slides are then kept). Slide
    AUC and Camelyon16 FROC (:func:`~medgain.wsi.evaluate_inference`) are added to ``engine.state.metrics`` as
    ``<prefix>slide_auc``, ``<prefix>froc``, ``<prefix>froc_sensitivity_at_<rate>``, ``<prefix>n_slides``,
    ``<prefix>n_missing`` (failed slides), ``<prefix>n_tumours`` and ``<prefix>n_froc_slides``; attach
    :class:`~medgain.handlers.MetricsJSONWriter` after this handler to write and log them. What a figure cannot
    mean (no countable tumour, failed slides) goes into ``engine.state.metric_notes``, failed slides named by
    their pseudonym.

    With ``checkpoint`` the slides are also decided at the model's stored operating point
    (:func:`~medgain.wsi.evaluate.slide_operating_point`): ``<prefix>slide_sensitivity``,
    ``<prefix>slide_specificity``, ``<prefix>slide_false_alarms``, ``<prefix>slide_fpr_upper`` (the normal-slide
    false-alarm rate its patch bound allows) and ``<prefix>slide_fpr_above_bound`` (1.0, with a warning and a
    note, when more normal slides are flagged than that).

    What reaches MLflow names no slide and no path (slide ids and file names can name patients): a slide is
    referred to by its salted pseudonym ``study_ref(slide id)`` (:mod:`medgain.data.phi`; the ``s-…`` names of
    the slides in ``medgain review``). With an MLflow handler, ``artifact_path/slides.csv``
    (:data:`LOGGED_SLIDE_COLUMNS`), ``artifact_path/errors.csv`` (``ref``, and the error's type only: its
    message may quote the path) and each slide's thumbnail, probability and attention overlays and lesions
    (coordinates) under ``artifact_path/<ref>/`` are logged. The local ``slides.csv``, ``errors.csv`` and
    per-slide folders of ``output_dir`` keep the slide ids and paths and are not logged.

    Args:
        slides: rows with ``slide`` (id), ``image`` (path), ``label`` (0/1) and ``annotation`` (path or ""), e.g.
            :func:`medgain.wsi.split_slides_table`.
        inferer: the configured slide inferer (its network is the evaluated one).
        output_dir: folder of the slide outputs.
        mlflow_handler: the MONAI ``MLFlowHandler`` owning the run, or None to only write files.
        prefix: prepended to the metric names.
        artifact_path: MLflow artifact folder.
        thumbnail_downsample: downsample of the level the overlays are drawn on.
        mask_downsample: level-0 pixels per pixel of the rasterised tumour masks (FROC).
        fp_rates: false positives per slide at which FROC averages the sensitivity.
        dilation_um: the Camelyon16 expansion of the tumours (75 µm: regions reach ``dilation_um / 2`` beyond them).
        itc_um: the Camelyon16 ITC size (200 µm): lesions whose region's major axis is under ``itc_um + dilation_um``
            are isolated tumour cells, neither hits nor false positives (see :func:`medgain.metrics.froc`).
        resume: keep the finished slides of an interrupted evaluation of the same model.
        checkpoint: model file whose operating point decides the slides; None for none.
    """

    def __init__(
        self,
        slides: Sequence[Mapping[str, Any]],
        inferer: SlideInferer,
        output_dir: str,
        mlflow_handler: MLFlowHandler | None = None,
        prefix: str = "test_",
        artifact_path: str = "slides",
        thumbnail_downsample: float = 32.0,
        mask_downsample: float = 16.0,
        fp_rates: Sequence[float] = CAMELYON_FP_RATES,
        dilation_um: float = 75.0,
        itc_um: float = 200.0,
        resume: bool = False,
        checkpoint: str | None = None,
    ) -> None:
        missing = [i for i, s in enumerate(slides) if not {"slide", "image", "label"} <= set(s)]
        if missing:
            raise ValueError(f"SlideEvaluation: slides {missing} lack 'slide', 'image' or 'label'")
        if not slides:
            raise ValueError("SlideEvaluation: no slides to evaluate")
        self.slides = [dict(s) for s in slides]
        self.inferer = inferer
        self.output_dir = Path(output_dir)
        self.mlflow_handler = mlflow_handler
        self.prefix = prefix
        self.artifact_path = artifact_path
        self.thumbnail_downsample = float(thumbnail_downsample)
        self.mask_downsample = float(mask_downsample)
        self.fp_rates = tuple(float(r) for r in fp_rates)
        self.dilation_um = float(dilation_um)
        self.itc_um = float(itc_um)
        self.resume = bool(resume)
        self.checkpoint = checkpoint
        self.metrics: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        """Evaluate the slides when ``engine`` completes."""
        from ignite.engine import Events

        attach_once(engine, [(Events.COMPLETED, self)])

    def __call__(self, engine: Engine) -> None:
        """Infer the slides, compute the slide metrics and log the review files."""
        if not self.resume and self.output_dir.exists():
            shutil.rmtree(self.output_dir)
        summary = run_inference(
            [s["image"] for s in self.slides],
            self.output_dir,
            self.inferer,
            thumbnail_downsample=self.thumbnail_downsample,
            annotations=[s.get("annotation") or None for s in self.slides],  # outlined on the overlays
        )
        records = collect_slide_scores(self.output_dir)
        result = evaluate_inference(
            self.output_dir,
            self.slides,
            mask_downsample=self.mask_downsample,
            fp_rates=self.fp_rates,
            dilation_um=self.dilation_um,
            itc_um=self.itc_um,
        )
        notes = dict(getattr(engine.state, "metric_notes", None) or {})
        if self.checkpoint is not None:
            labels = {output_id(s["image"]): int(s["label"]) for s in self.slides}
            decided = [r for r in records if r["slide"] in labels]
            point = load_operating_point(self.checkpoint)
            figures, note = slide_operating_point(
                [float(r["score"]) for r in decided], [labels[r["slide"]] for r in decided],
                [int(r.get("n_patches", 0)) for r in decided], point,
            )
            result = {**result, **figures}
            notes.pop(f"{self.prefix}slide_fpr_above_bound", None)
            if note:
                notes[f"{self.prefix}slide_fpr_above_bound"] = note
                logger.warning("%s: %s", self.checkpoint, note)
        self.metrics = {f"{self.prefix}{name}": float(value) for name, value in result.items()}
        engine.state.metrics.update(self.metrics)
        if math.isnan(result["froc"]):
            notes[f"{self.prefix}froc"] = "no annotated tumour (above the ITC size) among the evaluated slides"
        if summary["failed"]:
            notes[f"{self.prefix}n_missing"] = (
                f"{len(summary['failed'])} slides failed "
                f"({', '.join(study_ref(self._slide_id(s)) for s in summary['failed'])}); see "
                "errors.csv of the local slide output folder"
            )
        engine.state.metric_notes = notes
        logger.info(
            "slides: %d evaluated, %d failed; slide AUC %.4f, FROC %.4f",
            len(records),
            len(summary["failed"]),
            result["slide_auc"],
            result["froc"],
        )
        if self.mlflow_handler is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for path in self._pseudonymised_tables(records, Path(tmp)):
                log_artifact(self.mlflow_handler, path, self.artifact_path)
        for record in records:
            folder, ref = self.output_dir / record["slide"], study_ref(self._slide_id(record["slide"]))
            for name in _REVIEW_FILES:
                if (folder / name).is_file():
                    log_artifact(self.mlflow_handler, folder / name, f"{self.artifact_path}/{ref}")

    def _slide_id(self, output: str) -> str:
        """The slide id of an output folder of :func:`~medgain.wsi.run_inference` (named by the slide's file)."""
        return next((str(s["slide"]) for s in self.slides if output_id(s["image"]) == output), output)

    def _pseudonymised_tables(self, records: Sequence[Mapping[str, Any]], folder: Path) -> list[Path]:
        """Write into ``folder`` the copies of ``slides.csv`` and ``errors.csv`` that go to MLflow."""
        labels = {output_id(s["image"]): s["label"] for s in self.slides}
        slides = folder / "slides.csv"
        with slides.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=LOGGED_SLIDE_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for record in records:
                writer.writerow({**record, "ref": study_ref(self._slide_id(record["slide"])),
                                 "label": labels.get(record["slide"], "")})
        written = [slides]
        local_errors = self.output_dir / "errors.csv"
        if local_errors.is_file():
            with local_errors.open(newline="") as fh:
                failed = list(csv.DictReader(fh))
            errors = folder / "errors.csv"
            with errors.open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["ref", "error"])
                writer.writerows([study_ref(self._slide_id(row["slide"])), row["error"].split(":", 1)[0]]
                                 for row in failed)
            written.append(errors)
        return written
