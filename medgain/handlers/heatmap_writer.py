"""Per-frame attention maps on disk: a PNG overlay to look at and a NIfTI map to measure."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from PIL import Image

from medgain.attention import normalize_cam
from medgain.handlers.utils import attach_once, require_keys, sample_ids
from medgain.metrics.scores import stack_output
from medgain.visualize import cam_overlay

if TYPE_CHECKING:
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

    Args:
        output_dir: folder under which ``heatmaps/`` is created.
        cam_key: output key of the raw Grad-CAM maps (B, 1, H, W).
        path_key: batch key of the source file paths.
        frame_key: batch key of the frame indices.
        alpha: weight of the coloured cam in the PNG overlay.
    """

    def __init__(
        self,
        output_dir: str,
        cam_key: str = "cam",
        path_key: str = "image_path",
        frame_key: str = "frame",
        alpha: float = 0.5,
    ) -> None:
        self.output_dir = Path(output_dir) / "heatmaps"
        self.cam_key = cam_key
        self.path_key = path_key
        self.frame_key = frame_key
        self.alpha = alpha
        self._folders: dict[str, str] = {}

    def attach(self, engine: Engine) -> None:
        """Write the maps of every iteration of ``engine``."""
        from ignite.engine import Events

        attach_once(engine, [(Events.ITERATION_COMPLETED, self)])

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
        for (path, frame), img, cam01 in zip(ids, images, cams):
            name = f"{self.file_stem(path)}_f{frame}"
            Image.fromarray(cam_overlay(img, cam01, alpha=self.alpha)).save(self.output_dir / f"{name}.png")
            volume = nib.Nifti1Image(cam01[0].numpy().astype(np.float32), np.eye(4))
            nib.save(volume, self.output_dir / f"{name}.nii.gz")
