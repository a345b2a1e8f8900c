"""Inference output of the glimpse model: a CSV row per image with every glimpse, and the overlay PNGs."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
import torch
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError

from medgain.data.phi import frame_ref
from medgain.handlers.glimpse_overlay import draw_glimpses, glimpse_boxes
from medgain.handlers.prediction_writer import PredictionCSVWriter
from medgain.handlers.utils import batch_has, class_indices, log_artifact, require_keys, sample_ids
from medgain.metrics.scores import positive_score, score_to_probability, stack_output
from medgain.outputs import write_atomic, write_csv_atomic

if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

__all__ = ["GlimpsePredictionWriter"]


def _source_scale(path: str, height: int, width: int) -> tuple[float, float]:
    """Source-image pixels per network-input pixel, along x and y, from the file header (PIL or DICOM)."""
    try:
        with Image.open(path) as img:
            source_w, source_h = img.size
    except (UnidentifiedImageError, OSError):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            source_h, source_w = int(header.Rows), int(header.Columns)
        except (InvalidDicomError, OSError, AttributeError) as err:
            raise ValueError(f"{path}: cannot read the image size from the file header ({err})") from err
    return source_w / width, source_h / height


class GlimpsePredictionWriter(PredictionCSVWriter):
    """Writes ``output_dir/filename`` with one row per image and ``output_dir/glimpses/<stem>_f<frame>.png``.

    A :class:`~medgain.handlers.prediction_writer.PredictionCSVWriter` (same threshold handling and columns)
    with the glimpses added. Columns: ``file, frame, score, probability, decision[, label]``, then for each
    glimpse ``t`` (in order)
    ``glimpse<t>_x, glimpse<t>_y, glimpse<t>_width, glimpse<t>_height``: centre and extent of the glimpse in
    pixels of the source image (``coordinates="source"``: its size read from the file header; the network may have
    read a resized copy, where the glimpse is a square of ``scale`` times the shorter side) or of the network
    input (``coordinates="input"``: for patches cut from a larger file, e.g. whole-slide patch tables). ``score`` is the
    log-odds of being ill (:func:`~medgain.metrics.scores.positive_score`), ``probability`` its sigmoid,
    ``decision`` 1 when ``score >= threshold``; the threshold is ``threshold`` or the operating point of
    ``checkpoint`` — a checkpoint without one gets an empty decision column and a logged error. The overlay shows
    the image the network read with the glimpses drawn in order
    (:func:`~medgain.handlers.glimpse_overlay.draw_glimpses`).

    Args:
        output_dir: folder of the CSV file and of ``glimpses/``; created when missing.
        filename: CSV file name.
        threshold: decision threshold on the log-odds; exclusive with ``checkpoint``.
        checkpoint: a :class:`~medgain.handlers.BestModelSaver` checkpoint whose operating point gives the
            threshold; exclusive with ``threshold``.
        overlays: also write the overlay PNGs.
        path_key: batch key of the source file paths.
        frame_key: batch key of the frame indices.
        label_key: batch key of the class indices (0 = normal), written when present.
        mlflow_handler: the MONAI ``MLFlowHandler`` owning the run, or None to only write files.
        coordinates: "source" (pixels of the source file) or "input" (pixels of the network input).

    Raises:
        ValueError: for another ``coordinates``.
    """

    def __init__(
        self,
        output_dir: str,
        filename: str = "predictions.csv",
        threshold: float | None = None,
        checkpoint: str | None = None,
        overlays: bool = True,
        path_key: str = "image_path",
        frame_key: str = "frame",
        label_key: str = "label",
        mlflow_handler: MLFlowHandler | None = None,
        coordinates: str = "source",
    ) -> None:
        super().__init__(output_dir, filename, threshold, checkpoint, path_key, frame_key, label_key, mlflow_handler)
        if coordinates not in ("source", "input"):
            raise ValueError(f"GlimpsePredictionWriter: coordinates must be 'source' or 'input', got {coordinates!r}")
        self.output_dir = Path(output_dir)
        self.overlays = overlays
        self.coordinates = coordinates

    def __call__(self, engine: Engine) -> None:
        """Buffer the rows of one batch and write its overlays."""
        batch, output = engine.state.batch, engine.state.output
        ids = sample_ids(batch, self.path_key, self.frame_key, "GlimpsePredictionWriter")
        require_keys(output, ("pred", "image", "glimpse_centers", "glimpse_scales"), "GlimpsePredictionWriter")
        logits, images, centers, scales = stack_output(output, ("pred", "image", "glimpse_centers", "glimpse_scales"))
        scores = positive_score(logits).cpu().tolist()
        if len(scores) != len(ids):
            raise ValueError(f"GlimpsePredictionWriter: {len(scores)} predictions for {len(ids)} batch entries")
        labels: list[int | None] = [None] * len(ids)
        if batch_has(batch, self.label_key):
            labels = class_indices(stack_output(batch, (self.label_key,))[0]).to(torch.int64).tolist()
        height, width = images.shape[-2:]
        for i, ((path, frame), score, label) in enumerate(zip(ids, scores, labels)):
            decision = None if self.threshold is None else int(score >= self.threshold)
            sx, sy = _source_scale(path, height, width) if self.coordinates == "source" else (1.0, 1.0)
            boxes = [
                ((x + 0.5) * sx - 0.5, (y + 0.5) * sy - 0.5, side * sx, side * sy)
                for x, y, side in glimpse_boxes(centers[i], scales[i], height, width)
            ]
            self.rows.append((path, frame, score, decision, label, boxes))  # type: ignore[arg-type]
            if self.overlays:
                folder = self.output_dir / "glimpses"
                folder.mkdir(parents=True, exist_ok=True)
                overlay = draw_glimpses(images[i], centers[i], scales[i])
                write_atomic(folder / f"{Path(path).stem}_f{frame}.png", lambda f, im=overlay: im.save(f, format="PNG"))

    def write(self, engine: Engine | None = None) -> Path:
        """Write the CSV file whole or not at all (frames with a non-finite score go to the errors file, with no
        decision), then log a copy keyed by pseudonyms; returns its path.

        Raises:
            OSError: naming the file that cannot be written; an earlier file under that name is intact.
        """
        refused = [row for row in self.rows if not math.isfinite(row[2])]
        self.rows = [row for row in self.rows if math.isfinite(row[2])]
        if refused:
            self._add_errors([self._non_finite(row[0], row[1], row[2]) for row in refused])
        self._write_table(self.output_path, pseudonymise=False)
        if self.mlflow_handler is not None:
            with tempfile.TemporaryDirectory() as tmp:
                logged = Path(tmp) / self.output_path.name
                self._write_table(logged, pseudonymise=True)
                log_artifact(self.mlflow_handler, logged, None)
        return self.output_path

    def _write_table(self, path: Path, pseudonymise: bool) -> None:
        with_labels = any(row[4] is not None for row in self.rows)
        glimpses = max((len(row[5]) for row in self.rows), default=0)
        header = ["ref" if pseudonymise else "file", "frame", "score", "probability", "decision"]
        header += ["label"] if with_labels else []
        header += [f"glimpse{t}_{k}" for t in range(glimpses) for k in ("x", "y", "width", "height")]
        rows = []
        for source, frame, score, decision, label, boxes in self.rows:
            name = frame_ref(source, frame) if pseudonymise else source
            row = [name, frame, repr(score), f"{float(score_to_probability(score)):.6g}"]
            row.append("" if decision is None else decision)
            row += ["" if label is None else label] if with_labels else []
            rows.append(row + [f"{v:.2f}" for box in boxes for v in box])
        write_csv_atomic(path, header, rows)
