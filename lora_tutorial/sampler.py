"""A shuffling sampler that can resume in the middle of training and shards across processes.

Training runs for ``max_steps`` optimizer steps, not for epochs, so the sampler produces one long
stream of example indices: a fresh seeded permutation of the dataset for every pass, back to back.
Index ``p`` of the stream depends only on ``(seed, p)``. Resuming after ``k`` optimizer steps is
therefore exact: start the stream at ``k x examples-per-step`` and the rest of the run sees exactly
the examples an uninterrupted run would have seen. With several processes (DDP), process ``rank``
takes every ``world_size``-th position, so the processes see disjoint examples.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableRandomSampler(Sampler[int]):
    """Yield ``num_samples`` indices into a dataset of ``dataset_size``, from stream position ``start``."""

    def __init__(self, dataset_size: int, num_samples: int, seed: int, start: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True) -> None:
        if dataset_size < 1:
            raise ValueError("ResumableRandomSampler: the dataset is empty")
        self.dataset_size = dataset_size
        self.num_samples = max(0, num_samples)
        self.seed, self.start, self.rank, self.world_size, self.shuffle = seed, start, rank, world_size, shuffle

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_size))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_size, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        epoch, perm = -1, []
        for i in range(self.start, self.start + self.num_samples):
            position = i * self.world_size + self.rank
            wanted = position // self.dataset_size
            if wanted != epoch:
                epoch, perm = wanted, self._permutation(wanted)
            yield perm[position % self.dataset_size]

    def __len__(self) -> int:
        return self.num_samples
