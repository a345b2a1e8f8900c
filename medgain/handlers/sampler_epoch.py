"""Keeping a sampler's shuffle in step with the trainer's (checkpointed) epoch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["SamplerEpoch"]


class _EpochSampler(Protocol):
    def set_epoch(self, epoch: int) -> None: ...


class SamplerEpoch:
    """Call ``sampler.set_epoch(engine.state.epoch - 1)`` when each epoch starts, so that the shuffle of epoch
    ``e`` (1-based) is the sampler's epoch ``e - 1`` however the run got there: a run resumed from a checkpoint
    at epoch 2 draws in its epoch 3 the same batches as an uninterrupted run, instead of replaying epoch 1's.

    Ignite creates the data-loader iterator of an epoch after ``Events.EPOCH_STARTED`` (lazily, on the epoch's
    first batch), and the ``DataLoader`` (also with workers, which prefetch on creation) draws the batch
    sampler's indices only from that iterator, so the epoch set here is the one the epoch's batches use.

    Args:
        sampler: object with ``set_epoch(epoch)``, e.g. ``medgain.data.PositiveFractionBatchSampler`` or
            ``torch.utils.data.DistributedSampler``.
    """

    def __init__(self, sampler: _EpochSampler) -> None:
        if not callable(getattr(sampler, "set_epoch", None)):
            raise TypeError(f"SamplerEpoch needs a sampler with set_epoch(epoch), got {type(sampler).__name__}")
        self.sampler = sampler

    def attach(self, engine: Engine) -> None:
        """Register on ``Events.EPOCH_STARTED`` of the trainer."""
        from ignite.engine import Events

        if not engine.has_event_handler(self, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """Select the sampler's shuffle for the epoch that is starting."""
        self.sampler.set_epoch(engine.state.epoch - 1)
