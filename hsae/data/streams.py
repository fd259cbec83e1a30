"""Resumable batch streams over the activation sources, for training and evaluation.

A stream is a function `stream(start_step)` that yields the raw batch of every step from
`start_step` on; a resumed run asks for the stream at its checkpoint's step and sees the
same batches an uninterrupted run would have seen. The streams over files are each a
:class:`~hsae.method.distributed.PerRankStream`: under torchrun each rank reads only its own part
of every global batch (the rule is in :mod:`hsae.method.distributed`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from hsae.data.activations import NpyActivations
from hsae.data.cache import CachedActivations
from hsae.data.planted import PlantedForest
from hsae.method.distributed import PerRankStream, Stream, check_divisible

HELDOUT_SEED_OFFSET = 7_919_000  # evaluation draws never coincide with training draws


def planted_stream(forest: PlantedForest, batch_size: int, seed: int) -> Stream:
    """Batch k is drawn from a generator seeded by (seed, k): resumable without RNG state."""

    def stream(start_step: int) -> Iterator[Tensor]:
        step = start_step
        while True:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            yield forest.sample(batch_size, gen)[0]
            step += 1

    return stream


def planted_heldout(forest: PlantedForest, batch_size: int, n_tokens: int, seed: int):
    """Held-out batches (x, active) for evaluation, disjoint in seed from training."""
    gen = torch.Generator().manual_seed(seed + HELDOUT_SEED_OFFSET)
    for _ in range(max(1, n_tokens // batch_size)):
        yield forest.sample(batch_size, gen)


def npy_stream(source: NpyActivations, batch_size: int, seed: int) -> PerRankStream:
    """Batch k as NpyActivations.batches draws it; a rank reads only its slice's rows."""

    def part(start_step: int, rank: int, world: int) -> Iterator[Tensor]:
        if world == 1:
            yield from source.batches(batch_size, seed, start_step=start_step)
            return
        check_divisible(batch_size, world)
        share, step = batch_size // world, start_step
        while True:
            rows = source.batch_rows(step, batch_size, seed)[rank * share : (rank + 1) * share]
            yield source.read_rows(rows)  # the memory map reads these rows alone
            step += 1

    return PerRankStream(batch_size, part)


def cache_stream(
    source: CachedActivations, batch_size: int, seed: int, buffer_tokens: int
) -> PerRankStream:
    """The cache's block-shuffled batches; a rank opens only the shards of its part."""

    def part(start_step: int, rank: int, world: int) -> Iterator[Tensor]:
        return source.batches(batch_size, seed, start_step, buffer_tokens, rank, world)

    return PerRankStream(batch_size, part)
