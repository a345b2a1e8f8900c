"""Iterative unveiling of fixed validation images every round: panels in MLflow and ``val_unveil_recall``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medgain.handlers.utils import active_run_id, attach_per_round, batch_has, log_artifact, require_keys
from medgain.metrics import binary_labels, stack_output, unveil_recall
from medgain.unveil import Unveiler
from medgain.unveil.panel import PanelSample, unveil_panel

if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

__all__ = ["UnveilPanelSaver"]


class UnveilPanelSaver:
    """Unveils the regions behind the "ill" decision on a fixed set of validation images at every round.

    The set is the first ``num_samples`` ill samples in validation order (the validation loader is not shuffled,
    so the same images every round), taken from ``engine.state.batch`` and kept as CPU copies. At
    ``Events.EPOCH_COMPLETED`` the evaluator's network unveils them (:class:`medgain.unveil.Unveiler`, class
    ``target``); the first ``num_panels`` are drawn as one panel (image; ROI 1..k outlined with the probability
    after each step; the lesion-mask contour) written to ``output_dir/unveil/epoch_{epoch:03d}.png`` and logged to
    MLflow under ``artifact_path``. Over the samples with a real lesion mask, ``metric_name`` is the fraction of
    lesions (connected components of the mask) that the union of the unveiled regions covers by at least
    ``min_overlap`` (:func:`medgain.metrics.unveil_recall`): it is put in ``engine.state.metrics`` and logged to
    MLflow with the round's epoch as step. It is NaN (and not logged) when none of them has a lesion.

    Args:
        output_dir: folder under which ``unveil/`` is created.
        unveiler: the unveiling options (source, steps, stopping probability, smoothing, fill).
        num_samples: ill validation samples unveiled every round.
        num_panels: how many of them are drawn (<= ``num_samples``).
        target: class whose evidence is unveiled.
        min_overlap: fraction of a lesion that must be covered to count as found.
        mlflow_handler: the MONAI ``MLFlowHandler`` owning the run, or None to only write files.
        artifact_path: MLflow artifact folder.
        metric_name: name of the recall in ``engine.state.metrics`` and MLflow.
        image_key: batch key of the images (as the network takes them).
        label_key: batch key of the labels.
        mask_key: batch key of the (B, 1, H, W) lesion masks.
        has_mask_key: batch key telling which masks are real (all are when absent).
        batch_size: samples unveiled together.
    """

    def __init__(
        self,
        output_dir: str,
        unveiler: Unveiler,
        num_samples: int = 16,
        num_panels: int = 4,
        target: int = 1,
        min_overlap: float = 0.25,
        mlflow_handler: MLFlowHandler | None = None,
        artifact_path: str = "unveil",
        metric_name: str = "val_unveil_recall",
        image_key: str = "image",
        label_key: str = "label",
        mask_key: str = "mask",
        has_mask_key: str = "has_mask",
        batch_size: int = 8,
    ) -> None:
        if num_samples < 1 or not 0 <= num_panels <= num_samples or batch_size < 1:
            raise ValueError(
                "UnveilPanelSaver: needs num_samples >= 1, 0 <= num_panels <= num_samples and batch_size >= 1, got "
                f"num_samples={num_samples}, num_panels={num_panels}, batch_size={batch_size}"
            )
        if not 0.0 < min_overlap <= 1.0:
            raise ValueError(f"UnveilPanelSaver: min_overlap must be in (0, 1], got {min_overlap}")
        self.output_dir = Path(output_dir)
        self.unveiler = unveiler
        self.num_samples = num_samples
        self.num_panels = num_panels
        self.target = target
        self.min_overlap = min_overlap
        self.mlflow_handler = mlflow_handler
        self.artifact_path = artifact_path
        self.metric_name = metric_name
        self.keys = (image_key, label_key, mask_key, has_mask_key)
        self.batch_size = batch_size
        self.samples: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        """Select samples every iteration of ``engine`` and unveil them at the end of each round."""
        attach_per_round(engine, self)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the samples of the previous round."""
        self.samples = []

    def __call__(self, engine: Engine) -> None:
        """Keep CPU copies of the batch's ill samples while fewer than ``num_samples`` are held."""
        if len(self.samples) >= self.num_samples:
            return
        image_key, label_key, mask_key, has_mask_key = self.keys
        batch = engine.state.batch
        require_keys(batch, (image_key, label_key), "UnveilPanelSaver")
        image, label = stack_output(batch, (image_key, label_key))
        mask = stack_output(batch, (mask_key,))[0] if batch_has(batch, mask_key) else None
        has_mask = None
        if batch_has(batch, has_mask_key):
            has_mask = stack_output(batch, (has_mask_key,))[0].reshape(-1).bool().tolist()
        for i in torch.nonzero(binary_labels(label)).reshape(-1).tolist():
            if len(self.samples) >= self.num_samples:
                break
            real = mask is not None and (has_mask is None or has_mask[i])
            self.samples.append(
                {
                    "image": image[i].detach().cpu().clone(),
                    "mask": mask[i].reshape(mask.shape[-2:]).detach().cpu().clone() if real else None,
                }
            )

    def write(self, engine: Engine) -> None:
        """Unveil the round's samples, compute the recall, draw and log the panel."""
        if not self.samples:
            warnings.warn("UnveilPanelSaver: no ill validation sample seen, nothing unveiled", stacklevel=2)
            return
        network = engine.network  # type: ignore[attr-defined]
        device = next(network.parameters()).device
        results = []
        for start in range(0, len(self.samples), self.batch_size):
            images = torch.stack([s["image"] for s in self.samples[start : start + self.batch_size]]).to(device)
            results.extend(self.unveiler(network, images.float(), self.target))
        with_mask = [(r.cumulative, s["mask"]) for r, s in zip(results, self.samples) if s["mask"] is not None]
        recall = unveil_recall(*zip(*with_mask), min_overlap=self.min_overlap).recall if with_mask else math.nan
        engine.state.metrics[self.metric_name] = recall
        epoch = int(engine.state.epoch)
        if self.mlflow_handler is not None and math.isfinite(recall):
            run_id = active_run_id(self.mlflow_handler)
            self.mlflow_handler.client.log_metric(run_id, self.metric_name, recall, step=epoch)
        if self.num_panels:
            self._draw(results[: self.num_panels], self.samples[: self.num_panels], epoch)

    def _draw(self, results: Sequence[Any], samples: Sequence[dict[str, Any]], epoch: int) -> None:
        panels = [
            PanelSample(s["image"], r, f"validation sample {i + 1}", s["mask"])
            for i, (r, s) in enumerate(zip(results, samples))
        ]
        fig = unveil_panel(panels, suptitle=f"Iterative unveiling, epoch {epoch}")
        folder = self.output_dir / "unveil"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"epoch_{epoch:03d}.png"
        fig.savefig(path, dpi=100)
        log_artifact(self.mlflow_handler, path, self.artifact_path)
