"""GAIN (Li et al., CVPR 2018) as a MONAI training-engine handler."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from numbers import Real
from typing import TYPE_CHECKING, Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from medgain.attention import (
    ActivationCapture,
    cam_from_activations,
    erase,
    normalize_cam,
    resolve_layer,
    soft_mask,
    target_scores,
)
from medgain.losses import attention_area_loss, attention_mining_loss, extra_supervision_loss

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["GAINHandler", "LOSS_TERMS", "gain_loss_terms"]

LOSS_TERMS = ("loss_cl", "loss_am", "loss_ex", "loss_area")
MULTILABEL_MODES = (None, "per_label", "all_labels")
logger = logging.getLogger(__name__)


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the incoming gradient by a constant."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


@contextlib.contextmanager
def _batchnorm_eval(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Put every BatchNorm layer in eval mode (running statistics, no update) for the duration."""
    switched = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training] if enabled else []
    for m in switched:
        m.training = False
    try:
        yield
    finally:
        for m in switched:
            m.training = True


def _check_area_bounds(bounds: Any) -> tuple[float, float]:
    """``(lo, hi)`` as floats, or ValueError unless it is two real numbers with ``0 <= lo <= hi <= 1``."""
    valid = isinstance(bounds, Sequence) and not isinstance(bounds, str) and len(bounds) == 2
    valid = valid and all(isinstance(v, Real) and not isinstance(v, bool) for v in bounds)
    if not valid or not 0.0 <= float(bounds[0]) <= float(bounds[1]) <= 1.0:
        raise ValueError(f"area_bounds must be two numbers 0 <= lo <= hi <= 1 (image fractions), got {bounds!r}")
    return float(bounds[0]), float(bounds[1])


def _unwrap(network: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or the network itself)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return network.module if isinstance(network, wrappers) else network


class GAINHandler:
    """Adds GAIN's attention-mining, extra-supervision and attention-area losses to a MONAI ``SupervisedTrainer``.

    On ``IterationEvents.LOSS_COMPLETED`` it takes Grad-CAM of each sample's ground-truth class from the
    activations recorded during the trainer's own forward (the first forward is not repeated), erases the
    attended region, runs the second forward on the erased images and adds
    ``am_weight * L_am + ex_weight * L_ex + area_weight * L_area`` to ``engine.state.output[Keys.LOSS]`` before
    the trainer's backward (also on the AMP path: MONAI re-reads the loss after the event). The terms are
    stored detached in ``engine.state.output`` as ``loss_cl`` and, for each term switched on (weight > 0; 0 before
    its start epoch), ``loss_am``, ``loss_ex`` and ``loss_area``: a term switched off is not logged as a constant
    0.

    Labels: class indices (B,) or (B, 1) for single-label models (class 0 = healthy / negative); multi-hot
    (B, K) with ``multilabel_mode``. Masks come from the batch (``mask_key``, (B, 1, H, W) or (B, K, H, W) per
    label) and supervise the ground-truth-class attention of positive samples whose ``has_mask_key`` is true
    and whose mask is not empty (without a ``has_mask_key`` entry, a foreground pixel is enough). A batch
    without a mask key skips L_ex; a batch without positives skips positive-only L_am; both count as 0.

    Models with further inputs (e.g. ``FusionClassifier(image, metadata)`` under
    ``prepare_batch=monai.engines.PrepareBatchExtraInput({"metadata": "metadata"})``): the extra positional and
    keyword inputs of the trainer's forward are recorded, and the second forward gets them at the rows of the
    erased images (tensors whose first dimension is the batch size are indexed, other values passed unchanged).
    The cam is always taken on the image branch (``target_layer``).

    Distributed training: the second forward calls the module inside the ``DistributedDataParallel`` wrapper
    directly (``torch.func.functional_call``), so DDP sees one forward per iteration, and both passes reach the
    parameters in the single backward of the trainer: autograd sums the contributions before each parameter's
    accumulate-grad hook runs, so DDP's reducer fires once per parameter and no parameter is left unused
    (``find_unused_parameters`` is not needed). Grad-CAM uses ``torch.autograd.grad`` w.r.t. activations only,
    which never triggers the reducer.

    Args:
        target_layer: ``named_modules()`` name of the Grad-CAM layer (see ``medgain.networks.TARGET_LAYERS``).
        sigma: soft-mask threshold on the normalised cam.
        omega: soft-mask sharpness.
        am_weight: weight of the attention-mining loss (0 disables the second forward).
        ex_weight: weight of the extra-supervision loss.
        area_weight: weight of the attention-area bound.
        area_bounds: (lo, hi) prior interval of the soft-mask area, fractions with ``0 <= lo <= hi <= 1``
            (checked here, not when the warm-up ends); required when ``area_weight > 0``.
        am_on_all: mine attention on every sample's ground-truth class, not only on positives.
        am_start_epoch: epochs of warm-up (0-based count) before L_am and the area bound switch on.
        ex_start_epoch: epochs of warm-up before L_ex switches on.
        grad_magnitude: m; gradients of L_am that reach the parameters through the second (erased-image) forward
            are multiplied by 1/m, those through the attention path are untouched; ``inf`` switches them off.
        freeze_bn_on_erased: BatchNorm uses running statistics (and does not update them) on the erased images.
        cam_weights_grad: differentiate through the Grad-CAM channel weights too (second-order graph).
        cam_negative_slope: slope of the training cam below zero (a leaky ReLU; 0 is Grad-CAM's ReLU). With 0, a
            cam positive at a single location is normalised to the same fixed blob whatever the weights, and no
            loss on it has a gradient (the location's value divided by itself, the rest cut by the ReLU), so extra
            supervision cannot move it (docs/evidence.md, "Shortcut"). A small slope (e.g. 0.01) keeps gradients.
        fill: erase fill, a scalar or per-channel colour (e.g. the mean lesion colour).
        mask_key: batch key of the lesion masks.
        has_mask_key: batch key of the per-sample "mask is real" flags.
        multilabel_mode: None (single-label), "per_label" (one cam and erased copy per ground-truth label, all in
            one batched second pass) or "all_labels" (one cam of the summed ground-truth scores per image).
    """

    def __init__(
        self,
        target_layer: str,
        sigma: float = 0.5,
        omega: float = 10.0,
        am_weight: float = 1.0,
        ex_weight: float = 10.0,
        area_weight: float = 0.0,
        area_bounds: Sequence[float] | None = None,
        am_on_all: bool = False,
        am_start_epoch: int = 0,
        ex_start_epoch: int = 0,
        grad_magnitude: float = 1.0,
        freeze_bn_on_erased: bool = True,
        cam_weights_grad: bool = False,
        cam_negative_slope: float = 0.0,
        fill: float | Sequence[float] | torch.Tensor = 0.0,
        mask_key: str = "mask",
        has_mask_key: str = "has_mask",
        multilabel_mode: str | None = None,
    ) -> None:
        if multilabel_mode not in MULTILABEL_MODES:
            raise ValueError(f"multilabel_mode must be one of {MULTILABEL_MODES}, got {multilabel_mode!r}")
        grad_magnitude = float(grad_magnitude)  # also accepts "inf" from a command line
        if not (grad_magnitude > 0):
            raise ValueError(f"grad_magnitude must be > 0 (inf switches the gradients off), got {grad_magnitude}")
        if area_weight > 0 and area_bounds is None:
            raise ValueError("area_weight > 0 needs area_bounds=(lo, hi)")
        if area_bounds is not None:
            area_bounds = _check_area_bounds(area_bounds)
        self.target_layer = target_layer
        self.sigma, self.omega = float(sigma), float(omega)
        self.am_weight, self.ex_weight, self.area_weight = float(am_weight), float(ex_weight), float(area_weight)
        self.area_bounds = area_bounds
        self.am_on_all = am_on_all
        self.am_start_epoch, self.ex_start_epoch = int(am_start_epoch), int(ex_start_epoch)
        self.grad_magnitude = float(grad_magnitude)
        self.freeze_bn_on_erased = freeze_bn_on_erased
        self.cam_weights_grad = cam_weights_grad
        if not 0.0 <= float(cam_negative_slope) < 1.0:
            raise ValueError(f"cam_negative_slope must be in [0, 1), got {cam_negative_slope!r}")
        self.cam_negative_slope = float(cam_negative_slope)
        self.fill = fill
        self.mask_key, self.has_mask_key = mask_key, has_mask_key
        self.multilabel_mode = multilabel_mode
        self._capture: ActivationCapture | None = None
        self._extra_inputs: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})
        self._warned_no_mask = False
        if self.am_weight > 0 and math.isfinite(self.grad_magnitude) and freeze_bn_on_erased:
            logger.warning(
                "GAIN: attention mining with the erased-path gradients on (grad_magnitude=%g) and BatchNorm frozen on "
                "the erased images: the mining loss then trains the running-statistics network, which the "
                "classification loss never sees, and with extra supervision this stalled training (docs/evidence.md, "
                "Shortcut, rows am_ex, am_ex_bn_batch, am_ex_grad_off). Set grad_magnitude=inf (the bundles' "
                "setting) or freeze_bn_on_erased=False.", self.grad_magnitude)

    def attach(self, engine: Engine) -> None:
        """Register on the trainer's events; the target layer of ``engine.network`` is hooked when the run starts
        (MONAI attaches handlers before the trainer holds its network)."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._hook_network)
        engine.add_event_handler(Events.ITERATION_STARTED, self._arm)
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._disarm)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def _hook_network(self, engine: Engine) -> None:
        if self._capture is None:
            self._capture = ActivationCapture(resolve_layer(engine.network, self.target_layer))
            self._capture.enabled = False
            _unwrap(engine.network).register_forward_pre_hook(self._record_inputs, with_kwargs=True)

    def _record_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Keep the inputs after the images of the trainer's own forward (not those of the second forward)."""
        if self._capture is not None and self._capture.enabled:
            self._extra_inputs = (tuple(args[1:]), dict(kwargs))

    def _arm(self, engine: Engine) -> None:
        assert self._capture is not None
        self._capture.enabled = True
        self._extra_inputs = ((), {})

    def _disarm(self, engine: Engine) -> None:
        assert self._capture is not None
        self._capture.enabled = False

    def __call__(self, engine: Engine) -> None:
        """Compute the GAIN terms for the current iteration and add them to the loss."""
        assert self._capture is not None, "GAINHandler.attach(trainer) was not called"
        activations = self._capture.pop()
        output = engine.state.output
        epoch = engine.state.epoch - 1
        am_on = self.am_weight > 0 and epoch >= self.am_start_epoch
        area_on = self.area_weight > 0 and epoch >= self.am_start_epoch
        ex_on = self.ex_weight > 0 and epoch >= self.ex_start_epoch
        loss_cl = output[Keys.LOSS]
        zero = loss_cl.detach().new_zeros(())
        terms = {"loss_am": zero, "loss_ex": zero, "loss_area": zero}
        masks = self._batch_masks(engine, output[Keys.IMAGE]) if ex_on else None
        if am_on or area_on or masks is not None:
            if activations is None:
                raise RuntimeError(
                    f"GAINHandler: layer {self.target_layer!r} did not run during the trainer's forward pass"
                )
            terms = self._terms(engine.network, activations, output, masks, am_on, area_on)
        output[Keys.LOSS] = (
            loss_cl
            + self.am_weight * terms["loss_am"]
            + self.ex_weight * terms["loss_ex"]
            + self.area_weight * terms["loss_area"]
        )
        output["loss_cl"] = loss_cl.detach()
        weights = {"loss_am": self.am_weight, "loss_ex": self.ex_weight, "loss_area": self.area_weight}
        output.update({k: v.detach() for k, v in terms.items() if weights[k] > 0})

    def _batch_masks(self, engine: Engine, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(masks, has_mask) from the current batch on the images' device, or None when the batch has no masks."""
        batch = engine.state.batch
        if not isinstance(batch, Mapping) or self.mask_key not in batch:
            if not self._warned_no_mask:
                logger.warning("GAINHandler: batches carry no %r; extra supervision is skipped", self.mask_key)
                self._warned_no_mask = True
            return None
        mask = torch.as_tensor(batch[self.mask_key]).to(images.device, non_blocking=True).float()
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
        if mask.ndim != 4 or mask.shape[0] != images.shape[0] or mask.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"GAINHandler: batch {self.mask_key!r} has shape {tuple(mask.shape)} but the images are "
                f"{tuple(images.shape)}; masks must be (B, 1 or K, H, W) at the image size"
            )
        if self.has_mask_key in batch:
            has_mask = torch.as_tensor(batch[self.has_mask_key]).to(images.device).reshape(-1).bool()
        else:
            has_mask = mask.flatten(1).amax(1) > 0
        return mask, has_mask

    def _extra_rows(self, rows: torch.Tensor, batch_size: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The recorded extra model inputs at ``rows`` of the batch."""

        def pick(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch_size:
                return value[rows.to(value.device)]
            return value

        args, kwargs = self._extra_inputs
        return tuple(pick(v) for v in args), {k: pick(v) for k, v in kwargs.items()}

    def _second_forward(
        self,
        network: nn.Module,
        erased: torch.Tensor,
        extra: tuple[tuple[Any, ...], dict[str, Any]] = ((), {}),
    ) -> torch.Tensor:
        """Forward the erased images (with the extra model inputs of their rows) with gradient-scaled parameter
        views (1/m) and optionally frozen BatchNorm."""
        module = _unwrap(network)
        m = self.grad_magnitude
        if m == 1.0:
            params = dict(module.named_parameters())
        elif math.isinf(m):
            params = {n: p.detach() for n, p in module.named_parameters()}
        else:
            params = {n: _ScaleGrad.apply(p, 1.0 / m) for n, p in module.named_parameters()}
        with _batchnorm_eval(module, self.freeze_bn_on_erased):
            return functional_call(module, params, (erased, *extra[0]), extra[1])

    def _targets(self, labels: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample index, class index, slot) of every cam to compute.

        Single-label: one cam per sample (its ground-truth class). ``per_label``: one per ground-truth label; the
        slot numbers a sample's labels so that each autograd call sees at most one class per sample.
        """
        b = logits.shape[0]
        if self.multilabel_mode == "per_label":
            pairs = torch.nonzero(labels.reshape(b, -1) > 0.5)
            samples, classes = pairs[:, 0], pairs[:, 1]
            counts = torch.bincount(samples, minlength=b)
            starts = torch.cumsum(counts, 0) - counts
            slots = torch.arange(samples.numel(), device=samples.device) - starts[samples]
            return samples, classes, slots
        labels = labels.reshape(b, -1)
        if labels.shape[1] > 1:  # one-hot single-label targets
            labels = labels.argmax(1, keepdim=True)
        classes = labels[:, 0].round().long()
        samples = torch.arange(b, device=logits.device)
        return samples, classes, torch.zeros_like(samples)

    def _cams(
        self, activations: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, size: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised cams (N, 1, H, W) with their sample and class indices."""
        if self.multilabel_mode == "all_labels":
            multi_hot = (labels.reshape(logits.shape[0], -1) > 0.5).to(logits.dtype)
            cams = cam_from_activations(
                activations, (logits * multi_hot).sum(1), size, create_graph=self.cam_weights_grad,
                negative_slope=self.cam_negative_slope,
            )
            samples = torch.arange(logits.shape[0], device=logits.device)
            return normalize_cam(cams), samples, samples.new_zeros(samples.shape)
        samples, classes, slots = self._targets(labels, logits)
        if slots.numel() == 0:
            return activations.new_zeros((0, 1, *size)), samples, classes
        parts, order = [], []
        for slot in range(int(slots.max()) + 1):
            sel = torch.nonzero(slots == slot)[:, 0]
            scores = target_scores(logits[samples[sel]], classes[sel])
            full = logits.new_zeros(logits.shape[0]).index_put((samples[sel],), scores)
            cam = cam_from_activations(activations, full, size, create_graph=self.cam_weights_grad,
                                       negative_slope=self.cam_negative_slope)
            parts.append(cam[samples[sel]])
            order.append(sel)
        cams = torch.cat(parts)[torch.argsort(torch.cat(order))]
        return normalize_cam(cams), samples, classes

    def _terms(
        self,
        network: nn.Module,
        activations: torch.Tensor,
        output: dict[str, Any],
        masks: tuple[torch.Tensor, torch.Tensor] | None,
        am_on: bool,
        area_on: bool,
    ) -> dict[str, torch.Tensor]:
        images, logits, labels = output[Keys.IMAGE], output[Keys.PRED], output[Keys.LABEL]
        cams, samples, classes = self._cams(activations, logits, labels, images.shape[-2:])
        zero = cams.new_zeros(())
        terms = {"loss_am": zero, "loss_ex": zero, "loss_area": zero}
        multilabel = self.multilabel_mode is not None
        positive = torch.ones_like(samples, dtype=torch.bool) if multilabel else classes != 0
        if masks is not None:
            mask, has_mask = masks
            sample_mask = mask[samples]
            if mask.shape[1] > 1:
                if self.multilabel_mode == "per_label":
                    sample_mask = sample_mask.gather(1, classes.view(-1, 1, 1, 1).expand(-1, 1, *mask.shape[-2:]))
                else:
                    sample_mask = sample_mask.amax(1, keepdim=True)
            # an empty mask on a positive would pull its attention to zero: such samples do not count
            keep = has_mask[samples] & positive & (sample_mask.flatten(1).amax(1) > 0)
            if keep.any():
                terms["loss_ex"] = extra_supervision_loss(cams[keep], sample_mask[keep])
        if am_on or area_on:
            sel = torch.ones_like(positive) if self.am_on_all else positive
            if sel.any():
                t = soft_mask(cams[sel], self.sigma, self.omega)
                if area_on:
                    assert self.area_bounds is not None
                    terms["loss_area"] = attention_area_loss(t, self.area_bounds)
                if am_on:
                    erased = erase(images[samples[sel]], t, self.fill)
                    extra = self._extra_rows(samples[sel], logits.shape[0])
                    erased_logits = self._second_forward(network, erased, extra)
                    if self.multilabel_mode == "all_labels":
                        pairs = torch.nonzero(labels.reshape(logits.shape[0], -1)[samples[sel]] > 0.5)
                        terms["loss_am"] = attention_mining_loss(
                            erased_logits[pairs[:, 0]], pairs[:, 1], multilabel=True
                        )
                    else:
                        terms["loss_am"] = attention_mining_loss(erased_logits, classes[sel], multilabel=multilabel)
        return terms


def gain_loss_terms(output: Any) -> dict[str, float]:
    """Output transform for StatsHandler / MLFlowHandler: the total loss and each GAIN term as floats."""
    if isinstance(output, list):  # decollated engine output: every item carries the same batch values
        output = output[0]
    values = {"loss": output[Keys.LOSS]}
    values.update({k: output[k] for k in LOSS_TERMS if k in output})
    return {k: float(v.detach().float()) if isinstance(v, torch.Tensor) else float(v) for k, v in values.items()}
