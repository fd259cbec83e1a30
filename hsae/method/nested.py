"""Nested levels (ours, `HSAEConfig.nested`; Matryoshka-style, Bussmann et al. 2025).

Level l+1 keeps level l's n_l features as its first n_l and adds n_{l+1} - n_l new ones.
Every level still reconstructs x from its own features (the paper's per-level loss), so a
shared feature is trained by the sum of the losses of every level that holds it, and the
new features of level l+1 fit what level l leaves:

    dLoss / d(shared feature i) = sum over levels l with i < n_l of dL_l / d(feature i)

Each level keeps its own parameter tensors, so every reader (the trained directory, SAE
Lens export, the explorer, resume) sees L flat SAEs as without nesting. The finest level
owns the shared entries: after backward the coarser levels' gradients are added to the
owner's and dropped (`fold_grads`), and after each optimiser step the coarser levels are
overwritten with the owner's prefix (`sync`). The same prefix thus has one parameter and
one optimiser state. b_dec is shared by every level, as in Matryoshka.

One L0 is priced: the finest level's, which counts each feature once (`priced_levels`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hsae.method.model import HSAE

Index = tuple[slice, ...]


def _shared(model: HSAE, level: int) -> list[tuple[Tensor, Tensor, Index]]:
    """(coarse parameter, owner parameter, the part of the owner it equals) for every
    parameter that level `level` shares with the finest level."""
    n, top = model.sizes[level], model.n_levels - 1
    rows, columns = (slice(None, n),), (slice(None), slice(None, n))
    return [
        (model.W_dec[level], model.W_dec[top], rows),
        (model.W_enc[level], model.W_enc[top], columns),
        (model.b_enc[level], model.b_enc[top], rows),
        (model.threshold[level], model.threshold[top], rows),
        (model.b_dec[level], model.b_dec[top], ()),
    ]


@torch.no_grad()
def fold_grads(model: HSAE) -> None:
    """Add each coarser level's gradients to the finest level's prefix; drop them there."""
    for level in range(model.n_levels - 1):
        for coarse, owner, part in _shared(model, level):
            if coarse.grad is None:
                continue
            if owner.grad is None:
                owner.grad = torch.zeros_like(owner)
            owner.grad[part].add_(coarse.grad)
            coarse.grad = None


@torch.no_grad()
def sync(model: HSAE) -> None:
    """Every coarser level's parameters := the finest level's prefix (its shared features)."""
    for level in range(model.n_levels - 1):
        for coarse, owner, part in _shared(model, level):
            coarse.copy_(owner[part])


def priced_levels(n_levels: int, nested: bool, device: torch.device | str = "cpu") -> Tensor:
    """[n_levels] 1 where a level's L0 is priced: every level, or with nesting only the
    finest (its L0 counts each shared feature once; pricing the coarser levels too would
    charge a coarse feature once per level that holds it)."""
    mask = torch.ones(n_levels, device=device)
    if nested:
        mask[:-1] = 0.0
    return mask


def unlink_inherited(parents: list[Tensor], sizes: tuple[int, ...]) -> None:
    """An inherited feature is the level above's own, not its child: no link."""
    for level, parent in enumerate(parents):
        parent[: sizes[level]] = -1
