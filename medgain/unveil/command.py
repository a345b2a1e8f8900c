"""``medgain unveil``: iterative unveiling of every frame of a folder with a trained checkpoint.

Per frame it writes a panel PNG (the frame, ROI 1..k outlined in distinct colours with the probability after each
step), the regions as a label map (PNG and NIfTI, value k inside ROI k, at the frame's own size), and one row of
``unveil.csv``; unreadable files go to ``errors.csv``. Unveiling stops once the model would no longer decide for
the target class: by default at the model's stored operating point (written in ``unveil.csv``).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.special import expit
from torch import nn

from medgain.data import scan_folder, write_errors_csv
from medgain.model_file import ModelSpec, build_network, load_checkpoint, load_model_spec, load_model_weights
from medgain.transforms import read_frame
from medgain.unveil.loop import UnveilResult, Unveiler
from medgain.unveil.panel import PanelSample, roi_label_map, unveil_panel

__all__ = ["CSV_FIELDS", "resolve_model", "run_unveil", "stop_probability"]

#: columns of ``unveil.csv``; per-step values are joined with ";".
CSV_FIELDS = (
    "file",
    "frame",
    "target",
    "initial_probability",
    "steps",
    "stop_reason",
    "probabilities",
    "roi_areas",
    "initial_score",
    "scores",
    "prob_threshold",
    "rejected_probability",
)

_SPEC_FIELDS = ("network", "num_classes", "image_size", "in_channels", "target_layer", "normalization", "class_names")


def _bundle_spec(bundle: str | os.PathLike) -> dict[str, Any]:
    """Model-spec fields of a bundle's ``configs/train.yaml`` (its ``model_spec``, else its plain variables)."""
    from monai.bundle import ConfigParser

    config = Path(bundle) / "configs" / "train.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: bundle training config not found (--bundle must be a bundle folder)")
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(bundle)
    if "model_spec" in parser:
        return dict(parser.get_parsed_content("model_spec"))
    return {key: parser.get_parsed_content(key) for key in _SPEC_FIELDS if key in parser}


def _bundle_name(bundle: str | os.PathLike) -> str:
    """The ``bundle_name`` of a bundle's ``configs/train.yaml`` (the folder's name when it has none)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(bundle) / "configs" / "train.yaml"))
    return str(parser.get("bundle_name", Path(bundle).resolve().name))


def stop_probability(
    given: float | None, checkpoint: Mapping[str, Any], target: int, num_classes: int
) -> tuple[float, str]:
    """The probability below which unveiling stops, and where it comes from.

    Args:
        given: the user's ``--prob-threshold``; None: the model's operating point.
        checkpoint: the model file's dict (its ``operating_point`` threshold is on the log-odds of class 1).
        target: the class explained.
        num_classes: the model's output logits.

    Returns:
        ``given``; else the operating point as a probability of ``target`` (where the model's decision changes:
        ``sigmoid(t)`` for class 1, ``sigmoid(-t)`` for class 0 of a two-class model); else 0.5 (a model without
        an operating point, or a class it does not apply to).
    """
    if given is not None:
        return float(given), "--prob-threshold given"
    point = checkpoint.get("operating_point")
    threshold = point.get("threshold") if isinstance(point, Mapping) else None
    if threshold is None or not np.isfinite(float(threshold)):
        reason = point.get("reason") if isinstance(point, Mapping) and point.get("reason") else "none stored"
        return 0.5, f"0.5: the model has no operating point ({reason})"
    if num_classes > 2 or target not in (0, 1):
        return 0.5, f"0.5: the model's operating point (classes 0 / 1) does not apply to class {target}"
    log_odds = float(threshold) if target == 1 else -float(threshold)
    probability = float(np.clip(expit(log_odds), 1e-12, 1.0 - 1e-12))
    return probability, f"the model's operating point, log-odds {float(threshold):.6g}"


def resolve_model(
    checkpoint: str | os.PathLike,
    bundle: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Build the network of a checkpoint and load its weights.

    The spec (network, classes, input size, channels, Grad-CAM layer, normalisation, class names) comes from the
    checkpoint's ``model_spec`` when it has one (written by ``BestModelSaver``): values in ``overrides`` must then
    agree with it, and given a ``bundle``, the model must have been trained by it. A checkpoint without a spec (a
    plain state dict, or one from an older BestModelSaver) is built from ``overrides`` completed by the bundle's
    training config.

    Args:
        checkpoint: checkpoint file.
        bundle: bundle folder whose ``configs/train.yaml`` completes a spec-less checkpoint, and whose models
            alone are run.
        overrides: spec fields given by the user (None values are ignored).

    Returns:
        ``(network in eval mode, spec, checkpoint dict)``.

    Raises:
        ValueError: when the spec cannot be completed, the model was trained by another bundle than ``bundle``,
            or the checkpoint disagrees with the overrides / network.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    stored = load_checkpoint(checkpoint)
    if isinstance(stored, Mapping) and isinstance(stored.get("model_spec"), Mapping):
        spec = load_model_spec(checkpoint, None if bundle is None else _bundle_name(bundle), **given)
    else:
        fields = {**(_bundle_spec(bundle) if bundle is not None else {}), **given}
        missing = [k for k in ("network", "num_classes", "image_size") if fields.get(k) is None]
        if missing:
            raise ValueError(
                f"{checkpoint}: holds no model_spec, and {missing} are not given (pass --bundle or the options "
                "--network / --num-classes / --image-size)"
            )
        spec = ModelSpec(**{k: v for k, v in fields.items() if k in _SPEC_FIELDS and v is not None})
    network = build_network(spec)
    return network.eval(), spec, load_model_weights(network, checkpoint)


def _output_stem(path: Path, root: Path, frame: int) -> str:
    rel = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
    return f"{'__'.join(rel.with_suffix('').parts)}_f{frame:03d}"


def _to_input(frame: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    """(H, W, 3) float32 [0, 1] → (C, h, w) network input (bilinear resize, grey for one input channel)."""
    image = torch.from_numpy(np.ascontiguousarray(frame.transpose(2, 0, 1)))
    if spec.in_channels == 1:
        image = image.mean(0, keepdim=True)
    elif spec.in_channels != 3:
        raise ValueError(f"medgain unveil reads RGB frames; the model takes {spec.in_channels} channels")
    return F.interpolate(image[None], size=spec.image_size, mode="bilinear", align_corners=False)[0]


def _resized(result: UnveilResult, size: tuple[int, int]) -> UnveilResult:
    """The result with its masks resized (nearest) to the original frame size."""

    def resize(mask: torch.Tensor) -> torch.Tensor:
        return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].bool()

    return dataclasses.replace(
        result,
        masks=[resize(m) for m in result.masks],
        cumulative=resize(result.cumulative) if result.cumulative is not None else None,
    )


def _joined(values: Sequence[float], fmt: str) -> str:
    return ";".join(format(v, fmt) for v in values)


def run_unveil(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    bundle: str | os.PathLike | None = None,
    *,
    target: int = 1,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    spec_overrides: Mapping[str, Any] | None = None,
    unveil_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Unveil every frame under ``input_dir`` and write panels, ROI label maps, ``unveil.csv`` and ``errors.csv``.

    Written under ``output_dir``: ``panels/<name>.png``, ``masks/<name>.png`` and ``masks/<name>.nii.gz`` (uint8
    label map at the frame's size: 0 outside, k inside ROI k; the NIfTI holds the array as-is with an identity
    affine), ``unveil.csv`` (:data:`CSV_FIELDS`, one row per frame) and ``errors.csv`` (unreadable files). ``<name>``
    is the file's path under ``input_dir`` without suffix (folders joined by ``__``) and ``_f<frame>``.

    Args:
        input_dir: folder of PNG / JPEG / DICOM frames (searched recursively, multi-frame files expanded).
        output_dir: output folder, created when missing.
        checkpoint: model checkpoint; default ``<bundle>/models/model.pt``.
        bundle: bundle folder (completes a checkpoint without a model spec; locates the default checkpoint).
        target: class index explained (default 1, "lesion").
        batch_size: frames unveiled together.
        device: torch device.
        spec_overrides: model-spec fields given by the user (see :func:`resolve_model`).
        unveil_options: keyword arguments of :class:`Unveiler` (source, steps, prob_threshold, fill, kernel_size,
            ...); the Grad-CAM layer defaults to the spec's; ``prob_threshold`` None or absent: the model's
            operating point (see :func:`stop_probability`).

    Returns:
        ``{"frames": n unveiled, "errors": n unreadable files, "csv": path, "spec": spec as dict,
        "prob_threshold": the stopping probability, "prob_threshold_source": where it comes from}``.

    Raises:
        ValueError: for a missing checkpoint / bundle, or a target outside the model's classes.
        NotADirectoryError: when ``input_dir`` is not a folder.
    """
    if checkpoint is None:
        if bundle is None:
            raise ValueError("medgain unveil: give --checkpoint or --bundle (whose models/model.pt is used)")
        checkpoint = Path(bundle) / "models" / "model.pt"
    if batch_size < 1:
        raise ValueError(f"medgain unveil: batch_size must be >= 1, got {batch_size}")
    network, spec, stored = resolve_model(checkpoint, bundle, spec_overrides)
    if not 0 <= target < max(spec.num_classes, 2):
        raise ValueError(f"medgain unveil: target class {target} is not one of the model's {spec.num_classes} classes")
    network = network.to(device)
    options = dict(unveil_options or {})
    stop, stop_source = stop_probability(options.pop("prob_threshold", None), stored, target, spec.num_classes)
    unveiler = Unveiler(**{"target_layer": spec.target_layer, **options, "prob_threshold": stop})
    root, out = Path(input_dir), Path(output_dir)
    items, errors = scan_folder(root)
    for folder in ("panels", "masks"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(items), batch_size):
        frames, inputs = [], []
        for item in items[start : start + batch_size]:
            try:
                frame = read_frame(item["image"], item["frame"])
            except (ValueError, OSError) as err:
                errors.append({"file": item["image"], "reason": str(err)})
                continue
            frames.append((item, frame))
            inputs.append(_to_input(frame, spec))
        if not inputs:
            continue
        results = unveiler(network, torch.stack(inputs).to(device), target)
        for (item, frame), result in zip(frames, results):
            path = Path(item["image"])
            name = _output_stem(path, root, int(item["frame"]))
            full = _resized(result, frame.shape[:2])
            fig = unveil_panel([PanelSample(torch.from_numpy(frame.transpose(2, 0, 1)), full, path.name)])
            fig.savefig(out / "panels" / f"{name}.png", dpi=100)
            label_map = roi_label_map(full)
            Image.fromarray(label_map).save(out / "masks" / f"{name}.png")
            nifti = nib.Nifti1Image(label_map, np.eye(4))
            nifti.set_data_dtype(np.uint8)
            nib.save(nifti, out / "masks" / f"{name}.nii.gz")
            rows.append(
                {
                    "file": str(path),
                    "frame": int(item["frame"]),
                    "target": result.target,
                    "initial_probability": f"{result.initial_probability:.6f}",
                    "steps": result.steps,
                    "stop_reason": result.stop_reason,
                    "probabilities": _joined(result.probabilities, ".6f"),
                    "roi_areas": _joined(full.areas, ".6f"),
                    "initial_score": f"{result.initial_score:.6f}",
                    "scores": _joined(result.scores, ".6f"),
                    "prob_threshold": f"{stop:.6g}",
                    "rejected_probability": "" if result.rejected_probability is None else
                    f"{result.rejected_probability:.6f}",
                }
            )
    csv_path = out / "unveil.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    write_errors_csv(errors, out)
    return {"frames": len(rows), "errors": len(errors), "csv": csv_path, "spec": spec.as_dict(),
            "prob_threshold": stop, "prob_threshold_source": stop_source}
