"""Post-hoc forests over SAEs a user already has (`hsae posthoc`).

The paper's baseline links independently trained SAEs after the fact with the same rule
HSAE uses during training (section 4.2). This module does that for any SAE Lens
directories of growing size, so existing SAEs can be compared with an HSAE on the same
measures (`hsae eval`).

With activations (`hsae posthoc --data`) the levels are linked by hsae's conditional rule
instead, P(parent fires | child fires) counted over the rows (`firing_forest`), and may be
pruned first (hsae.method.prune): a flat SAE absorbs parents into their children, and the
finer SAE's strongest features often hold them.

SAE Lens encodes h = (x - b_dec) W_enc + b_enc when `apply_b_dec_to_input` is true and
h = x W_enc + b_enc otherwise; JumpReLU SAEs return relu(h) * (h > threshold), standard
SAEs relu(h). Both are HSAE levels on raw activations (scale 1): without the b_dec
subtraction, b_enc absorbs b_dec W_enc; a standard SAE has threshold 0; a negative
threshold acts as 0 behind the relu.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from hsae import io
from hsae.config import HSAEConfig, ParentPick
from hsae.io import FormatError
from hsae.method.hierarchy import Hierarchy
from hsae.method.model import HSAE
from hsae.method.prune import PRUNE_ROWS, prune_levels
from hsae.trained import model_from_levels
from hsae.trained_dir import LevelWeights

ARCHITECTURES = ("jumprelu", "standard")
LINK_ROWS = 262_144
"""Rows whose firing the conditional rule counts for post-hoc links (`hsae posthoc --data`
and the benchmark's peers)."""


def read_sae_lens(directory: str | Path) -> LevelWeights:
    """One SAE Lens directory (cfg.json + sae_weights.safetensors) as an HSAE level."""
    directory = Path(directory)
    cfg = io.load_json(directory / "cfg.json")
    weights = io.load_safetensors(directory / "sae_weights.safetensors")
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise FormatError(f"{directory}: architecture {arch!r} is not one of {ARCHITECTURES}")
    if cfg.get("normalize_activations", "none") != "none":
        raise FormatError(f"{directory}: normalize_activations must be 'none' to import")
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(weights)
    if missing:
        raise FormatError(f"{directory}: sae_weights.safetensors lacks {sorted(missing)}")
    w = {name: weights[name].float() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if not cfg.get("apply_b_dec_to_input", True):
        w["b_enc"] = w["b_enc"] + w["b_dec"] @ w["W_enc"]
    threshold = weights.get("threshold", torch.zeros_like(w["b_enc"])).float().clamp(min=0)
    return LevelWeights(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], threshold)


def link_levels(
    levels: list[LevelWeights],
    similarity: str = "encoder",
    tree: str = "partial",
    unassigned_quantile: float = 0.2,
) -> tuple[HSAE, list[torch.Tensor]]:
    """SAE levels on raw activations as one model (scale 1) and its post-hoc parent arrays."""
    if similarity not in ("encoder", "decoder"):
        raise FormatError("posthoc links use encoder or decoder similarity (no activations)")
    cfg = HSAEConfig(sizes=level_sizes(levels), target_l0=1, similarity=similarity, tree=tree,
                     unassigned_quantile=unassigned_quantile)  # fmt: skip
    cfg.validate()  # increasing sizes, a valid tree and quantile
    model = levels_model(levels)
    hierarchy = Hierarchy(cfg)
    hierarchy.update(model)
    return model, hierarchy.parents


def level_sizes(levels: list[LevelWeights]) -> tuple[int, ...]:
    """The levels' sizes, once they are known to read activations of one width."""
    widths = {int(level.W_enc.shape[0]) for level in levels}
    if len(widths) != 1:
        raise FormatError(f"the SAEs read activations of different widths: {sorted(widths)}")
    return tuple(int(level.W_enc.shape[1]) for level in levels)


def levels_model(levels: list[LevelWeights]) -> HSAE:
    """SAE levels on raw activations as one model (scale 1)."""
    HSAEConfig(sizes=level_sizes(levels), target_l0=1).validate()  # increasing sizes
    return model_from_levels(levels, HSAEConfig.bandwidth, scale=1.0)


def firing_forest(
    model: HSAE,
    batches: Iterable[torch.Tensor],
    parent_pick: ParentPick = "specific",
    prune: bool = False,
    tolerance: float = 0.0,
) -> tuple[list[int], list[torch.Tensor]]:
    """Links by firing on ``batches`` (raw rows, read once), after pruning the levels on
    their first PRUNE_ROWS rows when ``prune``: the pruned levels (finest first) and the
    parent arrays. ``model``'s levels are pruned in place."""
    batches = iter(batches)
    head, pruned = [], []
    if prune:
        head = first_rows(batches, PRUNE_ROWS)
        pruned = prune_levels(model, [model.scaled(x) for x in head], tolerance)
    return pruned, link_by_firing(model, itertools.chain(head, batches), parent_pick)


def first_rows(batches: Iterator[torch.Tensor], n_rows: int) -> list[torch.Tensor]:
    """Batches taken from ``batches`` until they hold ``n_rows`` rows (or it runs out)."""
    taken, count = [], 0
    for x in batches:
        taken.append(x)
        count += x.shape[0]
        if count >= n_rows:
            break
    return taken


@torch.no_grad()
def link_by_firing(
    model: HSAE, rows: Iterable[torch.Tensor], parent_pick: ParentPick = "likely"
) -> list[torch.Tensor]:
    """Post-hoc links by hsae's conditional rule: P(parent fires | child fires) counted
    over the levels' firing on ``rows`` (raw activations, in batches), copies and dead
    parents excluded, the default link threshold (hsae.method.hierarchy)."""
    cfg = HSAEConfig(sizes=model.sizes, target_l0=1, similarity="conditional",
                     parent_pick=parent_pick)  # fmt: skip
    cfg.validate()
    hierarchy = Hierarchy(cfg, model.scale.device)
    for x in rows:
        hierarchy.observe(model.encode_raw(x))
    hierarchy.update(model)
    return hierarchy.parents
