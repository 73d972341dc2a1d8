"""Step-indexed batches: which images (and which augmentation) step s sees depends only on s.

That is what makes a resumed run identical to an uninterrupted one, whatever the number of
DataLoader workers: resuming at step s just starts the stream at s. Under DDP every rank draws
the same global batch and keeps its own slice, so the global data order does not depend on
the number of processes either.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of (dataset index, augmentation seed), starting at `start_step`.

    Epoch e visits the dataset in a permutation seeded by (seed, e); batches run across epoch
    boundaries so every batch is full. `batch_size` is the global batch; rank r of
    `world_size` gets items [r * b, (r + 1) * b) of it, b = batch_size / world_size.

    `weights` (one per item, > 0; data.train_sources' weights) make item i appear floor(w_i)
    times per epoch, plus once more with probability frac(w_i), drawn with the epoch's seed:
    epochs then differ in length, and the stream stays a function of (seed, position) alone.
    None, or all weights 1, is the plain permutation.
    """

    def __init__(
        self,
        *,
        num_items: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        weights: Sequence[float] | None = None,
    ):
        if num_items <= 0:
            raise ValueError("the training set is empty: nothing to sample batches from")
        if batch_size % world_size:
            raise ValueError(
                f"train.batch_size {batch_size} is the global batch: it must be divisible by "
                f"the number of processes, {world_size}"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.per_rank = batch_size // world_size
        self.first = rank * self.per_rank  # this rank's slice of each global batch
        self.weights = None
        if weights is not None and any(w != 1 for w in weights):
            self.weights = np.asarray(weights, dtype=np.float64)
            if self.weights.shape != (num_items,) or not (self.weights > 0).all():
                raise ValueError(f"weights must be {num_items} positive numbers")

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.weights is None:
            return rng.permutation(self.num_items)
        whole = np.floor(self.weights)
        repeats = (whole + (rng.random(self.num_items) < self.weights - whole)).astype(np.int64)
        order = rng.permutation(np.repeat(np.arange(self.num_items), repeats))
        # an epoch that drew nothing (every weight under 1) would stall the stream
        return order if len(order) else rng.permutation(self.num_items)[:1]

    def _epochs(self) -> Iterator[np.ndarray]:
        epoch = 0
        while True:
            yield self._epoch_order(epoch)
            epoch += 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start_step * self.batch_size  # index into the endless image stream
        epochs = self._epochs()
        order, start = next(epochs), 0  # the epoch holding `position`, and where it starts
        while position >= start + len(order):
            start += len(order)
            order = next(epochs)
        while True:
            batch = []
            for _ in range(self.batch_size):
                if position == start + len(order):
                    start, order = position, next(epochs)
                index = int(order[position - start])
                # the augmentation seed is a pure function of the run seed and the stream position
                batch.append((index, self.seed * 1_000_003 + position))
                position += 1
            yield batch[self.first : self.first + self.per_rank]
