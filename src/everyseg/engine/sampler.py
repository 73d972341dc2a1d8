"""Step-indexed batches: which images (and which augmentation) step s sees depends only on s.

That is what makes a resumed run identical to an uninterrupted one, whatever the number of
DataLoader workers: resuming at step s just starts the stream at s. Under DDP every rank draws
the same global batch and keeps its own slice, so the global data order does not depend on
the number of processes either.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of (dataset index, augmentation seed), starting at `start_step`.

    Epoch e visits the dataset in a permutation seeded by (seed, e); batches run across epoch
    boundaries so every batch is full. `batch_size` is the global batch; rank r of
    `world_size` gets items [r * b, (r + 1) * b) of it, b = batch_size / world_size.
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

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start_step * self.batch_size  # index into the endless image stream
        epoch, order = -1, np.empty(0, dtype=np.int64)  # epoch -1: drawn before first use
        while True:
            batch = []
            for _ in range(self.batch_size):
                if position // self.num_items != epoch:
                    epoch = position // self.num_items
                    order = self._epoch_order(epoch)
                index = int(order[position % self.num_items])
                # the augmentation seed is a pure function of the run seed and the stream position
                batch.append((index, self.seed * 1_000_003 + position))
                position += 1
            yield batch[self.first : self.first + self.per_rank]
