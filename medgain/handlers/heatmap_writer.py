"""Per-frame attention maps on disk: a PNG overlay to look at and a NIfTI map to measure."""

from __future__ import annotations

import gzip
import hashlib
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from PIL import Image

from medgain.attention import normalize_cam
from medgain.handlers.utils import attach_once, require_keys, sample_ids
from medgain.metrics.scores import stack_output
from medgain.outputs import write_atomic
from medgain.visualize import cam_overlay

if TYPE_CHECKING:
    import torch
    from ignite.engine import Engine

__all__ = ["HeatmapWriter"]


class HeatmapWriter:
    """Writes, for every frame an evaluator sees, its normalised Grad-CAM next to the source file name.

    Each iteration, per frame, into ``output_dir/heatmaps/``:

    - ``<stem>_f<frame>.png``: the cam (per-frame min-max normalised, jet colour map) blended over the image;
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

    Args:
        output_dir: folder under which ``heatmaps/`` is created.
        cam_key: output key of the raw Grad-CAM maps (B, 1, H, W).
        path_key: batch key of the source file paths.
        frame_key: batch key of the frame indices.
        alpha: weight of the coloured cam in the PNG overlay.
        num_threads: threads writing the files; 0 writes them in the engine's thread before the next iteration.
        compress_level: zlib level of the PNG files (lossless at every level; 1 encodes about twice as fast as
            PIL's default 6 for files about 15 % larger).
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
    ) -> None:
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

    def attach(self, engine: Engine) -> None:
        """Write the maps of every iteration of ``engine``, all of them on disk when it completes."""
        from ignite.engine import Events

        attach_once(engine, [(Events.ITERATION_COMPLETED, self), (Events.COMPLETED, self.finish)])

    def file_stem(self, path: str) -> str:
        """Output stem of a source file, unique per (folder, stem) for the lifetime of the writer."""
        source = Path(path)
        folder = str(source.parent.resolve())
        owner = self._folders.setdefault(source.stem, folder)
        if owner == folder:
            return source.stem
        return f"{source.stem}-{hashlib.sha1(folder.encode()).hexdigest()[:8]}"

    def __call__(self, engine: Engine) -> None:
        """Write the PNG and NIfTI maps of one batch."""
        ids = sample_ids(engine.state.batch, self.path_key, self.frame_key, "HeatmapWriter")
        require_keys(engine.state.output, ("image", self.cam_key), "HeatmapWriter")
        image, cam = stack_output(engine.state.output, ("image", self.cam_key))
        if len(ids) != image.shape[0]:
            raise ValueError(f"HeatmapWriter: {image.shape[0]} images for {len(ids)} batch entries")
        cams = normalize_cam(cam.detach().float()).cpu()
        images = image.detach().cpu()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.flush()
        frames = [(f"{self.file_stem(p)}_f{f}", img, cam01) for (p, f), img, cam01 in zip(ids, images, cams)]
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

    def finish(self, engine: Engine | None = None) -> None:
        """Flush and stop the writing threads (started again by the next batch)."""
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def _write(self, name: str, image: torch.Tensor, cam01: torch.Tensor) -> None:
        """The PNG overlay and the NIfTI map of one frame, each through a temporary file and a rename."""
        overlay = Image.fromarray(cam_overlay(image, cam01, alpha=self.alpha))
        png = self.output_dir / f"{name}.png"
        write_atomic(png, lambda f: overlay.save(f, format="PNG", compress_level=self.compress_level))
        volume = nib.Nifti1Image(cam01[0].numpy().astype(np.float32), np.eye(4))
        content = gzip.compress(volume.to_bytes(), compresslevel=1, mtime=0)
        write_atomic(self.output_dir / f"{name}.nii.gz", lambda f: f.write(content))
