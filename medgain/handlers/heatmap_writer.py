"""Per-frame attention maps on disk: a PNG overlay to look at and a NIfTI map to measure."""

from __future__ import annotations

import gzip
import hashlib
import heapq
import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from PIL import Image

from medgain.attention import normalize_cam
from medgain.handlers.utils import attach_once, batch_has, batch_refusals, require_keys, sample_ids
from medgain.metrics.scores import positive_score, stack_output
from medgain.model_file import decision_threshold, load_attention_display, load_operating_point
from medgain.outputs import write_atomic
from medgain.reports.study import DEFAULT_TOP_K, StudyIndex
from medgain.visualize import cam_overlay, decision_words, heatmap_panel

if TYPE_CHECKING:
    import torch
    from ignite.engine import Engine

__all__ = ["HEATMAP_SELECTIONS", "HeatmapWriter"]

logger = logging.getLogger(__name__)

HEATMAP_SELECTIONS = ("flagged", "all", "none")


class HeatmapWriter:
    """Writes, for every frame an evaluator sees, its normalised Grad-CAM next to the source file name.

    Each iteration, per frame, into ``output_dir/heatmaps/``:

    - ``<stem>_f<frame>.png``: the raw cam on a FIXED colour scale, 0 to ``cam_scale`` (jet colour map; larger
      values at the top colour), blended over the image, with a colour bar and, under it, p(ill), the operating
      point's threshold and the decision (e.g. "p 0.97 < 0.9987 → healthy"; the threshold is ``threshold`` or the
      operating point of ``checkpoint``) and how the colours were scaled. ``cam_scale`` is the same number for
      every frame, so a healthy frame the model barely attends to stays dark. Without ``cam_scale`` it is the
      scale stored in ``checkpoint`` (``attention_display``: the top of the validation attention gallery's common
      scale, :func:`medgain.model_file.load_attention_display`), so heatmaps and gallery share one scale; only when
      neither gives one is each frame scaled to its own maximum, and its picture says so;
    - ``<stem>_f<frame>.nii.gz``: the normalised cam as an (H, W) float32 array (row, column axes as in the
      image) with an identity affine.

    ``<stem>`` is the source file name without its suffix; when files of the same stem come from different
    folders, each later folder's files get ``-<8 hex digits of a hash of the folder>`` appended, so no map
    overwrites another (the first folder keeps the plain stem; names are stable for a fixed data order).

    With ``num_threads > 0`` a batch's files are encoded and written by a thread pool (PNG and gzip encoding
    release the GIL) while the engine goes on with the next batch; each iteration first waits for the previous
    batch's files, and ``Events.COMPLETED`` for the last ones, so every file is on disk when the run completes and
    a write error is raised (one iteration late at most; without ``attach``, call :meth:`finish` after the last
    batch). The files are the same as with ``num_threads=0``. Every file is written through a temporary file and
    a rename, so no map is ever half written; a failed write names the file.

    Which frames get maps (``select``): ``"all"``; ``"none"``; or ``"flagged"``, the frames whose score (log-odds
    of ``pred``, as :class:`~medgain.handlers.PredictionCSVWriter` thresholds it) is at or above the operating
    point, plus, per study (``studies``; one study without it), the ``top_k`` highest scores, so that a study with
    no flagged frame still shows its most suspicious ones (those of the report,
    :mod:`medgain.reports.study`). The top-K is kept as it goes: a frame that enters a study's top-K is written
    (by the writing threads, as any other) and deleted when ``top_k`` higher ones have been seen, so memory stays
    bounded and a long study writes about ``top_k * ln(frames / top_k)`` maps beyond its flagged ones. When the
    engine completes, each study keeps its ``top_k`` highest scores in all (flagged ones included) and its
    flagged frames. A model without an operating point gets the top-K only (logged as a warning). A frame the
    loader refused (``refused_key`` of the batch holds its reason, :class:`~medgain.transforms.LoadFramed`) gets
    no map with any ``select`` and takes no place in a top-K.

    Args:
        output_dir: folder under which ``heatmaps/`` is created.
        cam_key: output key of the raw Grad-CAM maps (B, 1, H, W).
        path_key: batch key of the source file paths.
        frame_key: batch key of the frame indices.
        alpha: weight of the coloured cam in the PNG overlay.
        num_threads: threads writing the files; 0 writes them in the engine's thread before the next iteration.
        compress_level: zlib level of the PNG files (lossless at every level; 1 encodes about twice as fast as
            PIL's default 6 for files about 15 % larger).
        select: ``"flagged"``, ``"all"`` or ``"none"`` (see above).
        threshold: the operating point on the log-odds for ``"flagged"``; exclusive with ``checkpoint``.
        checkpoint: model file whose operating point gives the threshold (read when the engine starts).
        top_k: most suspicious frames per study kept by ``"flagged"``.
        studies: the study of each input file (``"flagged"``); None: all frames are one study.
        pred_key: output key of the logits.
        cam_scale: the Grad-CAM value at the top of the PNG's colour scale, for every frame; None: the scale
            stored in ``checkpoint``, else per frame.
        refused_key: batch key of the loader's reasons for refusing a frame (``""``: read).
    """

    def __init__(
        self,
        output_dir: str,
        cam_key: str = "cam",
        path_key: str = "image_path",
        frame_key: str = "frame",
        alpha: float = 0.5,
        num_threads: int = 2,
        compress_level: int = 1,
        select: str = "all",
        threshold: float | None = None,
        checkpoint: str | None = None,
        top_k: int = DEFAULT_TOP_K,
        studies: StudyIndex | None = None,
        pred_key: str = "pred",
        cam_scale: float | None = None,
        refused_key: str = "refused",
    ) -> None:
        if cam_scale is not None and not cam_scale > 0:
            raise ValueError(f"HeatmapWriter: cam_scale must be a positive number, got {cam_scale!r}")
        if select not in HEATMAP_SELECTIONS:
            raise ValueError(f"HeatmapWriter: select must be one of {', '.join(HEATMAP_SELECTIONS)}, got {select!r}")
        if threshold is not None and checkpoint is not None:
            raise ValueError("HeatmapWriter: give threshold or checkpoint, not both")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"HeatmapWriter: top_k must be a non-negative integer, got {top_k!r}")
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
            raise ValueError(f"HeatmapWriter: num_threads must be a non-negative integer, got {num_threads!r}")
        if isinstance(compress_level, bool) or not isinstance(compress_level, int) or not 0 <= compress_level <= 9:
            raise ValueError(f"HeatmapWriter: compress_level must be an integer in [0, 9], got {compress_level!r}")
        self.output_dir = Path(output_dir) / "heatmaps"
        self.cam_key = cam_key
        self.path_key = path_key
        self.frame_key = frame_key
        self.alpha = alpha
        self.num_threads = num_threads
        self.compress_level = compress_level
        self._folders: dict[str, str] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self.select = select
        self.threshold = None if threshold is None else float(threshold)
        self.checkpoint = checkpoint
        self.top_k = top_k
        self.studies = studies
        self.pred_key = pred_key
        self.refused_key = refused_key
        self.given_scale = cam_scale
        self.cam_scale = cam_scale  # the scale in use: given, or read from the checkpoint by start()
        self._scale_source = "" if cam_scale is None else " (given)"
        self._point = self.threshold  # the threshold the PNG captions state
        self._seen = 0
        self._top: dict[str, list[tuple[float, int, str]]] = {}  # per study: min-heap of (score, -order, name)
        self._flagged: dict[str, int] = {}
        self._evicted: list[str] = []

    def attach(self, engine: Engine) -> None:
        """Write the maps of every iteration of ``engine``, all of them on disk when it completes."""
        from ignite.engine import Events

        attach_once(
            engine,
            [(Events.STARTED, self.start), (Events.ITERATION_COMPLETED, self), (Events.COMPLETED, self.finish)],
        )

    def start(self, engine: Engine | None = None) -> None:
        """Forget the previous run's selection; read the checkpoint's threshold for ``"flagged"``."""
        self._seen, self._top, self._flagged, self._evicted = 0, {}, {}, []
        if self.given_scale is None and self.checkpoint is not None:
            display = load_attention_display(self.checkpoint)
            self.cam_scale = None if display is None else display["scale"]
            self._scale_source = "" if display is None else " (the model's validation gallery)"
        if self.checkpoint is not None:
            point = load_operating_point(self.checkpoint).get("threshold")
            self._point = None if point is None or not math.isfinite(float(point)) else float(point)
        if self.select != "flagged" or self.checkpoint is None:
            return
        try:
            self.threshold = decision_threshold(load_operating_point(self.checkpoint), self.checkpoint)
        except ValueError as err:
            self.threshold = None
            logger.warning("%s Heatmaps are written for the %d most suspicious frames of each study only.",
                           err, self.top_k)

    def file_stem(self, path: str) -> str:
        """Output stem of a source file, unique per (folder, stem) for the lifetime of the writer."""
        source = Path(path)
        folder = str(source.parent.resolve())
        owner = self._folders.setdefault(source.stem, folder)
        if owner == folder:
            return source.stem
        return f"{source.stem}-{hashlib.sha1(folder.encode()).hexdigest()[:8]}"

    def __call__(self, engine: Engine) -> None:
        """Write the PNG and NIfTI maps of one batch (those of its frames that ``select`` keeps)."""
        if self.select == "none":
            return
        ids = sample_ids(engine.state.batch, self.path_key, self.frame_key, "HeatmapWriter")
        require_keys(engine.state.output, ("image", self.cam_key), "HeatmapWriter")
        image, cam = stack_output(engine.state.output, ("image", self.cam_key))
        if len(ids) != image.shape[0]:
            raise ValueError(f"HeatmapWriter: {image.shape[0]} images for {len(ids)} batch entries")
        cams = normalize_cam(cam.detach().float()).cpu()
        images = image.detach().cpu()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.flush()
        self._delete_evicted()
        names = [f"{self.file_stem(p)}_f{f}" for p, f in ids]
        reasons = batch_refusals(engine.state.batch, self.refused_key, len(ids))
        refused = {name for name, reason in zip(names, reasons) if reason}
        keep = self._selected(engine, ids, names, refused) if self.select == "flagged" else set(names) - refused
        captions = self._captions(engine, cam.detach().float().cpu())
        frames = [(n, img, c01, shown, text) for n, img, c01, (shown, text) in zip(names, images, cams, captions)
                  if n in keep]
        if self.num_threads == 0:
            for frame_files in frames:
                self._write(*frame_files)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="HeatmapWriter")
        self._pending = [self._pool.submit(self._write, *frame_files) for frame_files in frames]

    def flush(self, engine: Engine | None = None) -> None:
        """Wait until the files of the last batch are written; raise the first write error."""
        pending, self._pending = self._pending, []
        wait(pending)
        for future in pending:
            future.result()

    def _selected(self, engine: Engine, ids: list[tuple[str, int]], names: list[str], refused: set[str]) -> set[str]:
        """The names of a batch's frames that ``"flagged"`` writes (none of ``refused``); updates the per-study
        top-K."""
        require_keys(engine.state.output, (self.pred_key,), "HeatmapWriter")
        scores = positive_score(stack_output(engine.state.output, (self.pred_key,))[0]).cpu().tolist()
        if len(scores) != len(ids):
            raise ValueError(f"HeatmapWriter: {len(scores)} predictions for {len(ids)} batch entries")
        keep: set[str] = set()
        for (path, _), name, score in zip(ids, names, scores):
            self._seen += 1
            if not math.isfinite(score) or name in refused:
                continue
            study = self.studies.of(path) if self.studies is not None else ""
            if self.threshold is not None and score >= self.threshold:
                self._flagged[study] = self._flagged.get(study, 0) + 1
                keep.add(name)
                continue
            heap = self._top.setdefault(study, [])
            entry = (score, -self._seen, name)
            if len(heap) < self.top_k:
                heapq.heappush(heap, entry)
            elif self.top_k and entry > heap[0]:
                self._evicted.append(heapq.heapreplace(heap, entry)[2])
            else:
                continue
            keep.add(name)
        evicted_now = keep.intersection(self._evicted)  # entered and left within this batch: never written
        self._evicted = [name for name in self._evicted if name not in evicted_now]
        return keep - evicted_now

    def _delete_evicted(self) -> None:
        """Delete the maps of the frames that left their study's top-K (their writes are flushed)."""
        for name in self._evicted:
            for suffix in (".png", ".nii.gz"):
                (self.output_dir / f"{name}{suffix}").unlink(missing_ok=True)
        self._evicted = []

    def finish(self, engine: Engine | None = None) -> None:
        """Flush, trim each study's top-K to what its flagged frames leave (``"flagged"``), and stop the
        writing threads (started again by the next batch)."""
        try:
            self.flush()
            for study, heap in self._top.items():
                room = max(0, self.top_k - self._flagged.get(study, 0))
                self._evicted += [entry[2] for entry in sorted(heap, reverse=True)[room:]]
                self._top[study] = sorted(heap, reverse=True)[:room]
            self._delete_evicted()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def _captions(self, engine: Engine, cam: torch.Tensor) -> list[tuple[torch.Tensor, str]]:
        """Per frame of a batch: the map as displayed (in [0, 1]) and the text under its PNG."""
        output = engine.state.output
        scores: list[float | None] = [None] * cam.shape[0]
        if batch_has(output, self.pred_key):
            scores = positive_score(stack_output(output, (self.pred_key,))[0]).cpu().tolist()
        if self.cam_scale is not None:
            shown = (cam / self.cam_scale).clamp(0, 1)
            how = f"colours: one fixed scale for all frames, 0 to {self.cam_scale:.3g}{self._scale_source}"
        else:
            shown = normalize_cam(cam)
            why = " (the model file stores no attention scale)" if self.checkpoint is not None else ""
            how = f"colours: scaled to this frame's own maximum{why}"
        words = [how if s is None else f"{decision_words(s, self._point)}\n{how}" for s in scores]
        return list(zip(shown, words))

    def _write(self, name: str, image: torch.Tensor, cam01: torch.Tensor, shown: torch.Tensor, caption: str) -> None:
        """The PNG overlay and the NIfTI map of one frame, each through a temporary file and a rename."""
        top = f"{self.cam_scale:.3g}" if self.cam_scale is not None else "max"
        overlay = Image.fromarray(heatmap_panel(cam_overlay(image, shown, alpha=self.alpha), top, caption))
        png = self.output_dir / f"{name}.png"
        write_atomic(png, lambda f: overlay.save(f, format="PNG", compress_level=self.compress_level))
        volume = nib.Nifti1Image(cam01[0].numpy().astype(np.float32), np.eye(4))
        content = gzip.compress(volume.to_bytes(), compresslevel=1, mtime=0)
        write_atomic(self.output_dir / f"{name}.nii.gz", lambda f: f.write(content))
