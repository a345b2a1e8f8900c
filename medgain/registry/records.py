"""Per-frame records of an evaluation for the reviewer's report: score, label, attention localisation, and the
frames of the gallery (most confident true positives, missed positives, most confident false alarms)."""

from __future__ import annotations

import csv
import heapq
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from skimage.segmentation import find_boundaries

from medgain.attention_fov import attention_outside_fov, attention_peak_outside_fov, fov_display_scale
from medgain.data.phi import frame_ref
from medgain.handlers.utils import attach_once, batch_has, require_keys, sample_ids
from medgain.metrics import attention_in_mask, attention_iou, binary_labels, positive_score, stack_output
from medgain.metrics.scores import score_to_probability
from medgain.model_file import load_operating_point
from medgain.visualize import cam_overlay, to_display_rgb

if TYPE_CHECKING:
    from ignite.engine import Engine

    from medgain.attention_fov import FieldOfView

__all__ = ["FrameRecordWriter", "GALLERY_KINDS", "RECORD_COLUMNS"]

#: columns of ``records.csv`` (``file`` stays local: the report names frames by ``ref``)
RECORD_COLUMNS = (
    "ref", "file", "frame", "label", "score", "iou", "attention_in_mask", "attention_outside_fov", "peak_outside_fov"
)
#: gallery categories: (name, label, above threshold, order: +1 highest scores first, -1 lowest first)
GALLERY_KINDS = (("true_positive", 1, True, 1), ("false_negative", 1, False, -1), ("false_positive", 0, True, 1))


class FrameRecordWriter:
    """Attached to an evaluator whose inferer yields ``cam`` (:class:`~medgain.handlers.GradCamInferer`): one
    record per frame, and the gallery frames, written at ``Events.COMPLETED``.

    Writes under ``output_dir``: ``records.csv`` (:data:`RECORD_COLUMNS`; ``iou`` / ``attention_in_mask`` empty
    for frames without a real lesion mask; ``attention_outside_fov`` (fraction of the Grad-CAM mass outside the
    field of view) and ``peak_outside_fov`` (1 when the map's maximum lies outside it) empty without ``fov``),
    ``gallery.json`` (per category the frames shown: ref, score, probability, IoU; the common colour ``scale`` and
    how it was set) and ``gallery/<ref>.png`` (the frame and its Grad-CAM overlay with the lesion contour in white
    and the field of view's boundary in grey, side by side, without any text burned in). Every overlay uses ONE
    colour scale: 0 to the largest Grad-CAM value of the gallery's frames inside their field of view. The gallery
    keeps, at the operating point of ``checkpoint``, the ``gallery_size`` most confident true positives, the
    ``gallery_size`` most confidently missed positives and the ``gallery_size`` most confident false positives;
    only those frames are kept in memory.

    Args:
        output_dir: folder of the outputs; created when missing.
        checkpoint: model file whose operating point splits the gallery; without a finite threshold the
            log-odds 0 (p = 0.5) is used and ``gallery.json`` says so.
        gallery_size: frames per gallery category.
        cam_key: output key of the raw Grad-CAM maps (B, 1, H, W).
        display_size: side of the rendered gallery panels in pixels.
        fov: finds the frames' field of view; None: the whole frame, no field-of-view columns.
    """

    def __init__(
        self,
        output_dir: str,
        checkpoint: str,
        gallery_size: int = 8,
        cam_key: str = "cam",
        display_size: int = 160,
        fov: FieldOfView | None = None,
    ) -> None:
        if gallery_size < 0:
            raise ValueError(f"FrameRecordWriter: gallery_size must be >= 0, got {gallery_size}")
        self.output_dir = Path(output_dir)
        self.checkpoint = checkpoint
        self.gallery_size = gallery_size
        self.cam_key = cam_key
        self.display_size = display_size
        self.fov = fov
        self.rows: list[dict[str, Any]] = []
        self.heaps: dict[str, list[tuple[float, int, dict[str, Any]]]] = {}
        self.threshold = 0.0
        self.threshold_note = ""

    def attach(self, engine: Engine) -> None:
        """Record every iteration of ``engine`` and write the outputs when it completes."""
        from ignite.engine import Events

        attach_once(
            engine,
            [(Events.STARTED, self.start), (Events.ITERATION_COMPLETED, self), (Events.COMPLETED, self.write)],
        )

    def start(self, engine: Engine | None = None) -> None:
        """Forget earlier records and read the operating point."""
        self.rows, self.heaps = [], {name: [] for name, *_ in GALLERY_KINDS}
        point = load_operating_point(self.checkpoint)
        value = point.get("threshold")
        if value is None or not math.isfinite(float(value)):
            self.threshold, self.threshold_note = 0.0, "the model has no operating point: split at p = 0.5"
        else:  # the statement says what the stored point's false-alarm rate is known to be
            self.threshold = float(value)
            self.threshold_note = f"split at the stored operating point, {point['statement']}"

    def __call__(self, engine: Engine) -> None:
        """Record the batch's frames and keep the gallery candidates."""
        output = engine.state.output
        require_keys(output, ("image", "label", "pred", self.cam_key), "FrameRecordWriter (needs GradCamInferer)")
        image, label, pred, cam = stack_output(output, ("image", "label", "pred", self.cam_key))
        ill = binary_labels(label).tolist()
        scores = positive_score(pred).tolist()
        ids = sample_ids(engine.state.batch, "image_path", "frame", "FrameRecordWriter")
        real = torch.zeros(len(ids), dtype=torch.bool)
        mask = torch.zeros_like(cam)
        if batch_has(output, "mask"):
            mask = stack_output(output, ("mask",))[0].float().reshape(cam.shape).to(cam.device)
            real = (mask.flatten(1) > 0.5).any(1).cpu()
            if batch_has(output, "has_mask"):
                real &= stack_output(output, ("has_mask",))[0].reshape(-1).bool().cpu()
        cam = cam.detach().float()
        iou = attention_iou(cam, mask).cpu().tolist()
        inside = attention_in_mask(cam.clamp_min(0), mask).cpu().tolist()
        fov = None if self.fov is None else self.fov(image.detach().cpu()).to(cam.device)
        outside = [None] * len(ids) if fov is None else attention_outside_fov(cam, fov).cpu().tolist()
        peak = [None] * len(ids) if fov is None else attention_peak_outside_fov(cam, fov).cpu().int().tolist()
        for i, ((path, frame), is_ill, score) in enumerate(zip(ids, ill, scores)):
            has = bool(real[i]) and bool(is_ill)
            row = {
                "ref": frame_ref(path, frame),
                "file": path,
                "frame": frame,
                "label": int(is_ill),
                "score": float(score),
                "iou": iou[i] if has else None,
                "attention_in_mask": inside[i] if has else None,
                "attention_outside_fov": outside[i],
                "peak_outside_fov": peak[i],
            }
            self.rows.append(row)
            frame_fov = None if fov is None else fov[i, 0]
            self._offer(row, image[i], cam[i, 0], mask[i].reshape(cam.shape[-2:]) if has else None, frame_fov)

    def _offer(
        self,
        row: dict[str, Any],
        image: torch.Tensor,
        cam: torch.Tensor,
        mask: torch.Tensor | None,
        fov: torch.Tensor | None,
    ) -> None:
        above = row["score"] >= self.threshold
        for name, label, want_above, order in GALLERY_KINDS:
            if row["label"] != label or above != want_above or self.gallery_size == 0:
                continue
            heap = self.heaps[name]
            key = (order * row["score"], len(self.rows))
            if len(heap) >= self.gallery_size and key <= heap[0][:2]:
                return
            kept = {"row": row, "image": image.detach().cpu().clone(), "cam": cam.detach().cpu().clone()}
            kept["mask"] = None if mask is None else mask.detach().cpu().clone()
            kept["fov"] = None if fov is None else fov.detach().cpu().clone()
            entry = (*key, kept)
            (heapq.heapreplace if len(heap) >= self.gallery_size else heapq.heappush)(heap, entry)

    def _panel(self, kept: dict[str, Any], scale: float) -> np.ndarray:
        overlay = cam_overlay(kept["image"], (kept["cam"] / scale).clamp(0, 1))
        overlay = np.asarray(overlay, dtype=np.float64) / 255.0  # cam_overlay: uint8
        if kept["fov"] is not None and not bool(kept["fov"].all()):
            overlay[find_boundaries(kept["fov"].numpy(), mode="inner")] = 0.6
        if kept["mask"] is not None:
            edge = find_boundaries(kept["mask"].numpy() > 0.5, mode="inner")
            overlay[edge] = 1.0
        frame = np.asarray(to_display_rgb(kept["image"]), dtype=np.float64)  # float in [0, 1]
        both = np.concatenate([frame, np.ones((frame.shape[0], 2, 3)), overlay], axis=1)
        pil = Image.fromarray((both.clip(0, 1) * 255).round().astype(np.uint8))
        height = self.display_size
        return np.asarray(pil.resize((round(pil.width * height / pil.height), height), Image.Resampling.NEAREST))

    def write(self, engine: Engine | None = None) -> None:
        """Write ``records.csv``, ``gallery.json`` and the gallery images."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "records.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(RECORD_COLUMNS))
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: "" if row[k] is None else (repr(row[k]) if k == "score" else row[k]) for k in row})
        folder = self.output_dir / "gallery"
        folder.mkdir(exist_ok=True)
        gallery: dict[str, Any] = {"threshold": self.threshold, "note": self.threshold_note}
        kept_all = [kept for heap in self.heaps.values() for *_, kept in heap]
        fovs = None if self.fov is None else [kept["fov"] for kept in kept_all]
        scale = fov_display_scale([kept["cam"] for kept in kept_all], fovs) if kept_all else 1.0
        where = "inside the field of view" if self.fov is not None else "anywhere in the frames"
        gallery["scale"] = scale
        gallery["scale_note"] = (
            f"one colour scale for all {len(kept_all)} gallery frames: 0 to {scale:.3g}, the largest Grad-CAM value "
            f"{where}; larger values show at the top colour"
        )
        for name, *_ in GALLERY_KINDS:
            shown = []
            for *_, kept in sorted(self.heaps[name], key=lambda e: e[:2], reverse=True):
                row = kept["row"]
                Image.fromarray(self._panel(kept, scale)).save(folder / f"{row['ref']}.png")
                probability = float(score_to_probability(row["score"]))
                shown.append({"ref": row["ref"], "score": row["score"], "probability": probability, "iou": row["iou"]})
            gallery[name] = shown
        (self.output_dir / "gallery.json").write_text(json.dumps(gallery, indent=2) + "\n")
