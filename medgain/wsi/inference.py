"""Whole-slide inference: probability and attention maps, a slide score and detected lesions per slide.

:class:`SlideInferer` runs a patch classifier over every tissue patch of a slide. Patches are cut from larger
regions (one read per block of ``region_patches`` x ``region_patches`` grid cells instead of one per patch), read
on a background thread while the network runs, batched, and background cells are never read. Each batch gives
logits and the Grad-CAM of the tumour class from one forward (:func:`medgain.attention.grad_cam`).

:class:`SlideInferer` runs the model at the magnification it was trained at: a slide whose microns per pixel at
the model's level differ by more than :data:`MPP_TOLERANCE` is read at its level closest to the model's
magnification (the finer side), and its patches are resized to the network input (logged, and recorded in the
slide's outputs). Lesions are detected at the model's stored operating point unless a threshold is given.

:func:`run_inference` does this for a list of slides: outputs of each slide are written to a temporary folder
renamed into place, so an interrupted run resumes at the first unfinished slide; a slide that fails is a row
of ``errors.csv`` and the others go on. Slides can be sharded over ranks (``torchrun``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from scipy.special import expit, logit
from skimage.feature import peak_local_max
from skimage.measure import label as label_components
from torch import nn

from medgain.attention import grad_cam, normalize_cam
from medgain.metrics import positive_score
from medgain.visualize import heatmap_panel
from medgain.wsi.annotations import Annotation, read_annotations, tumour_mask
from medgain.wsi.slide import Slide, SlideError
from medgain.wsi.tissue import area_fraction, slide_tissue_mask

__all__ = [
    "LESION_COLUMNS",
    "MPP_TOLERANCE",
    "PatchReading",
    "SlideInferer",
    "SlideMaps",
    "collect_slide_scores",
    "run_inference",
    "write_slide_outputs",
]

logger = logging.getLogger(__name__)

LESION_COLUMNS = ("x", "y", "probability", "log_odds", "n_patches")

#: largest relative difference between a slide's microns per pixel and the model's that counts as the same
#: magnification (10 %); beyond it slide inference resamples and patch tables are refused.
MPP_TOLERANCE = 0.1


def same_magnification(mpp: float, trained: float, tolerance: float = MPP_TOLERANCE) -> bool:
    """Whether ``mpp`` is within ``tolerance`` (relative) of the ``trained`` microns per pixel."""
    return abs(mpp / trained - 1.0) <= tolerance


@dataclass(frozen=True)
class PatchReading:
    """How the patches of one slide are read.

    Attributes:
        level: the pyramid level read.
        patch_size: side of a patch at ``level`` (resized to the network input when it differs from it).
        stride: grid step in pixels of ``level``.
        mpp: microns per pixel of ``level``; None when not checked (the model records no microns per pixel).
    """

    level: int
    patch_size: int
    stride: int
    mpp: float | None = None


@dataclass
class SlideMaps:
    """Inference outputs of one slide.

    Attributes:
        slide: slide id (file name without suffix).
        path: the slide file.
        probability: (gh, gw) float32 tumour probability per grid cell, 0 where no patch was run.
        log_odds: (gh, gw) float64 tumour log-odds per grid cell, NaN where no patch was run.
        attention: stitched attention (normalised Grad-CAM of the tumour class times the patch probability,
            averaged where patches overlap), float32; one pixel covers ``attention_downsample`` level-0 px.
        score: slide score: max or top-k mean of the patch log-odds (float64).
        lesions: detected lesions, rows of :data:`LESION_COLUMNS` (x, y: level-0 pixels of the peak patch centre).
        meta: geometry and settings: level, patch_size, stride, map_downsample (level-0 px per grid step),
            map_offset (level-0 px from the slide origin to the centre of cell (0, 0)), attention_downsample,
            mpp (level 0, None without resolution tags), slide_shape (level-0 height, width), n_patches,
            seconds, score_kind.
    """

    slide: str
    path: str
    probability: np.ndarray
    log_odds: np.ndarray
    attention: np.ndarray
    score: float
    lesions: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def slide_probability(self) -> float:
        """Sigmoid of :attr:`score`."""
        return float(expit(self.score))


class SlideInferer:
    """Patch classifier + Grad-CAM over the tissue of a whole slide.

    Args:
        network: a torch classifier returning logits (B, 1) or (B, C) with class 0 = normal.
        target_layer: ``named_modules()`` name of its Grad-CAM layer.
        patch_size: patch side in pixels of ``level`` (the network's input size).
        level: pyramid level the patches are read at.
        stride: grid step in pixels of ``level`` (default ``patch_size``; smaller values overlap patches).
        batch_size: patches per forward.
        min_tissue: least tissue fraction of a patch for it to be run.
        tissue_level: level of the tissue mask (None: downsample about 32).
        region_patches: grid cells per side of the block read at once.
        score: slide score from the patch log-odds, "max" or "topk" (mean of the ``top_k`` highest).
        top_k: patches averaged by the "topk" score.
        lesion_threshold: probability at which map cells belong to a detected lesion; None: the model's
            stored operating point (``operating_point``), 0.5 (with a warning) for a model without one.
        lesion_method: "components" (one detection per connected region above the threshold, at its peak) or
            "maxima" (one per local maximum above the threshold).
        attention_cells: attention-map pixels per grid step.
        mean: per-channel mean subtracted after scaling to [0, 1] (None: none).
        std: per-channel standard deviation divided by (None: none).
        class_index: class whose Grad-CAM is taken (1, tumour).
        device: torch device of the network.
        amp: autocast the forward (CUDA).
        channels_last: run the network in channels-last memory format (its parameters are converted in place
            on the first slide; outputs are unchanged, convolutions run faster on CPU and on tensor cores).
        backend: WSI backend.
        default_mpp: microns per pixel assumed for slides without resolution tags.
        prefetch: batches read ahead by the reading thread.
        mpp: microns per pixel of the patches the model was trained on (its spec's ``mpp``); slides of another
            magnification at ``level`` are resampled to it (see the module docstring). None: not checked
            (warned), the slides are read at ``level`` whatever their magnification.
        mpp_tolerance: relative difference of microns per pixel read as the same magnification.
        operating_point: the model file's operating point (:func:`medgain.model_file.load_operating_point`),
            whose threshold is the default ``lesion_threshold``.

    Raises:
        ValueError: for an invalid option, e.g. a ``level`` that is None (the model file records no pyramid
            level: it is not a whole-slide patch model).
    """

    def __init__(
        self,
        network: nn.Module,
        target_layer: str,
        patch_size: int = 224,
        level: int = 0,
        stride: int | None = None,
        batch_size: int = 64,
        min_tissue: float = 0.1,
        tissue_level: int | None = None,
        region_patches: int = 8,
        score: str = "max",
        top_k: int = 10,
        lesion_threshold: float | None = None,
        lesion_method: str = "components",
        attention_cells: int = 4,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_index: int = 1,
        device: str | torch.device = "cpu",
        amp: bool = False,
        channels_last: bool = True,
        backend: str = "tifffile",
        default_mpp: float | None = None,
        prefetch: int = 2,
        mpp: float | None = None,
        mpp_tolerance: float = MPP_TOLERANCE,
        operating_point: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(level, int) or isinstance(level, bool) or level < 0:
            raise ValueError(
                f"SlideInferer: level must be a pyramid level (an int >= 0), got {level!r}; a whole-slide model "
                "file records the level it was trained at, one without it is not a whole-slide patch model"
            )
        if mpp is not None and not 0 < mpp < float("inf"):
            raise ValueError(f"SlideInferer: mpp must be positive microns per pixel or None, got {mpp!r}")
        if not 0 <= mpp_tolerance < 1:
            raise ValueError(f"SlideInferer: mpp_tolerance must be in [0, 1), got {mpp_tolerance!r}")
        if score not in ("max", "topk"):
            raise ValueError(f"score must be 'max' or 'topk', got {score!r}")
        if lesion_method not in ("components", "maxima"):
            raise ValueError(f"lesion_method must be 'components' or 'maxima', got {lesion_method!r}")
        if patch_size < 1 or batch_size < 1 or region_patches < 1 or attention_cells < 1 or top_k < 1:
            raise ValueError("patch_size, batch_size, region_patches, attention_cells and top_k must be positive")
        self.network = network
        self.target_layer = target_layer
        self.patch_size = int(patch_size)
        self.level = int(level)
        self.stride = int(stride or patch_size)
        self.batch_size = int(batch_size)
        self.min_tissue = float(min_tissue)
        self.tissue_level = tissue_level
        self.region_patches = int(region_patches)
        self.score = score
        self.top_k = int(top_k)
        self.lesion_log_odds, self.lesion_threshold_source = _lesion_threshold(lesion_threshold, operating_point)
        self.lesion_threshold = float(expit(self.lesion_log_odds))
        logger.info("lesions detected at probability %.6g (%s)", self.lesion_threshold, self.lesion_threshold_source)
        self.lesion_method = lesion_method
        self.attention_cells = int(attention_cells)
        self.device = torch.device(device)
        self.mean = (
            None if mean is None else torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        )
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.class_index = class_index
        self.amp = bool(amp)
        self.channels_last = bool(channels_last)
        self.backend = backend
        self.default_mpp = default_mpp
        self.prefetch = max(int(prefetch), 1)
        self.mpp = None if mpp is None else float(mpp)
        self.mpp_tolerance = float(mpp_tolerance)
        if self.mpp is None:
            logger.warning(
                "the model file records no microns per pixel: slides are read at level %d whatever their "
                "magnification",
                self.level,
            )

    # -- reading ---------------------------------------------------------------------------------------------
    def reading(self, slide: Slide) -> PatchReading:
        """Where the patches of ``slide`` are read: the model's level when the slide's microns per pixel there
        match the model's (within ``mpp_tolerance``), else the coarsest level at least as fine as the model's
        magnification, with patches of the size that covers the model's field of view (resized on reading).

        Raises:
            SlideError: when the level is out of range (model without microns per pixel), the slide has no
                resolution tags and no ``default_mpp`` was given, or even its finest level is coarser than the
                model's magnification.
        """
        p, s = self.patch_size, self.stride
        if self.mpp is None:
            if not 0 <= self.level < slide.level_count:
                raise SlideError(f"{slide.path}: level {self.level} requested, the slide has {slide.level_count}")
            return PatchReading(self.level, p, s)
        trained = self.mpp
        base = slide.mpp_at(0, f"checking it against the {trained:g} microns per pixel the model was trained at")
        mpps = [base * d for d in slide.downsamples]
        tol = self.mpp_tolerance
        if self.level < slide.level_count and same_magnification(mpps[self.level], trained, tol):
            return PatchReading(self.level, p, s, mpps[self.level])
        finer = [k for k, m in enumerate(mpps) if m <= trained * (1.0 + tol)]
        if not finer:
            raise SlideError(
                f"{slide.path}: {mpps[0]:.4g} microns per pixel at its finest level, coarser than the {trained:.4g} "
                f"the model was trained at (level {self.level}): it cannot be run at the model's magnification"
            )
        level = max(finer, key=lambda k: mpps[k])
        factor = 1.0 if same_magnification(mpps[level], trained, tol) else trained / mpps[level]
        read = PatchReading(level, max(int(round(p * factor)), 1), max(int(round(s * factor)), 1), mpps[level])
        at_level = f"{mpps[self.level]:.4g}" if self.level < slide.level_count else "no such level"
        logger.warning(
            "%s: %s microns per pixel at level %d, the model was trained at %.4g: patches are read at level %d "
            "(%.4g microns per pixel)%s",
            slide.path,
            at_level,
            self.level,
            trained,
            level,
            mpps[level],
            f", {read.patch_size} px resized to {p} px" if read.patch_size != p else "",
        )
        return read

    def tissue_grid(self, slide: Slide, reading: PatchReading | None = None) -> np.ndarray:
        """(gh, gw) boolean grid of the cells whose patch holds at least ``min_tissue`` tissue.

        Args:
            slide: an open slide.
            reading: where its patches are read (default :meth:`reading`).

        Raises:
            SlideError: when the level is out of range, smaller than a patch, or has no tissue patch.
        """
        reading = reading or self.reading(slide)
        level = reading.level
        if not 0 <= level < slide.level_count:
            raise SlideError(f"{slide.path}: level {level} requested, the slide has {slide.level_count}")
        h, w = slide.level_shapes[level]
        p, s = reading.patch_size, reading.stride
        if h < p or w < p:
            raise SlideError(f"{slide.path}: level {level} ({w}x{h}) is smaller than one {p}-px patch")
        gh, gw = (h - p) // s + 1, (w - p) // s + 1
        mask, mask_level = slide_tissue_mask(slide, self.tissue_level)
        d = slide.downsamples[level]
        gy, gx = np.meshgrid(np.arange(gh) * s * d, np.arange(gw) * s * d, indexing="ij")
        frac = area_fraction(mask, slide.downsamples[mask_level], gx.ravel(), gy.ravel(), p * d).reshape(gh, gw)
        grid = frac >= self.min_tissue
        if not grid.any():
            raise SlideError(f"{slide.path}: no patch holds {self.min_tissue:.0%} tissue at level {level}")
        return grid

    def _resize(self, patches: np.ndarray) -> np.ndarray:
        """uint8 patches (n, 3, P', P') resized (bilinear, antialiased) to the network input."""
        x = torch.from_numpy(patches).float()
        size = (self.patch_size, self.patch_size)
        y = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return y.round_().clamp_(0, 255).to(torch.uint8).numpy()

    def _blocks(
        self, slide: Slide, grid: np.ndarray, reading: PatchReading
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(cells (n, 2), patches (n, 3, P, P) uint8)`` per block of grid cells, one region read each."""
        p, s, r = reading.patch_size, reading.stride, self.region_patches
        d = slide.downsamples[reading.level]
        for bi in range(0, grid.shape[0], r):
            for bj in range(0, grid.shape[1], r):
                cells = np.argwhere(grid[bi : bi + r, bj : bj + r]) + (bi, bj)
                if not cells.size:
                    continue
                r0, c0 = cells.min(0)
                r1, c1 = cells.max(0)
                size = ((r1 - r0) * s + p, (c1 - c0) * s + p)
                region = slide.read_region((round(r0 * s * d), round(c0 * s * d)), size, reading.level)
                ys = (cells[:, 0] - r0) * s
                xs = (cells[:, 1] - c0) * s
                patches = np.stack([region[:, y : y + p, x : x + p] for y, x in zip(ys, xs)])
                yield cells, patches if p == self.patch_size else self._resize(patches)

    def _batches(
        self, slide: Slide, grid: np.ndarray, reading: PatchReading
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Blocks regrouped into batches of ``batch_size`` patches."""
        cells_buf: list[np.ndarray] = []
        patch_buf: list[np.ndarray] = []
        count = 0
        for cells, patches in self._blocks(slide, grid, reading):
            cells_buf.append(cells)
            patch_buf.append(patches)
            count += len(cells)
            while count >= self.batch_size:
                all_cells, all_patches = np.concatenate(cells_buf), np.concatenate(patch_buf)
                yield all_cells[: self.batch_size], all_patches[: self.batch_size]
                cells_buf, patch_buf = [all_cells[self.batch_size :]], [all_patches[self.batch_size :]]
                count -= self.batch_size
        if count:
            yield np.concatenate(cells_buf), np.concatenate(patch_buf)

    def iter_batches(
        self, slide: Slide, grid: np.ndarray, reading: PatchReading | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The patches of the ``grid`` cells (see :meth:`tissue_grid`, with the same ``reading``, default
        :meth:`reading`) as ``(cells (B, 2), patches (B, 3, P, P) uint8)`` batches, read on a background thread
        so that decoding overlaps the network."""
        reading = reading or self.reading(slide)
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                for item in self._batches(slide, grid, reading):
                    if stop.is_set():
                        return
                    q.put(item)
                q.put(done)
            except BaseException as err:  # handed to the consumer, which re-raises it
                q.put(err)

        thread = threading.Thread(target=produce, name=f"read-{slide.name}", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)

    # -- network ---------------------------------------------------------------------------------------------
    def _forward(self, patches: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 log-odds (B,) (:func:`medgain.metrics.positive_score`) and raw Grad-CAM (B, 1, P, P) of uint8
        patches."""
        x = torch.from_numpy(patches).to(self.device, non_blocking=True).float().div_(255.0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        autocast = torch.autocast(self.device.type) if self.amp and self.device.type == "cuda" else nullcontext()
        with torch.no_grad(), autocast:
            logits, cam = grad_cam(self.network, x, self.target_layer, self.class_index)
        return positive_score(logits), cam.detach().float()

    def __call__(self, path: str | os.PathLike) -> SlideMaps:
        """Run the network over the tissue of the slide at ``path``.

        Raises:
            FileNotFoundError / SlideError: for a missing or unusable slide (the message names it).
        """
        start = time.perf_counter()
        self.network.eval()
        if self.channels_last:
            self.network.to(memory_format=torch.channels_last)
        with Slide(path, backend=self.backend, default_mpp=self.default_mpp) as slide:
            reading = self.reading(slide)
            grid = self.tissue_grid(slide, reading)
            gh, gw = grid.shape
            p, s, k = reading.patch_size, reading.stride, self.attention_cells
            cells_per_patch = max(int(round(p * k / s)), 1)
            att_sum = np.zeros(((gh - 1) * k + cells_per_patch, (gw - 1) * k + cells_per_patch), dtype=np.float64)
            att_count = np.zeros_like(att_sum)
            taper = _edge_taper(cells_per_patch)  # a patch's border weighs little where its neighbours overlap it
            scores = np.full(grid.shape, np.nan, dtype=np.float64)
            for cells, patches in self.iter_batches(slide, grid, reading):
                z, cam = self._forward(patches)
                prob = torch.sigmoid(z).float().to(cam.device)
                att = F.adaptive_avg_pool2d(normalize_cam(cam) * prob.view(-1, 1, 1, 1), cells_per_patch)
                att_np = att[:, 0].cpu().numpy()
                scores[cells[:, 0], cells[:, 1]] = z.cpu().numpy()
                for (i, j), a in zip(cells, att_np):
                    att_sum[i * k : i * k + cells_per_patch, j * k : j * k + cells_per_patch] += a * taper
                    att_count[i * k : i * k + cells_per_patch, j * k : j * k + cells_per_patch] += taper
            d = slide.downsamples[reading.level]
            meta = {
                "level": reading.level,
                "patch_size": self.patch_size,
                "stride": s,
                "read_patch_size": p,
                "model_level": self.level,
                "model_mpp": self.mpp,
                "level_mpp": reading.mpp,
                "lesion_threshold": self.lesion_threshold,
                "lesion_threshold_source": self.lesion_threshold_source,
                "map_downsample": s * d,
                "map_offset": p * d / 2.0,
                "attention_downsample": s * d / k,
                "mpp": slide.mpp,
                "slide_shape": list(slide.shape),
                "n_patches": int(grid.sum()),
                "score_kind": self.score if self.score == "max" else f"top{self.top_k}",
            }
            name, slide_path = slide.name, str(slide.path)
        valid = scores[grid]
        if self.score == "max":
            slide_score = float(valid.max())
        else:
            slide_score = float(np.sort(valid)[::-1][: self.top_k].mean())
        probability = np.where(grid, expit(np.where(grid, scores, 0.0)), 0.0).astype(np.float32)
        attention = (att_sum / np.maximum(att_count, 1.0)).astype(np.float32)
        meta["seconds"] = round(time.perf_counter() - start, 3)
        lesions = self.detect_lesions(probability, scores, meta)
        return SlideMaps(name, slide_path, probability, scores, attention, slide_score, lesions, meta)

    def detect_lesions(self, probability: np.ndarray, scores: np.ndarray, meta: dict[str, Any]) -> list[dict[str, Any]]:
        """Lesions of a probability map (see ``lesion_method``), sorted by decreasing log-odds."""
        with np.errstate(invalid="ignore"):
            above = scores >= self.lesion_log_odds  # on the log-odds, exact where the probability rounds to 1
        if self.lesion_method == "components":
            regions = label_components(above, connectivity=2)
            peaks = []
            for r in range(1, int(regions.max()) + 1):
                members = np.argwhere(regions == r)
                best = members[np.argmax(scores[members[:, 0], members[:, 1]])]
                peaks.append((int(best[0]), int(best[1]), len(members)))
        else:
            # on the log-odds, which do not saturate where the probability rounds to 1
            floor = float(np.nanmin(scores)) - 1.0
            coords = peak_local_max(
                np.where(above, np.nan_to_num(scores, nan=floor), floor),
                min_distance=1,
                threshold_abs=floor + 0.5,
                exclude_border=False,
            )
            peaks = [(int(i), int(j), 1) for i, j in coords]
        rows = [
            {
                "x": round(j * meta["map_downsample"] + meta["map_offset"], 1),
                "y": round(i * meta["map_downsample"] + meta["map_offset"], 1),
                "probability": float(probability[i, j]),
                "log_odds": float(scores[i, j]),
                "n_patches": n,
            }
            for i, j, n in peaks
        ]
        return sorted(rows, key=lambda r: -r["log_odds"])


def _lesion_threshold(given: float | None, point: Mapping[str, Any] | None) -> tuple[float, str]:
    """The lesion threshold as log-odds and where it comes from (see :class:`SlideInferer`)."""
    if given is not None:
        if not 0.0 <= given <= 1.0:
            raise ValueError(f"SlideInferer: lesion_threshold must be a probability in [0, 1], got {given!r}")
        return float(logit(given)), "lesion_threshold given"
    threshold = None if point is None else point.get("threshold")
    if threshold is not None and np.isfinite(float(threshold)):
        return float(threshold), f"the model's operating point, log-odds {float(threshold):.6g}"
    reason = "no operating point given" if point is None else point.get("reason") or "no finite threshold"
    logger.warning("the model has no operating point (%s): lesions are detected at probability 0.5", reason)
    return 0.0, f"0.5: the model has no operating point ({reason})"


def _edge_taper(n: int) -> np.ndarray:
    """(n, n) stitching weights, 1 in a patch's centre and small (never 0) at its border: overlapping patches
    are blended by them, so no patch edge (where Grad-CAM suffers from padding) shows as a stripe."""
    ramp = np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2  # a Hann window, sampled off its zeros
    return np.outer(ramp, ramp)


def _slide_caption(maps: SlideMaps, what: str) -> str:
    """Two lines under a slide overlay: the slide's pseudonym, score and decision, and what the colours show."""
    from medgain.data.phi import study_ref

    m = maps.meta
    threshold = float(m["lesion_threshold"])
    tumour = maps.score >= float(logit(threshold)) if 0.0 < threshold < 1.0 else maps.slide_probability >= threshold
    source = " (no operating point)" if "no operating point" in str(m.get("lesion_threshold_source", "")) else ""
    return (f"slide {study_ref(maps.slide)}: score p {maps.slide_probability:.4g} "
            f"{'≥' if tumour else '<'} {threshold:.4g}{source} → {'TUMOUR' if tumour else 'no tumour'}\n{what}")


def _overlay(thumbnail: np.ndarray, heat: np.ndarray, scale: float, offset: float, alpha: float = 0.45) -> Image.Image:
    """Blend a heat map in [0, 1] (resized by ``scale``, shifted by ``offset`` thumbnail px) over a thumbnail."""
    from matplotlib import colormaps

    base = np.moveaxis(thumbnail, 0, -1).astype(np.float32)
    h, w = base.shape[:2]
    size = (max(int(round(heat.shape[1] * scale)), 1), max(int(round(heat.shape[0] * scale)), 1))
    resized = np.asarray(Image.fromarray(np.clip(heat, 0.0, 1.0).astype(np.float32)).resize(size, Image.BILINEAR))
    canvas = np.zeros((h, w), dtype=np.float32)
    o = int(round(offset))
    ch, cw = min(resized.shape[0], max(h - o, 0)), min(resized.shape[1], max(w - o, 0))
    canvas[o : o + ch, o : o + cw] = resized[:ch, :cw]
    colour = colormaps["jet"](canvas)[..., :3] * 255.0
    weight = alpha * (canvas > 0.02)[..., None]
    return Image.fromarray(np.clip(base * (1 - weight) + colour * weight, 0, 255).astype(np.uint8))


CONTOUR_RGB = (255, 0, 255)
"""Colour of the annotated tumour's outline on slide overlays (magenta: not in the jet colour map)."""


def _draw_outline(overlay: Image.Image, annotations: Sequence[Annotation], downsample: float) -> Image.Image:
    """Draw the outline of the annotated tumour (:func:`~medgain.wsi.annotations.tumour_mask` at the overlay's
    ``downsample``), 3 pixels wide, in :data:`CONTOUR_RGB`."""
    pixels = np.array(overlay)
    mask = tumour_mask(annotations, pixels.shape[:2], downsample=downsample)
    edge = ndimage.binary_dilation(mask & ~ndimage.binary_erosion(mask, border_value=0))
    pixels[edge] = CONTOUR_RGB
    return Image.fromarray(pixels)


def write_slide_outputs(
    maps: SlideMaps,
    folder: str | os.PathLike,
    thumbnail: tuple[np.ndarray, float] | None = None,
    annotations: Sequence[Annotation] | None = None,
) -> Path:
    """Write a slide's outputs into ``folder``: ``probability.npy``, ``log_odds.npy``, ``attention.npy``,
    ``lesions.csv``, ``slide.json`` (score, geometry) and, given ``(thumbnail (3, h, w), downsample)``,
    ``thumbnail.png``, ``probability_overlay.png`` and ``attention_overlay.png``; with ``annotations`` (of the
    slide, :func:`~medgain.wsi.annotations.read_annotations`) both overlays show the annotated tumour's outline
    in magenta, and their captions say so."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "probability.npy", maps.probability)
    np.save(folder / "log_odds.npy", maps.log_odds)
    np.save(folder / "attention.npy", maps.attention)
    with (folder / "lesions.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LESION_COLUMNS)
        writer.writeheader()
        writer.writerows(maps.lesions)
    if thumbnail is not None:
        image, thumb_d = thumbnail
        Image.fromarray(np.ascontiguousarray(np.moveaxis(image, 0, -1))).save(folder / "thumbnail.png")
        m = maps.meta
        probability = _overlay(
            image,
            maps.probability,
            m["map_downsample"] / thumb_d,
            (m["map_offset"] - m["map_downsample"] / 2) / thumb_d,
        )
        outline = "; magenta line: annotated tumour" if annotations else ""
        if annotations:
            probability = _draw_outline(probability, annotations, thumb_d)
        caption = _slide_caption(maps, f"colour: p(tumour) of each patch, one fixed scale 0 to 1{outline}")
        Image.fromarray(heatmap_panel(np.asarray(probability), "1", caption)).save(folder / "probability_overlay.png")
        # attention = per-patch Grad-CAM x p(tumour), already in [0, 1]: on the same fixed scale for every slide,
        # so a normal slide stays cool instead of showing its own maximum in red
        attention = _overlay(image, maps.attention, m["attention_downsample"] / thumb_d, 0.0)
        if annotations:
            attention = _draw_outline(attention, annotations, thumb_d)
        caption = _slide_caption(maps, f"colour: attention x p(tumour), one fixed scale 0 to 1{outline}")
        Image.fromarray(heatmap_panel(np.asarray(attention), "1", caption)).save(folder / "attention_overlay.png")
    record = {
        "slide": maps.slide,
        "path": maps.path,
        "score": maps.score,
        "probability": maps.slide_probability,
        "n_lesions": len(maps.lesions),
        **maps.meta,
    }
    (folder / "slide.json").write_text(json.dumps(record, indent=1))
    return folder


def _write_errors(path: Path, rows: list[dict[str, str]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=("slide", "path", "error"))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def output_id(slide: str | os.PathLike) -> str:
    """The id of a slide file's output folder in :func:`run_inference`: its file name without suffixes."""
    return Path(slide).name.split(".")[0]


def run_inference(
    slides: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    inferer: SlideInferer,
    *,
    rank: int = 0,
    world_size: int = 1,
    thumbnail_downsample: float = 32.0,
    annotations: Sequence[str | os.PathLike | None] | None = None,
) -> dict[str, Any]:
    """Infer every slide of this rank's shard (``slides[rank::world_size]``) into ``out_dir/<slide id>/``.

    A slide whose folder holds ``slide.json`` is done and skipped (resume). Outputs are written to a
    temporary folder that is renamed into place when complete. A slide that fails (missing, truncated, not
    pyramidal, no tissue ...) becomes a row of ``errors.csv`` (``errors.rank<r>.csv`` with several ranks) and the
    others go on.

    Args:
        slides: slide files; their ids (file names without suffix) must be unique.
        out_dir: output folder.
        inferer: the configured :class:`SlideInferer`.
        rank: this process's rank.
        world_size: number of ranks.
        thumbnail_downsample: downsample of the level the overlays are drawn on.
        annotations: per slide (same order as ``slides``), its annotation file or None; the overlays outline the
            annotated tumour. An unreadable file fails its slide.

    Returns:
        ``{"done": [...], "skipped": [...], "failed": [...]}`` slide ids of this shard.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    paths = [Path(p) for p in slides]
    if annotations is not None and len(annotations) != len(paths):
        raise ValueError(f"run_inference: {len(annotations)} annotation entries for {len(paths)} slides")
    notes = list(annotations) if annotations is not None else [None] * len(paths)
    ids = [output_id(p) for p in paths]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"slide ids must be unique, these repeat: {dupes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    errors_path = out / ("errors.csv" if world_size == 1 else f"errors.rank{rank}.csv")
    errors: list[dict[str, str]] = []
    summary: dict[str, list[str]] = {"done": [], "skipped": [], "failed": []}
    for slide_id, path, note in list(zip(ids, paths, notes))[rank::world_size]:
        final = out / slide_id
        if (final / "slide.json").is_file():
            summary["skipped"].append(slide_id)
            continue
        for stale in out.glob(f".{slide_id}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out / f".{slide_id}.partial-{os.getpid()}"
        try:
            maps = inferer(path)
            with Slide(path, backend=inferer.backend, default_mpp=inferer.default_mpp) as slide:
                level = slide.level_for_downsample(thumbnail_downsample)
                thumb = (slide.read_level(level), slide.downsamples[level])
            outline = read_annotations(note) if note else None
            write_slide_outputs(maps, tmp, thumb, outline)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            summary["done"].append(slide_id)
            logger.info(
                "%s: score %.3f, %d patches, %d lesions",
                slide_id,
                maps.score,
                maps.meta["n_patches"],
                len(maps.lesions),
            )
        except Exception as err:  # one bad slide must not stop the others; the row says what went wrong
            shutil.rmtree(tmp, ignore_errors=True)
            message = f"{type(err).__name__}: {err}"
            logger.error("%s: %s", path, message)
            errors.append({"slide": slide_id, "path": str(path), "error": message})
            summary["failed"].append(slide_id)
            _write_errors(errors_path, errors)
    if not errors:
        _write_errors(errors_path, errors)
    return summary


def collect_slide_scores(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The ``slide.json`` records of all finished slides in ``out_dir``, also written to ``slides.csv``."""
    out = Path(out_dir)
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/slide.json"))]
    columns = ("slide", "path", "score", "probability", "n_patches", "n_lesions", "mpp")
    tmp = out / ".slides.csv.tmp"
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    os.replace(tmp, out / "slides.csv")
    return records
