"""Pruned levels: a coarse level taken from the finer level's strongest features.

A flat level trained to reconstruct x on its own absorbs a parent into its children:
where a parent fires with one of its children, one latent for their sum costs less L0
than the two (docs/hierarchy.md, "Where the ceiling is lost"). A finer level has room for
both, so the parents it learns are there to take. After training, level l is replaced by
the n_l features of level l + 1 with the most energy,

    E_i = Σ_tokens a_i² ‖d_i‖²,    (a feature's share of the reconstruction's square norm)

wherever those explain at least FVE_l − tolerance of x, FVE_l being level l's own. Levels
are visited from the finest up, so a pruned level can itself be pruned from. The kept
features are level l + 1's own (encoder column, bias, threshold, decoder row, decoder
bias): every reader still sees flat levels, and the conditional links join each child to
the parent it shares the tokens of; a feature kept at both levels is a copy of itself,
which the link rule never takes as a parent (hsae.method.copies).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hsae.method import distributed
from hsae.method.model import HSAE
from hsae.trained_dir import LEVEL_KEYS

PRUNE_ROWS = 65_536
"""Rows the pruning decision and the links after it read (after training; `hsae posthoc
--prune`)."""


@torch.no_grad()
def level_fit(model: HSAE, level: int, rows: list[Tensor]) -> tuple[float, Tensor]:
    """Level ``level``'s FVE over scaled ``rows`` (batches), 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²,
    and each of its features' energy E_i."""
    sq_err = sq_norm = torch.zeros((), device=model.scale.device)
    row_sum = torch.zeros(model.d_in, device=model.scale.device)
    energy = torch.zeros(model.sizes[level], device=model.scale.device)
    count = 0
    row_norms = model.W_dec[level].pow(2).sum(dim=1)
    for x in rows:
        acts = model.activate(model.pre_acts(x, level), level)
        sq_err = sq_err + (x - model.decode(acts, level)).pow(2).sum()
        sq_norm = sq_norm + x.pow(2).sum()
        row_sum += x.sum(dim=0)
        energy += acts.pow(2).sum(dim=0) * row_norms
        count += x.shape[0]
    sq_err, sq_norm, row_sum = (distributed.total(t) for t in (sq_err, sq_norm, row_sum))
    n = distributed.total(torch.tensor(float(count), device=row_sum.device))
    variance = sq_norm - row_sum.pow(2).sum() / n  # Σ‖x − x̄‖²
    return float(1 - sq_err / variance.clamp(min=1e-12)), distributed.total(energy)


@torch.no_grad()
def take_features(model: HSAE, level: int, keep: Tensor) -> None:
    """Level ``level`` becomes features ``keep`` of level + 1 (as many as it has)."""
    finer = level + 1
    model.W_enc[level].copy_(model.W_enc[finer][:, keep])
    model.W_dec[level].copy_(model.W_dec[finer][keep])
    model.b_enc[level].copy_(model.b_enc[finer][keep])
    model.threshold[level].copy_(model.threshold[finer][keep])
    model.b_dec[level].copy_(model.b_dec[finer])


@torch.no_grad()
def prune_levels(model: HSAE, rows: list[Tensor], tolerance: float) -> list[int]:
    """Prune every coarse level where it costs at most ``tolerance`` of FVE on ``rows``
    (scaled batches, the same on every call); returns the pruned levels, finest first."""
    pruned = []
    _, finer_energy = level_fit(model, model.n_levels - 1, rows)
    for level in reversed(range(model.n_levels - 1)):
        own, own_energy = level_fit(model, level, rows)
        keep = finer_energy.topk(model.sizes[level]).indices.sort().values
        saved = {name: getattr(model, name)[level].clone() for name in LEVEL_KEYS}
        take_features(model, level, keep)
        fve, finer_energy = level_fit(model, level, rows)  # the next level up reads these
        if fve >= own - tolerance:
            pruned.append(level)
            continue
        for name, value in saved.items():
            getattr(model, name)[level].copy_(value)
        finer_energy = own_energy
    return pruned
