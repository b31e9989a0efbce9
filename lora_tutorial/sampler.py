"""A shuffling sampler that can resume in the middle of training, shards across processes, and can
batch examples of similar length together.

Training runs for ``max_steps`` optimizer steps, not for epochs, so the sampler produces one long
stream of example indices: a fresh seeded permutation of the dataset for every pass, back to back.
Index ``p`` of the stream depends only on ``(seed, p)``. Resuming after ``k`` optimizer steps is
therefore exact: start the stream at ``k x examples-per-step`` and the rest of the run sees exactly
the examples an uninterrupted run would have seen. With several processes (DDP), process ``rank``
takes every ``world_size``-th position, so the processes see disjoint examples.

**Length grouping.** A micro-batch is padded to its longest example, and the padding is computed
like real tokens. With ``length_of`` given, the stream is cut into chunks of ``group`` positions; inside
a chunk the examples are sorted by length, cut into micro-batches of ``batch``, and those micro-batches
shuffled (seeded). Every example still appears exactly when it would have (same chunk), but each
micro-batch holds neighbours in length, so little compute goes into padding.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

import torch
from torch.utils.data import Sampler


class ResumableRandomSampler(Sampler[int]):
    """Yield ``num_samples`` indices into a dataset of ``dataset_size``, from stream position ``start``."""

    def __init__(self, dataset_size: int, num_samples: int, seed: int, start: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, length_of: Callable[[int], int] | None = None,
                 group: int = 256, batch: int = 1) -> None:
        if dataset_size < 1:
            raise ValueError("ResumableRandomSampler: the dataset is empty")
        if length_of is not None and group % (batch * world_size):
            raise ValueError(f"group={group} must be a multiple of batch x world_size = {batch * world_size}")
        self.dataset_size = dataset_size
        self.num_samples = max(0, num_samples)
        self.seed, self.start, self.rank, self.world_size, self.shuffle = seed, start, rank, world_size, shuffle
        self.length_of, self.group, self.batch = length_of, group, batch

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_size))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_size, generator=g).tolist()

    def _stream(self, first: int, last: int) -> list[int]:
        """Positions ``first`` .. ``last - 1`` of the global (all processes) shuffled stream."""
        out, epoch, perm = [], -1, []
        for position in range(first, last):
            wanted = position // self.dataset_size
            if wanted != epoch:
                epoch, perm = wanted, self._permutation(wanted)
            out.append(perm[position % self.dataset_size])
        return out

    def _grouped_chunk(self, chunk: int) -> list[int]:
        """One chunk of the global stream, reordered: sorted by length, then whole micro-batches shuffled.

        Micro-batches are dealt to processes round-robin afterwards, so they are built from
        ``batch x world_size`` consecutive positions.
        """
        indices = sorted(self._stream(chunk * self.group, (chunk + 1) * self.group), key=self.length_of)
        step = self.batch * self.world_size
        blocks = [indices[i:i + step] for i in range(0, len(indices), step)]
        random.Random(self.seed * 1_000_003 + chunk).shuffle(blocks)
        # Position j of a block goes to rank j % world_size, as in the ungrouped stream.
        return [i for block in blocks for i in block]

    def __iter__(self) -> Iterator[int]:
        first = self.start * self.world_size + self.rank
        last = (self.start + self.num_samples) * self.world_size
        if self.length_of is None:
            yield from self._stream(first, last)[::self.world_size]
            return
        chunk, cached = -1, []
        for position in range(first, last, self.world_size):
            if position // self.group != chunk:
                chunk = position // self.group
                cached = self._grouped_chunk(chunk)
            yield cached[position % self.group]

    def __len__(self) -> int:
        return self.num_samples


__all__ = ["ResumableRandomSampler"]
