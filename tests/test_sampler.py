"""The training sampler: one seeded stream of passes over the data, exact resumption from any position,
disjoint shards for DDP processes, and (optionally) micro-batches of similar length."""

from __future__ import annotations

import collections

import pytest

from lora_tutorial.sampler import ResumableRandomSampler

LENGTHS = [(i * 37) % 23 + 1 for i in range(30)]  # a fixed, jumbled length per example


def stream(**kwargs) -> list[int]:
    return list(ResumableRandomSampler(**kwargs))


@pytest.mark.parametrize("grouped", [False, True])
def test_every_pass_is_a_permutation_and_seeds_differ(grouped):
    extra = dict(length_of=LENGTHS.__getitem__, group=10, batch=2) if grouped else {}
    out = stream(dataset_size=30, num_samples=90, seed=3, **extra)
    for p in range(3):
        assert sorted(out[30 * p:30 * (p + 1)]) == list(range(30))
    assert out[:30] != out[30:60]  # a fresh permutation per pass
    assert stream(dataset_size=30, num_samples=90, seed=3, **extra) == out
    assert stream(dataset_size=30, num_samples=90, seed=4, **extra) != out


@pytest.mark.parametrize("grouped", [False, True])
def test_resuming_at_any_position_continues_the_same_stream(grouped):
    extra = dict(length_of=LENGTHS.__getitem__, group=10, batch=2) if grouped else {}
    full = stream(dataset_size=30, num_samples=70, seed=1, **extra)
    for start in (0, 4, 10, 33):
        assert stream(dataset_size=30, num_samples=70 - start, seed=1, start=start, **extra) == full[start:]


@pytest.mark.parametrize("grouped", [False, True])
def test_processes_get_disjoint_shards_of_one_stream(grouped):
    extra = dict(length_of=LENGTHS.__getitem__, group=12, batch=2) if grouped else {}
    # 24 examples: one pass is two whole chunks of 12 (grouping reorders inside a chunk, never across)
    shards = [stream(dataset_size=24, num_samples=12, seed=2, rank=r, world_size=2, **extra) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(24))  # one pass, split between the two processes
    if not grouped:  # rank r takes every second position of the single-process stream
        single = stream(dataset_size=24, num_samples=24, seed=2)
        assert shards == [single[0::2], single[1::2]]


def test_length_grouping_batches_neighbours_and_keeps_each_chunk():
    plain = stream(dataset_size=30, num_samples=60, seed=5)
    grouped = stream(dataset_size=30, num_samples=60, seed=5, length_of=LENGTHS.__getitem__, group=10, batch=2)
    for c in range(6):  # the same examples in every chunk of 10 positions, only reordered
        assert collections.Counter(grouped[10 * c:10 * (c + 1)]) == collections.Counter(plain[10 * c:10 * (c + 1)])

    def padding(order):  # padded tokens of micro-batches of 2
        return sum(abs(LENGTHS[a] - LENGTHS[b]) for a, b in zip(order[0::2], order[1::2]))
    assert padding(grouped) < padding(plain) / 2
    with pytest.raises(ValueError, match="multiple of batch x world_size"):
        ResumableRandomSampler(30, 10, seed=0, length_of=LENGTHS.__getitem__, group=10, batch=3)


def test_without_shuffle_the_stream_is_in_order():
    assert stream(dataset_size=4, num_samples=6, seed=0, shuffle=False) == [0, 1, 2, 3, 0, 1]
    with pytest.raises(ValueError, match="empty"):
        ResumableRandomSampler(0, 1, seed=0)
