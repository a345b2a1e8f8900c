"""The marker-reliance probe of a shortcut study: how much a trained model's lesion score and attention move when
the synthetic capsule marker (:func:`medgain.synth.capsule.burn_marker`) is burnt into clean test frames.

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

from medgain.attention import grad_cam
from medgain.metrics import positive_score
from medgain.model_file import atomic_write, load_checkpoint, load_model, load_model_spec
from medgain.synth.capsule import burn_marker, marker_mask
from medgain.transforms.io import read_frame

__all__ = ["PROBE_FILE", "marker_attention", "probe_frames", "run_marker_probe"]

#: written into a run's folder by :func:`run_marker_probe`
PROBE_FILE = "marker_probe.json"


def marker_attention(cam: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per-sample fraction of the attention energy on the marker: ``sum(cam * region) / sum(cam)``.

    Args:
        cam: (B, 1, H, W) raw, non-negative Grad-CAM.
        region: (H, W) bool marker pixels at the cam's size.

    Returns:
        (B,) float64 in [0, 1]; 0 where the cam is all zero (no attention anywhere, so none on the marker).
    """
    flat = cam.detach().double().flatten(1)
    inside = (flat * region.reshape(1, -1).to(flat.dtype)).sum(1)
    total = flat.sum(1)
    return inside / torch.where(total > 0, total, torch.ones_like(total))


def _region(frame_size: int, input_size: Sequence[int]) -> torch.Tensor:
    """The marker's pixels at the network input size: a pixel counts when the marker covers any of it."""
    mask = torch.from_numpy(marker_mask(frame_size)).float()[None, None]
    return F.interpolate(mask, size=tuple(input_size), mode="area")[0, 0] > 0


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
    model_path = Path(run_dir) / checkpoint
    if not model_path.is_file():
        raise FileNotFoundError(f"marker probe: no model file {model_path}")
    cache = Path(run_dir) / PROBE_FILE
    mtime = model_path.stat().st_mtime_ns
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("checkpoint_mtime") == mtime:
            return cached
    spec = load_model_spec(model_path)
    stored = load_checkpoint(model_path)
    threshold = (stored.get("operating_point") or {}).get("threshold")
    model = load_model(model_path)
    frames = np.stack([_frame_uint8(str(i["image"]), int(i.get("frame", 0))) for i in items])
    input_size = spec.image_size
    values = probe_frames(model, frames, input_size, spec.target_layer)
    base = os.path.abspath(dataset_dir)
    ids = [f"{Path(os.path.relpath(os.path.abspath(str(i['image'])), base)).as_posix()}#{int(i.get('frame', 0))}"
           for i in items]
    result = {
        "checkpoint_mtime": mtime,
        "epoch": int(stored["epoch"]) if stored.get("epoch") is not None else None,
        "threshold": float(threshold) if threshold is not None and math.isfinite(float(threshold)) else None,
        "marker_area": float(_region(frames.shape[1], input_size).double().mean()),
        "ids": ids,
        "labels": [int(int(i["label"]) != 0) for i in items],
        **{k: v.tolist() for k, v in values.items()},
    }
    atomic_write(cache, lambda f: f.write(json.dumps(result).encode()))
    return result
