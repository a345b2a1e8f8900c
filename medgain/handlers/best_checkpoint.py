"""The best model of a training run, saved with its operating point and what is needed to run it."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medgain.handlers.utils import attach_once, finite_or_none, log_artifact, metrics_as_floats
from medgain.metrics.confidence import CONFIDENCE, fpr_upper_bound, operating_point_words
from medgain.metrics.scores import score_to_probability
from medgain.model_file import ModelSpec, atomic_write, load_checkpoint, unwrap

if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.handlers import MLFlowHandler

    from medgain.handlers.attention_overlay import AttentionOverlaySaver

__all__ = ["BestModelSaver"]

logger = logging.getLogger(__name__)


def _rank(value: float) -> tuple[int, float]:
    """Sort key under which NaN is below every number."""
    return (0, 0.0) if math.isnan(value) else (1, value)


class BestModelSaver:
    """Keeps the best model of a run, judged on a validation metric, with the operating point to deploy.

    Attached to the validation evaluator, at each ``Events.EPOCH_COMPLETED`` it compares ``metric`` (greater is
    better; ``tie_breaker`` decides equal values; NaN is never better than a number) with the best so far and,
    when better or in the first round, atomically replaces ``save_dir/filename`` with the model file described
    in :mod:`medgain.model_file`: weights (unwrapped from DistributedDataParallel, on CPU), ``model_spec``,
    ``operating_point``, ``epoch`` and every metric. The operating point's threshold is the log-odds of being ill
    at which the validation round reached the best TPR at ``max_fpr`` (``metrics[threshold_metric]``); when that
    threshold is missing or not finite (TPR 0 at that budget, a single-class round) it is stored as None with the
    reason, and the model takes no decisions until retrained.

    The operating point also records what it is worth: ``negatives`` and ``positives`` of the validation round
    and ``false_alarms`` at the threshold (the threshold metric's ``_negatives``, ``_positives`` and
    ``_false_alarms`` companions written by :class:`~medgain.handlers.tpr_at_fpr.TPRAtFPR`), ``fpr_upper``, the
    one-sided 95 % Clopper–Pearson upper bound of the false-alarm rate at the threshold
    (:func:`~medgain.metrics.confidence.fpr_upper_bound`), ``confidence``, ``unit`` and ``statement``, the same
    in words (:func:`~medgain.metrics.confidence.operating_point_words`). When the bound exceeds ``max_fpr`` the
    statement is logged as a warning: the validation split was too small to back the budget.

    With ``attention_gallery`` (the validation :class:`~medgain.handlers.AttentionOverlaySaver`, listed BEFORE this
    handler so that it renders first) the model file also stores ``attention_display``: ``{"scale", "how"}``, the
    top of the colour scale of the saved round's gallery, which inference heatmaps use by default
    (:func:`medgain.model_file.load_attention_display`), so that both show attention on one scale.

    It also writes ``<filename stem>_metrics.json`` (epoch, operating point and metrics; NaN as null) and, with an
    MLflow handler, logs both files under ``checkpoint/`` of the run (replaced by each better round). Registering
    the final best model is :class:`~medgain.handlers.model_registration.ModelRegistration`'s job.

    Args:
        save_dir: folder of the checkpoint; created when missing.
        network: the trained model.
        metric: name in ``engine.state.metrics`` that selects the best model.
        tie_breaker: metric deciding between equal ``metric`` values; None for none.
        threshold_metric: metric holding the decision threshold (log-odds of being ill >= threshold means "ill").
        max_fpr: the false-alarm budget the threshold was chosen for, stored with it.
        filename: checkpoint file name.
        model_spec: what the network is and how its input looks (:func:`medgain.model_file.spec_from_config`),
            stored so that evaluation and inference rebuild the model without repeating training options.
        mlflow_handler: the MONAI ``MLFlowHandler`` owning the run, or None to only write files.
        resume: start from the metrics of an existing checkpoint at ``save_dir/filename`` (a resumed run then
            only replaces it with a better model).
        unit: what the validation negatives are, in the statement, e.g. "normal frames".
        attention_gallery: the validation gallery whose colour scale is stored with the model; None for none.

    When the gallery rendered nothing for the saved round (no frames to show, or it is attached after this
    handler) the model file stores no scale, and a warning says why: inference heatmaps then say on the picture
    that they are scaled per frame.
    """

    def __init__(
        self,
        save_dir: str,
        network: nn.Module,
        metric: str = "val_tpr_at_fpr_0.001",
        tie_breaker: str | None = "val_auc",
        threshold_metric: str = "val_tpr_at_fpr_0.001_threshold",
        max_fpr: float = 0.001,
        filename: str = "model.pt",
        model_spec: Mapping[str, Any] | None = None,
        mlflow_handler: MLFlowHandler | None = None,
        resume: bool = False,
        unit: str = "healthy validation samples",
        attention_gallery: AttentionOverlaySaver | None = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.network = network
        self.metric = metric
        self.tie_breaker = tie_breaker
        self.threshold_metric = threshold_metric
        self.max_fpr = float(max_fpr)
        self.filename = filename
        self.model_spec = None if model_spec is None else ModelSpec(**model_spec).as_dict()
        self.mlflow_handler = mlflow_handler
        self.unit = unit
        self.attention_gallery = attention_gallery
        self.best_key: tuple[tuple[int, float], ...] | None = None
        self.best_epoch: int | None = None
        self.best_metrics: dict[str, float] = {}
        if resume and self.checkpoint_path.is_file():  # a resumed run must beat the best it already saved
            saved = load_checkpoint(self.checkpoint_path)
            if isinstance(saved, Mapping) and isinstance(saved.get("metrics"), Mapping):
                self.best_metrics = {k: float(v) for k, v in saved["metrics"].items()}
                self.best_key = self._key(self.best_metrics)
                self.best_epoch = int(saved.get("epoch", 0))

    @property
    def checkpoint_path(self) -> Path:
        """Path of the best checkpoint."""
        return self.save_dir / self.filename

    def _key(self, metrics: Mapping[str, float]) -> tuple[tuple[int, float], ...]:
        ranked = [self.metric] + ([self.tie_breaker] if self.tie_breaker else [])
        return tuple(_rank(float(metrics.get(name, math.nan))) for name in ranked)

    def attach(self, engine: Engine) -> None:
        """Judge the model at the end of every evaluation round of ``engine``."""
        from ignite.engine import Events

        attach_once(engine, [(Events.EPOCH_COMPLETED, self)])

    def __call__(self, engine: Engine) -> None:
        """Save the model when this round is the best so far."""
        metrics = metrics_as_floats(engine.state.metrics)
        ranked = [self.metric] + ([self.tie_breaker] if self.tie_breaker else [])
        # the threshold metric is absent when it is not finite; the TPR it belongs to must be there
        tpr_metric = self.threshold_metric.removesuffix("_threshold")
        missing = [name for name in dict.fromkeys((*ranked, tpr_metric)) if name not in metrics]
        if missing:
            raise KeyError(f"BestModelSaver: engine.state.metrics has no {missing}; available: {sorted(metrics)}")
        key = self._key(metrics)
        if self.best_key is not None and key <= self.best_key:
            return
        point = self.operating_point(metrics)
        self._save(point, metrics, int(engine.state.epoch))  # a failed save leaves the previous best in place
        self.best_key, self.best_epoch, self.best_metrics = key, int(engine.state.epoch), metrics
        logger.info(
            "validation round %d: best model so far (%s) saved to %s",
            self.best_epoch,
            ", ".join(f"{name}={metrics[name]:.4f}" for name in ranked),
            self.checkpoint_path,
        )
        upper = point.get("fpr_upper")
        if upper is not None and upper > self.max_fpr:
            logger.warning("operating point of validation round %d: %s", self.best_epoch, point["statement"])

    def operating_point(self, metrics: Mapping[str, float]) -> dict[str, Any]:
        """The operating point of a round's metrics: a finite threshold, or None with the reason, with the counts it
        was chosen on, the bound of its false-alarm rate and the statement in words."""
        threshold = metrics.get(self.threshold_metric, math.nan)
        point: dict[str, Any] = {"max_fpr": self.max_fpr, "metric": self.metric, "value": metrics[self.metric]}
        base = self.threshold_metric.removesuffix("_threshold")
        for count in ("negatives", "positives", "false_alarms"):
            value = metrics.get(f"{base}_{count}", math.nan)
            if math.isfinite(value):
                point[count] = int(value)
        if math.isfinite(threshold):
            point["threshold"] = float(threshold)
            point["probability"] = float(score_to_probability(threshold))
        else:
            tpr = metrics.get(self.threshold_metric.removesuffix("_threshold"), math.nan)
            point["threshold"] = None
            point["reason"] = (
                f"no finite threshold reaches TPR > 0 at FPR <= {self.max_fpr:g} on validation (TPR {tpr:.4g})"
                if not math.isnan(tpr)
                else "the validation round had a single class"
            )
            point.pop("false_alarms", None)
        if point.get("threshold") is not None and {"negatives", "false_alarms"} <= point.keys():
            point["fpr_upper"] = fpr_upper_bound(point["false_alarms"], point["negatives"])
            point["confidence"] = CONFIDENCE
        point["unit"] = self.unit
        point["statement"] = operating_point_words(point)
        return point

    def _save(self, point: dict[str, Any], metrics: dict[str, float], epoch: int) -> None:
        weights = {name: tensor.detach().cpu() for name, tensor in unwrap(self.network).state_dict().items()}
        checkpoint: dict[str, Any] = {"model": weights, "operating_point": point, "epoch": epoch, "metrics": metrics}
        if self.model_spec is not None:
            checkpoint["model_spec"] = self.model_spec
        display = self._attention_display(epoch)
        if display is not None:
            checkpoint["attention_display"] = display
        summary = {
            "epoch": epoch,
            "operating_point": {k: finite_or_none(v) if isinstance(v, float) else v for k, v in point.items()},
            "metrics": {k: finite_or_none(v) for k, v in metrics.items()},
            **({} if display is None else {"attention_display": display}),
        }
        self.save_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.checkpoint_path, lambda f: torch.save(checkpoint, f))
        atomic_write(self.summary_path, lambda f: f.write(json.dumps(summary, indent=2, allow_nan=False).encode()))
        log_artifact(self.mlflow_handler, self.checkpoint_path, "checkpoint")
        log_artifact(self.mlflow_handler, self.summary_path, "checkpoint")

    def _attention_display(self, epoch: int) -> dict[str, Any] | None:
        """The colour scale of this round's attention gallery, or None without one (with a warning)."""
        if self.attention_gallery is None:
            return None
        shown = self.attention_gallery.display
        if shown is None or shown["epoch"] != epoch:
            logger.warning(
                "BestModelSaver: the attention gallery rendered nothing for validation round %d (no frames to show, "
                "or the AttentionOverlaySaver is listed after BestModelSaver): the model file stores no attention "
                "scale, and inference heatmaps will be scaled per frame", epoch,
            )
            return None
        return {"scale": float(shown["scale"]), "how": str(shown["how"])}

    @property
    def summary_path(self) -> Path:
        """Path of the best checkpoint's JSON summary."""
        return self.save_dir / f"{Path(self.filename).stem}_metrics.json"
