"""A NaN or infinite loss stops training before it reaches the weights (or skips the batch, when allowed)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from medgain.handlers.utils import attach_once, batch_has, batch_strings

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["NonFiniteLossError", "NonFiniteLossHandler"]

logger = logging.getLogger(__name__)


def _any_rank(bad: bool, like: torch.Tensor | float) -> bool:
    """Whether ``bad`` holds on any rank of an initialised process group (every rank then stops together)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return bad
    device = like.device if isinstance(like, torch.Tensor) else torch.device("cpu")
    flag = torch.tensor([1.0 if bad else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


class NonFiniteLossError(FloatingPointError):
    """Training met a non-finite loss."""


class NonFiniteLossHandler:
    """Checks the loss of every iteration after the backward pass and before the optimizer step.

    A NaN / inf loss raises :class:`NonFiniteLossError` naming the epoch, the iteration and the batch's files,
    or, when some of the batch's images hold NaN / inf pixels, only those images' files (the inputs that caused
    it);
    the weights and optimizer state are those of the last good step, so the trainer's
    :class:`~medgain.handlers.TrainingFailureHandler` saves a good, resumable state and marks the MLflow run
    FAILED with this reason. With ``max_skipped`` > 0, up to that many such batches are skipped instead (their
    gradients dropped, a warning each) before the next one stops training. Under ``torch.distributed`` the
    ranks agree on it (one all-reduce of a flag per iteration), so every rank stops or skips at the same step.

    Args:
        max_skipped: non-finite batches to skip over the whole run before stopping.
        path_key: batch key of the samples' source files (named in the error), when the batch has it.
        loss_key: key of the loss in ``engine.state.output``.
        image_key: batch key of the input images, checked for non-finite pixels when the loss is not finite.
    """

    def __init__(
        self,
        max_skipped: int = 0,
        path_key: str = "image_path",
        loss_key: str = CommonKeys.LOSS,
        image_key: str = CommonKeys.IMAGE,
    ) -> None:
        if max_skipped < 0:
            raise ValueError(f"NonFiniteLossHandler: max_skipped must be >= 0, got {max_skipped}")
        self.max_skipped = int(max_skipped)
        self.path_key = path_key
        self.loss_key = loss_key
        self.image_key = image_key
        self.skipped = 0

    def attach(self, engine: Engine) -> None:
        """Check after each backward pass of ``engine`` (a MONAI ``SupervisedTrainer``)."""
        attach_once(engine, [(IterationEvents.BACKWARD_COMPLETED, self)])

    def state_dict(self) -> dict[str, int]:
        """How many batches were skipped (for checkpoints)."""
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the skip count."""
        self.skipped = int(state["skipped"])

    def _non_finite_inputs(self, batch: object) -> list[int]:
        """Indices of the batch's samples whose image holds a NaN / inf pixel (empty without an image tensor)."""
        image = batch.get(self.image_key) if isinstance(batch, dict) else None
        if not isinstance(image, torch.Tensor) or image.ndim == 0 or not image.is_floating_point():
            return []
        finite = torch.isfinite(image.detach()).reshape(image.shape[0], -1).all(dim=1)
        return torch.nonzero(~finite).flatten().tolist()

    def __call__(self, engine: Engine) -> None:
        """Stop (or skip) on a non-finite loss."""
        value = engine.state.output[self.loss_key]
        loss = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        bad_here = not math.isfinite(loss)
        if not _any_rank(bad_here, value):
            return
        batch = engine.state.batch
        files = batch_strings(batch, self.path_key) if batch_has(batch, self.path_key) else []
        at = f"epoch {engine.state.epoch}, iteration {engine.state.iteration}"
        bad_inputs = self._non_finite_inputs(batch) if bad_here else []
        if bad_inputs:
            named = ", ".join(files[i] for i in bad_inputs) if files else f"samples {bad_inputs} of the batch"
            where = f"non-finite loss ({loss}) at {at}: non-finite input pixels (NaN / inf) in {named}"
        elif bad_here:
            batch_files = ", ".join(files) if files else f"(no {self.path_key!r} in the batch)"
            where = f"non-finite loss ({loss}) at {at}; batch: {batch_files}"
        else:
            where = f"non-finite loss on another rank at {at}"
        if self.skipped < self.max_skipped:
            self.skipped += 1
            if not getattr(engine, "amp", False):  # under AMP the grad scaler skips a non-finite step itself
                engine.optimizer.zero_grad(set_to_none=True)
            logger.warning("%s: batch skipped (%d of at most %d)", where, self.skipped, self.max_skipped)
            return
        raise NonFiniteLossError(
            f"{where}. Training stopped before the optimizer step: the weights are those of the last good step"
            + (f" ({self.skipped} such batches were skipped before)" if self.skipped else "")
        )
