"""The marker-reliance probe of a shortcut study: how much a trained model's lesion score and attention move when
the synthetic capsule marker (:func:`medgain.synth.capsule.burn_marker`) is burnt into clean test frames, or when
the clean test images of a synthetic dermoscopy set are replaced by their inked twins (``medgain synth dermoscopy
--ink-probe``: the same image with the ink markings of the shortcut, and the ink's pixels).

AUC on clean test frames barely sees a shortcut; the probe asks the model directly. For every test frame it runs
the model on the frame as it is and on the same frame with the marker, and keeps the log-odds of being ill of
both (:func:`medgain.metrics.positive_score`), and the fraction of the marked frame's Grad-CAM (lesion class) that
falls on the marker's pixels. The result is cached per run as ``marker_probe.json``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medgain.attention import grad_cam
from medgain.metrics import positive_score
from medgain.model_file import atomic_write, load_checkpoint, load_model, load_model_spec
from medgain.synth.capsule import burn_marker, marker_mask
from medgain.transforms.io import read_frame

__all__ = ["PROBE_FILE", "marker_attention", "probe_frames", "run_marker_probe", "run_twin_probe"]

#: written into a run's folder by :func:`run_marker_probe`
PROBE_FILE = "marker_probe.json"


def marker_attention(cam: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per-sample fraction of the attention energy on the marker: ``sum(cam * region) / sum(cam)``.

    Args:
        cam: (B, 1, H, W) raw, non-negative Grad-CAM.
        region: (H, W) bool marker pixels at the cam's size, the same for every sample, or (B, H, W), one each.

    Returns:
        (B,) float64 in [0, 1]; 0 where the cam is all zero (no attention anywhere, so none on the marker).
    """
    flat = cam.detach().double().flatten(1)
    inside = (flat * region.reshape(-1 if region.dim() == 3 else 1, flat.shape[1]).to(flat.dtype)).sum(1)
    total = flat.sum(1)
    return inside / torch.where(total > 0, total, torch.ones_like(total))


def _region(frame_size: int, input_size: Sequence[int]) -> torch.Tensor:
    """The marker's pixels at the network input size: a pixel counts when the marker covers any of it."""
    mask = torch.from_numpy(marker_mask(frame_size)).float()[None, None]
    return F.interpolate(mask, size=tuple(input_size), mode="area")[0, 0] > 0


def _ink_region(path: Path, input_size: tuple[int, int]) -> torch.Tensor:
    """The pixels of an ink mask image at the network input size: a pixel counts when the ink touches any of it
    (as :func:`_region`; the lesion masks' half-coverage rule would drop strokes thinner than a pixel)."""
    with Image.open(path) as image:
        ink = torch.from_numpy(np.asarray(image.convert("L")) > 0).float()[None, None]
    return F.interpolate(ink, size=input_size, mode="area")[0, 0] > 0


def _prepare(frames: np.ndarray, input_size: Sequence[int]) -> torch.Tensor:
    """(B, H, W, 3) uint8 frames as the bundle feeds them: [0, 1] floats, (B, 3, h, w), bilinear to the input size."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    if tuple(x.shape[-2:]) != tuple(input_size):
        x = F.interpolate(x, size=tuple(input_size), mode="bilinear", align_corners=False)
    return x


def probe_frames(
    model: torch.nn.Module, frames: np.ndarray, input_size: Sequence[int], target_layer: str, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """Score clean and marked copies of frames and measure the marked frames' attention on the marker.

    Args:
        model: the classifier, in eval mode (class 1, or the classes after 0, = ill).
        frames: (N, S, S, 3) uint8 RGB frames, as the data set stores them.
        input_size: (h, w) the network input size.
        target_layer: the Grad-CAM layer.
        batch_size: frames per forward.

    Returns:
        ``score_clean``, ``score_marked`` (log-odds of being ill) and ``marker_attention``, each (N,) float64.
    """
    region = _region(frames.shape[1], input_size)
    out: dict[str, list[np.ndarray]] = {"score_clean": [], "score_marked": [], "marker_attention": []}
    for start in range(0, len(frames), batch_size):
        batch = frames[start:start + batch_size]
        marked = np.stack([burn_marker(f) for f in batch])
        with torch.no_grad():
            out["score_clean"].append(positive_score(model(_prepare(batch, input_size))).numpy())
            logits, cam = grad_cam(model, _prepare(marked, input_size), target_layer, class_index=1)
        out["score_marked"].append(positive_score(logits).numpy())
        out["marker_attention"].append(marker_attention(cam, region).numpy())
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


def _frame_uint8(path: str, frame: int) -> np.ndarray:
    return np.clip(np.rint(read_frame(path, frame) * 255.0), 0, 255).astype(np.uint8)


def run_marker_probe(
    run_dir: str | os.PathLike,
    items: Sequence[dict[str, Any]],
    dataset_dir: str | os.PathLike,
    checkpoint: str = "models/model.pt",
) -> dict[str, Any]:
    """The probe of one run, read from ``<run_dir>/marker_probe.json`` when written for the same checkpoint, else
    computed and written there (atomically).

    Args:
        run_dir: the run's bundle root.
        items: the clean test items (``image``, ``label``, optional ``frame``), paths absolute.
        dataset_dir: the data set, to name frames as the study report does (``file#frame``, file relative to it).
        checkpoint: the shipped model file, relative to ``run_dir``.

    Returns:
        ``{"checkpoint_mtime", "epoch", "threshold", "marker_area", "ids", "labels", "score_clean",
        "score_marked", "marker_attention"}``: the shipped epoch and decision threshold (None without an
        operating point), the marker's share of the input, then per-frame lists.

    Raises:
        FileNotFoundError: when the model file is missing.
        ValueError: naming the model file when it is not a medgain model file, or a frame that is not square RGB.
    """
    model_path, cached = _cached(run_dir, checkpoint)
    if cached is not None:
        return cached
    spec = load_model_spec(model_path)
    model = load_model(model_path)
    frames = np.stack([_frame_uint8(str(i["image"]), int(i.get("frame", 0))) for i in items])
    values = probe_frames(model, frames, spec.image_size, spec.target_layer)
    area = float(_region(frames.shape[1], spec.image_size).double().mean())
    return _store(run_dir, model_path, items, dataset_dir, area, {k: v.tolist() for k, v in values.items()})


def _cached(run_dir: str | os.PathLike, checkpoint: str) -> tuple[Path, dict[str, Any] | None]:
    """The model file of a run, and its probe when ``marker_probe.json`` was written for this very file."""
    model_path = Path(run_dir) / checkpoint
    if not model_path.is_file():
        raise FileNotFoundError(f"marker probe: no model file {model_path}")
    cache = Path(run_dir) / PROBE_FILE
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("checkpoint_mtime") == model_path.stat().st_mtime_ns:
            return model_path, cached
    return model_path, None


def _store(run_dir: str | os.PathLike, model_path: Path, items: Sequence[dict[str, Any]],
           dataset_dir: str | os.PathLike, marker_area: float, values: dict[str, list[float]]) -> dict[str, Any]:
    """The probe's result (see :func:`run_marker_probe`), written atomically to ``marker_probe.json``."""
    stored = load_checkpoint(model_path)
    threshold = (stored.get("operating_point") or {}).get("threshold")
    base = os.path.abspath(dataset_dir)
    result = {
        "checkpoint_mtime": model_path.stat().st_mtime_ns,
        "epoch": int(stored["epoch"]) if stored.get("epoch") is not None else None,
        "threshold": float(threshold) if threshold is not None and math.isfinite(float(threshold)) else None,
        "marker_area": marker_area,
        "ids": [f"{Path(os.path.relpath(os.path.abspath(str(i['image'])), base)).as_posix()}#{int(i.get('frame', 0))}"
                for i in items],
        "labels": [int(int(i["label"]) != 0) for i in items],
        **values,
    }
    atomic_write(Path(run_dir) / PROBE_FILE, lambda f: f.write(json.dumps(result).encode()))
    return result


def run_twin_probe(
    run_dir: str | os.PathLike,
    bundle: str | os.PathLike,
    config_files: Sequence[str],
    overrides: dict[str, Any],
    dataset_dir: str | os.PathLike,
    checkpoint: str,
    batch_size: int = 32,
) -> dict[str, Any]:
    """The probe of one run on twin images, as :func:`run_marker_probe` gives it (cached the same way).

    Each evaluated item (the bundle's ``eval_items``: the clean test images with their encoded metadata) is scored
    as it is and with its image replaced by ``<dataset_dir>/probe/images/<name>`` (the twin with the shortcut's
    ink); the twin's Grad-CAM share on ``probe/masks/<stem>_segmentation.png`` (the ink's pixels) is its marker
    attention. Images go through the bundle's own ``validate#preprocessing``, one view each (no test-time
    augmentation), so the run's config must give ``tta_views: 1`` for the shipped threshold to apply.

    Args:
        run_dir: the run's bundle root.
        bundle: the bundle folder.
        config_files: its evaluation config files (``train.yaml``, ``evaluate.yaml``).
        overrides: the run's evaluation overrides (data set, fold table, split, ...).
        dataset_dir: the data set, to name images as the study report does (``file#0``).
        checkpoint: the shipped model file, relative to ``run_dir``.
        batch_size: images per forward.

    Raises:
        FileNotFoundError: for a missing model file, or an evaluated image without a twin or an ink mask.
        ValueError: when the config gives more than one test-time view.
    """
    from monai.bundle import ConfigParser

    model_path, cached = _cached(run_dir, checkpoint)
    if cached is not None:
        return cached
    parser = ConfigParser()
    parser.read_meta(str(Path(bundle) / "configs" / "metadata.json"))
    parser.read_config([str(Path(bundle) / "configs" / name) for name in config_files])
    parser.update({**overrides, "bundle_root": str(run_dir)})
    parser.get_parsed_content("imports")
    if int(parser.get_parsed_content("tta_views")) != 1:
        raise ValueError(f"ink probe of {run_dir}: the probe scores one view; give the study tta_views: 1")
    items = parser.get_parsed_content("eval_items")
    transform = parser.get_parsed_content("validate#preprocessing")
    metadata_keys = list(parser.get_parsed_content("metadata_keys"))
    spec = load_model_spec(model_path)
    model = load_model(model_path)
    probe = Path(dataset_dir) / "probe"
    out: dict[str, list[torch.Tensor]] = {"score_clean": [], "score_marked": [], "marker_attention": [], "area": []}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        clean, marked, regions = [], [], []
        for item in chunk:
            name = Path(str(item["image"])).name
            twin = probe / "images" / name
            ink = probe / "masks" / f"{Path(name).stem}_segmentation.png"
            for path in (twin, ink):
                if not path.is_file():
                    raise FileNotFoundError(f"ink probe: {path} not found (the data set needs `--ink-probe`)")
            clean.append(transform(dict(item)))
            marked.append(torch.as_tensor(transform({**item, "image": str(twin)})["image"]))
            regions.append(_ink_region(ink, tuple(marked[-1].shape[-2:])))
        args = [torch.stack([torch.as_tensor(c[k]) for c in clean]) for k in metadata_keys]
        region = torch.stack(regions)
        with torch.no_grad():
            out["score_clean"].append(positive_score(model(torch.stack([torch.as_tensor(c["image"]) for c in clean]),
                                                           *args)))
            logits, cam = grad_cam(model, torch.stack(marked), spec.target_layer, class_index=1, forward_args=args)
        out["score_marked"].append(positive_score(logits))
        out["marker_attention"].append(marker_attention(cam, region))
        out["area"].append(region.double().flatten(1).mean(1))
    values = {k: torch.cat(v).double().tolist() if v else [] for k, v in out.items()}
    area = float(np.mean(values.pop("area"))) if items else 0.0
    return _store(run_dir, model_path, items, dataset_dir, area, values)
