"""Resumable batch streams over the activation sources, for training and evaluation.

A stream is a function `stream(start_step)` that yields the raw batch of every step from
`start_step` on; a resumed run asks for the stream at its checkpoint's step and sees the
same batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from hsae.data.activations import NpyActivations
from hsae.data.planted import PlantedForest

Stream = Callable[[int], Iterator[Tensor]]

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


def npy_stream(source: NpyActivations, batch_size: int, seed: int) -> Stream:
    def stream(start_step: int) -> Iterator[Tensor]:
        return source.batches(batch_size, seed, start_step=start_step)

    return stream
