"""Batch sampler that over-samples the rare positive frames to a fixed share of every batch."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import numpy as np
from torch.utils.data import Sampler

__all__ = ["PositiveFractionBatchSampler", "positives_per_batch"]


def positives_per_batch(pos_fraction: float, batch_size: int) -> int:
    """Positives in a batch: ``pos_fraction * batch_size`` rounded half up, at least 1 and at most
    ``batch_size - 1`` (0.25 x 10 -> 3, 0.35 x 10 -> 4, 0.1 x 4 -> 1, 0.9 x 2 -> 1).

    The product is taken on the decimal value of ``pos_fraction`` as written (``str``), so 0.35 x 10 is exactly
    3.5, not the binary float's 3.4999….
    """
    exact = (Decimal(str(pos_fraction)) * batch_size).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    return min(max(1, int(exact)), batch_size - 1)


def _class_batches(indices: np.ndarray, size: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """Endless stream of ``size`` indices per batch, drawn in passes: each pass is a fresh random permutation of
    ``indices``, stably reordered when it starts inside a batch so that the indices the batch holds fewest times
    come first. Hence a batch never repeats an index when ``len(indices) >= size``; otherwise each index appears
    ``size // len(indices)`` or that plus one times."""
    pending: list[int] = []
    while True:
        batch: list[int] = []
        counts: Counter[int] = Counter()
        while len(batch) < size:
            if not pending:
                pending = sorted((int(i) for i in rng.permutation(indices)), key=lambda i: counts[i])[::-1]
            index = pending.pop()
            batch.append(index)
            counts[index] += 1
        yield batch


class PositiveFractionBatchSampler(Sampler[list[int]]):
    """Batches with a fixed number of positives (non-zero labels), for ``DataLoader(batch_sampler=...)``.

    Every batch holds ``pos_per_batch`` positives (``pos_fraction * batch_size`` rounded half up, at least 1, at
    most ``batch_size - 1``; see :func:`positives_per_batch`) and the rest negatives, in shuffled order.
    Positives are drawn without replacement within a pass over them and re-shuffled when exhausted
    (over-sampling); negatives follow a per-epoch permutation, so with the default number of batches each
    negative is visited once per epoch (the last batch is completed from the next permutation). A batch never
    holds an index twice when its class has at least as many samples as the batch takes from it (a new pass that
    starts inside a batch puts the indices the batch already holds last); a smaller class is repeated as evenly
    as possible: each of its ``n`` samples appears ``k // n`` or ``k // n + 1`` times in a batch that takes ``k``.
    Shuffles depend only on ``seed + epoch``; each pass advances the epoch by one (``set_epoch`` picks one
    explicitly, e.g. from the trainer's epoch with :class:`medgain.handlers.SamplerEpoch`). With
    ``num_replicas > 1`` all ranks generate the same batch sequence, its length rounded up to a multiple of
    ``num_replicas``, and rank ``r`` takes batches ``r, r + num_replicas, ...`` (disjoint shares of equal length,
    for DDP).

    Args:
        labels: integer labels, or datalist items with a ``label`` key.
        batch_size: indices per batch (at least 2).
        pos_fraction: share of positives per batch, in (0, 1).
        seed: shuffle seed.
        num_batches: batches per epoch over all replicas; default ``ceil(n_negatives / negatives_per_batch)``.
        num_replicas: number of distributed processes.
        rank: this process's rank in [0, num_replicas).

    Raises:
        ValueError: for no positive or no negative label, ``pos_fraction`` outside (0, 1), or invalid
            ``batch_size`` / ``num_batches`` / ``num_replicas`` / ``rank``.
    """

    def __init__(
        self,
        labels: Sequence[int] | Sequence[Mapping[str, Any]],
        batch_size: int,
        pos_fraction: float = 0.25,
        seed: int = 0,
        num_batches: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        values = np.asarray([int(v["label"]) if isinstance(v, Mapping) else int(v) for v in labels], dtype=np.int64)
        if not 0.0 < pos_fraction < 1.0:
            raise ValueError(f"pos_fraction must be in (0, 1), got {pos_fraction}")
        if batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 to hold positives and negatives, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas=}, {rank=}")
        self.positives = np.flatnonzero(values != 0)
        self.negatives = np.flatnonzero(values == 0)
        if len(self.positives) == 0 or len(self.negatives) == 0:
            raise ValueError(
                f"PositiveFractionBatchSampler needs positive and negative labels, got {len(self.positives)} "
                f"positive(s) and {len(self.negatives)} negative(s); label values found: "
                f"{sorted(set(values.tolist()))}, expected 0 (negative) and non-zero (positive)"
            )
        self.pos_per_batch = positives_per_batch(pos_fraction, batch_size)
        self.neg_per_batch = batch_size - self.pos_per_batch
        if num_batches is None:
            num_batches = math.ceil(len(self.negatives) / self.neg_per_batch)
        if num_batches < 1:
            raise ValueError(f"num_batches must be at least 1, got {num_batches}")
        self.batch_size = batch_size
        self.seed = seed
        self.num_batches = num_batches
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of an epoch.

        Args:
            epoch: epoch index; the shuffle is seeded by ``seed + epoch``.
        """
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_batches / self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        self.epoch += 1  # the next pass (epoch) gets the next shuffle unless set_epoch chooses one
        positives = _class_batches(self.positives, self.pos_per_batch, rng)
        negatives = _class_batches(self.negatives, self.neg_per_batch, rng)
        for index in range(len(self) * self.num_replicas):
            batch = rng.permutation(np.array(next(positives) + next(negatives)))
            if index % self.num_replicas == self.rank:
                yield [int(i) for i in batch]
