"""Trainer handler: the recurrent glimpse model's full loss (per-glimpse, rank, step and location terms)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from medgain.handlers.glimpse_inferer import GlimpseInferer
from medgain.losses.glimpse import GlimpseLoss

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["GlimpseLossHandler", "glimpse_loss_terms"]

#: names under which the loss terms are kept in ``engine.state.output``
GLIMPSE_LOSS_TERMS = ("classification", "per_glimpse", "rank", "step", "location", "area", "distance")


class GlimpseLossHandler:
    """Replaces the trainer's loss by :class:`~medgain.losses.GlimpseLoss` of the same forward.

    The trainer runs the network through ``inferer`` (a :class:`~medgain.handlers.GlimpseInferer`); at
    ``IterationEvents.LOSS_COMPLETED``, before the backward pass, this handler computes the total glimpse loss
    from ``inferer.last_output``, the labels and the batch's tumour masks (``mask_key``, ``has_mask_key``) and
    stores it as ``engine.state.output["loss"]`` — the trainer's own ``loss_function`` value is discarded —
    with each term, detached, under ``loss_<term>`` (see :func:`glimpse_loss_terms`). The epoch passed to the
    loss is ``engine.state.epoch - 1`` (for its ``location_decay``).

    Args:
        inferer: the trainer's inferer.
        loss: the loss to apply.
        mask_key: batch key of the (B, 1, H, W) tumour masks; batches without it get no location term.
        has_mask_key: batch key of the (B,) flags telling which masks are real; all when absent.
    """

    def __init__(
        self, inferer: GlimpseInferer, loss: GlimpseLoss, mask_key: str = "mask", has_mask_key: str = "has_mask"
    ) -> None:
        self.inferer = inferer
        self.loss = loss
        self.mask_key = mask_key
        self.has_mask_key = has_mask_key

    def attach(self, engine: Engine) -> None:
        """Compute the loss on every iteration of the trainer ``engine``."""
        if not engine.has_event_handler(self, IterationEvents.LOSS_COMPLETED):
            engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Replace ``engine.state.output["loss"]`` by the glimpse loss of this iteration."""
        last, self.inferer.last_output = self.inferer.last_output, None
        if last is None:
            raise RuntimeError("GlimpseLossHandler: the inferer holds no forward output (is it the trainer's inferer?)")
        output = engine.state.output
        batch = engine.state.batch if isinstance(engine.state.batch, Mapping) else {}
        device = last.logits.device
        mask = batch.get(self.mask_key)
        has_mask = batch.get(self.has_mask_key)
        terms = self.loss(
            last,
            torch.as_tensor(output[Keys.LABEL]).to(device),
            None if mask is None else torch.as_tensor(mask).to(device),
            None if has_mask is None else torch.as_tensor(has_mask).to(device),
            epoch=engine.state.epoch - 1,
        )
        output[Keys.LOSS] = terms["loss"]
        output.update({f"loss_{k}": terms[k].detach() for k in GLIMPSE_LOSS_TERMS})


def glimpse_loss_terms(output: Any) -> dict[str, float]:
    """Output transform for StatsHandler / MLFlowHandler: the total loss and each glimpse loss term as floats."""
    if isinstance(output, list):  # decollated engine output: every item carries the same batch values
        output = output[0]
    values = {"loss": output[Keys.LOSS]}
    values.update({f"loss_{k}": output[f"loss_{k}"] for k in GLIMPSE_LOSS_TERMS if f"loss_{k}" in output})
    return {k: float(v.detach().float()) if isinstance(v, torch.Tensor) else float(v) for k, v in values.items()}
