"""Trainer- and evaluator-side inferer of the recurrent glimpse model: logits out, glimpses kept."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from torch import nn

from medgain.networks.glimpse import GlimpseOutput

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["GlimpseInferer"]


class GlimpseInferer(Inferer):
    """A MONAI inferer for :class:`~medgain.networks.RecurrentGlimpseNetwork`: returns the aggregate logits (what
    the trainer's loss function, the metrics and the checkpoint handlers see) and keeps the whole
    :class:`~medgain.networks.GlimpseOutput` of the forward in ``last_output`` (with its graph during training,
    for :class:`~medgain.handlers.GlimpseLossHandler`).

    Once attached to an engine, each iteration's ``engine.state.output`` also holds, detached:
    ``glimpse_centers`` (B, G, 2; x, y in [-1, 1]), ``glimpse_scales`` (B, G; glimpse side / shorter image side),
    ``glimpse_logits`` (B, G, C), and the batch entries named in ``batch_keys`` (e.g. tumour masks).

    Args:
        batch_keys: batch keys copied into the output when present.
    """

    def __init__(self, batch_keys: Sequence[str] = ("mask", "has_mask")) -> None:
        super().__init__()
        self.batch_keys = tuple(batch_keys)
        self.last_output: GlimpseOutput | None = None

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Forward ``inputs``; returns the aggregate logits and stores the full output in ``last_output``.

        Raises:
            TypeError: when the network does not return a :class:`~medgain.networks.GlimpseOutput`.
        """
        output = network(inputs, *args, **kwargs)
        if not isinstance(output, GlimpseOutput):
            raise TypeError(
                f"GlimpseInferer: the network returned {type(output).__name__}, expected GlimpseOutput "
                "(use medgain.networks.RecurrentGlimpseNetwork)"
            )
        self.last_output = output
        return output.logits

    def attach(self, engine: Engine) -> None:
        """Publish the glimpses (and ``batch_keys``) in ``engine.state.output`` after each forward."""
        if not engine.has_event_handler(self._publish, IterationEvents.FORWARD_COMPLETED):
            engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._publish)

    def _publish(self, engine: Engine) -> None:
        output, last = engine.state.output, self.last_output
        if last is None:
            raise RuntimeError("GlimpseInferer: no forward output to publish (is it the engine's inferer?)")
        output["glimpse_centers"] = last.centers.detach()
        output["glimpse_scales"] = last.scales.detach()
        output["glimpse_logits"] = last.glimpse_logits.detach()
        batch = engine.state.batch
        if isinstance(batch, Mapping):
            device = last.logits.device
            for key in self.batch_keys:
                if key in batch:
                    value = batch[key]
                    output[key] = value.to(device) if isinstance(value, torch.Tensor) else value
