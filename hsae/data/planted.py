"""Planted forests: synthetic activations whose feature hierarchy is known.

A learned HSAE can only be judged against a hierarchy we know, so this module
plants one. Activations are sparse sums of unit feature directions (more
features than dimensions, i.e. in superposition) plus isotropic noise. Some
features are organised in trees, the rest are independent.

Two forms of hierarchy are planted, separately or mixed tree by tree, because
they are found by different signals and a demo that only has the easy one would
prove little:

- **co-occurrence**: a child fires only when its parent fires, and when a node
  fires exactly one of its children fires with probability ``p_descend``. The
  directions are drawn independently of the tree (as in SAE Lens's synthetic
  module), so only the firing statistics reveal the hierarchy.
- **geometry**: the firing is the same, and in addition a child's direction is
  its parent's plus an orthogonal offset, normalised:
  ``d_c = normalize(d_p + offset * u)`` with ``u`` a unit vector orthogonal to
  ``d_p``, so ``cos(d_c, d_p) = 1 / sqrt(1 + offset**2)``. This is the structure
  Park et al. (2024, "The Geometry of Categorical and Hierarchical Concepts in
  Large Language Models") measured in real models.

Node layout: tree nodes come first, level by level across all trees (all roots,
then all depth-1 nodes, ...), then the independent features. Within a level the
children of a node are contiguous and ordered by decreasing firing rate, which
makes sampling a few tensor operations per level.

`score_against_truth` matches a learned HSAE's decoder rows to the true
directions and scores its learned parent links against the planted forest.

Why one file of about 490 lines: the generator and the ground-truth scores read the same
forest structure; each half alone is half a definition.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from hsae.config import ConfigError, check_finite

FORMS = ("cooccurrence", "geometry", "mixed")
RATE_CAP = 0.5
"""No root or independent feature fires on more than half of the tokens."""
_NONNEGATIVE = (
    "root_rate_total",
    "independent_rate_total",
    "zipf_exponent",
    "magnitude_std",
    "noise_std",
)


@dataclass
class PlantedConfig:
    """Shape and statistics of a planted forest; every field has a usable default."""

    d: int = 64
    """Activation width."""
    n_trees: int = 12
    """Number of trees (roots)."""
    branching: int = 3
    """Children per internal node (every tree is full)."""
    depth: int = 3
    """Levels in each tree, >= 1. The root has depth 0, so the deepest nodes have depth-1."""
    n_independent: int = 40
    """Features outside any tree."""
    form: str = "mixed"
    """cooccurrence | geometry | mixed (half of the trees geometry, chosen by seed)."""
    zipf_exponent: float = 1.0
    """Firing rates of roots, of independents, and of siblings fall off as 1/rank^s."""
    root_rate_total: float = 2.0
    """Expected number of active roots per token; each rate is capped at 0.5, so a
    total above 0.5 * n_trees leaves every root at 0.5."""
    independent_rate_total: float = 2.0
    """Expected number of active independent features per token (same cap)."""
    p_descend: float = 0.8
    """When a node is active, probability that exactly one of its children is active."""
    geometry_offset: float = 0.6
    """Geometry form: length of the orthogonal offset from parent to child direction."""
    magnitude_mean: float = 1.0
    """Mean of the lognormal magnitude of an active feature."""
    magnitude_std: float = 0.3
    """Standard deviation of the lognormal magnitude (0: every magnitude is the mean)."""
    noise_std: float = 0.02
    """Standard deviation of the isotropic gaussian noise, per dimension."""
    seed: int = 0
    """Seed of the structure (directions, forms); sampling takes its own generator."""

    def validate(self) -> None:
        """Raise `ConfigError` with a one-line message for the first invalid field."""
        check_finite(self)
        for name in ("d", "n_trees", "branching", "depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_independent < 0:
            raise ConfigError(f"n_independent must be >= 0, got {self.n_independent}")
        if self.form not in FORMS:
            raise ConfigError(f"form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if self.form != "cooccurrence" and self.d < 2:
            raise ConfigError(f"form {self.form!r} needs d >= 2 for orthogonal offsets")
        if not 0.0 <= self.p_descend <= 1.0:
            raise ConfigError(f"p_descend must lie in [0, 1], got {self.p_descend}")
        for name in _NONNEGATIVE:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.geometry_offset <= 0:
            raise ConfigError(f"geometry_offset must be > 0, got {self.geometry_offset}")
        if self.magnitude_mean <= 0:
            raise ConfigError(f"magnitude_mean must be > 0, got {self.magnitude_mean}")


class PlantedSample(NamedTuple):
    """One batch with its ground truth."""

    x: Tensor
    """[B, d] float32 activations."""
    active: Tensor
    """[B, N] bool, which true features fire."""
    magnitudes: Tensor
    """[B, N] float32, the magnitude of each feature (0 where inactive)."""


def zipf_rates(n: int, exponent: float, total: float, cap: float = RATE_CAP) -> Tensor:
    """Rates proportional to 1/rank^s that sum to `total`, none above `cap`.

    Capped rates are fixed at `cap` and the rest is shared among the others
    (water filling), so the expected count stays `total`; when total > cap * n
    every rate saturates at `cap`.
    """
    w = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** exponent
    rates = total * w / w.sum()
    capped = torch.zeros(n, dtype=torch.bool)
    while (over := rates > cap + 1e-12).any():
        capped |= over
        rates[capped] = cap
        free = ~capped
        if not free.any():
            break
        rates[free] = (total - cap * capped.sum()) * w[free] / w[free].sum()
    return rates


class PlantedForest:
    """A planted forest of true features and a sampler of activations over it.

    Attributes (N true features, tree nodes first, then independents):
        directions: [N, d] float32 unit vectors.
        parent: [N] long, parent node or -1 (roots and independents).
        depth: [N] long, 0 for roots, -1 for independents.
        tree: [N] long, tree id or -1 for independents.
        rate: [N] float64, marginal probability that the feature fires on a token.
        cond_rate: [N] float64, probability given that the parent fires (= rate for
            roots and independents).
        geometric: [n_trees] bool, whether the tree has the geometry form.
        ancestor_matrix: [N, N] bool, [a, b] = a is a proper ancestor of b.
    """

    def __init__(self, cfg: PlantedConfig | None = None) -> None:
        self.cfg = cfg = cfg if cfg is not None else PlantedConfig()
        cfg.validate()
        self._build_tree()
        self._build_rates()
        gen = torch.Generator().manual_seed(cfg.seed)
        self.geometric = self._choose_forms(gen)
        self.directions = self._build_directions(gen)
        self.ancestor_matrix = self._build_ancestors()
        # Lognormal parameters giving the configured mean and std.
        var_log = math.log1p((cfg.magnitude_std / cfg.magnitude_mean) ** 2)
        self._log_sigma = math.sqrt(var_log)
        self._log_mu = math.log(cfg.magnitude_mean) - var_log / 2

    # ----- structure -------------------------------------------------------------

    @property
    def n_features(self) -> int:
        """N, the number of true features (tree nodes plus independents)."""
        return self.parent.shape[0]

    @property
    def n_tree_nodes(self) -> int:
        return self._level_starts[-1]

    def _build_tree(self) -> None:
        """Fill parent, depth, tree and the level offsets for a breadth-first layout."""
        cfg = self.cfg
        parents, depths, trees = [], [], []
        starts = [0]
        for k in range(cfg.depth):
            n_k = cfg.n_trees * cfg.branching**k
            local = torch.arange(n_k)
            if k == 0:
                parents.append(torch.full((n_k,), -1))
                trees.append(local)
            else:
                parents.append(starts[k - 1] + local // cfg.branching)
                trees.append(trees[-1][local // cfg.branching])
            depths.append(torch.full((n_k,), k))
            starts.append(starts[-1] + n_k)
        n_ind = cfg.n_independent
        self.parent = torch.cat([*parents, torch.full((n_ind,), -1)]).long()
        self.depth = torch.cat([*depths, torch.full((n_ind,), -1)]).long()
        self.tree = torch.cat([*trees, torch.full((n_ind,), -1)]).long()
        self._level_starts = starts

    def _build_rates(self) -> None:
        """Zipf rates for roots and independents; Zipf choice weights among siblings."""
        cfg = self.cfg
        b = cfg.branching
        self._sibling_weights = zipf_rates(b, cfg.zipf_exponent, 1.0, cap=1.0)
        self._sibling_cum = torch.cumsum(self._sibling_weights, 0).float()
        root_rate = zipf_rates(cfg.n_trees, cfg.zipf_exponent, cfg.root_rate_total)
        cond = [root_rate]
        marginal = [root_rate]
        for k in range(1, cfg.depth):
            n_k = cfg.n_trees * b**k
            c = cfg.p_descend * self._sibling_weights.repeat(n_k // b)
            cond.append(c)
            marginal.append(marginal[-1].repeat_interleave(b) * c)
        ind = zipf_rates(cfg.n_independent, cfg.zipf_exponent, cfg.independent_rate_total)
        self.cond_rate = torch.cat([*cond, ind])
        self.rate = torch.cat([*marginal, ind])

    def _choose_forms(self, gen: torch.Generator) -> Tensor:
        """Which trees are geometric: all, none, or a seeded half (rounded up)."""
        n = self.cfg.n_trees
        if self.cfg.form != "mixed":
            return torch.full((n,), self.cfg.form == "geometry", dtype=torch.bool)
        geometric = torch.zeros(n, dtype=torch.bool)
        geometric[torch.randperm(n, generator=gen)[: (n + 1) // 2]] = True
        return geometric

    def _build_directions(self, gen: torch.Generator) -> Tensor:
        """Random unit directions; geometric trees then overwrite theirs level by level."""
        cfg = self.cfg
        dirs = torch.randn(self.n_features, cfg.d, generator=gen, dtype=torch.float64)
        dirs = dirs / dirs.norm(dim=1, keepdim=True)
        offsets = torch.randn(self.n_features, cfg.d, generator=gen, dtype=torch.float64)
        geo_node = self.geometric[self.tree.clamp(min=0)] & (self.tree >= 0)
        for k in range(1, cfg.depth):
            idx = torch.arange(self._level_starts[k], self._level_starts[k + 1])
            idx = idx[geo_node[idx]]
            if idx.numel() == 0:
                continue
            p = dirs[self.parent[idx]]
            u = offsets[idx]
            u = u - (u * p).sum(1, keepdim=True) * p
            u = u / u.norm(dim=1, keepdim=True)
            child = p + cfg.geometry_offset * u
            dirs[idx] = child / child.norm(dim=1, keepdim=True)
        return dirs.float()

    def _build_ancestors(self) -> Tensor:
        """Dense [N, N] proper-ancestor table, one parent hop per iteration."""
        n = self.n_features
        anc = torch.zeros(n, n, dtype=torch.bool)
        nodes = torch.arange(n)
        up = self.parent.clone()
        while (has := up >= 0).any():
            anc[up[has], nodes[has]] = True
            up = torch.where(has, self.parent[up.clamp(min=0)], up)
        return anc

    def is_ancestor(self, a: int, b: int) -> bool:
        """Whether true feature `a` is a proper ancestor of true feature `b`."""
        return bool(self.ancestor_matrix[a, b])

    def true_edges(self) -> list[tuple[int, int]]:
        """All (parent, child) pairs of the planted forest."""
        child = torch.nonzero(self.parent >= 0).flatten()
        return list(zip(self.parent[child].tolist(), child.tolist(), strict=True))

    # ----- sampling --------------------------------------------------------------

    def sample_full(self, batch_size: int, generator: torch.Generator) -> PlantedSample:
        """Draw a batch with its active set and magnitudes (vectorised, no token loop)."""
        active = self._sample_active(batch_size, generator)
        mags = torch.exp(
            self._log_mu
            + self._log_sigma * torch.randn(batch_size, self.n_features, generator=generator)
        )
        mags = torch.where(active, mags, torch.zeros(()))
        x = mags @ self.directions
        if self.cfg.noise_std > 0:
            x = x + self.cfg.noise_std * torch.randn(batch_size, self.cfg.d, generator=generator)
        return PlantedSample(x, active, mags)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw `x [B, d]` float32 and `active [B, N]` bool."""
        x, active, _ = self.sample_full(batch_size, generator)
        return x, active

    def batches(self, batch_size: int, seed: int) -> Iterator[Tensor]:
        """Infinite, seed-deterministic stream of activation batches `x [B, d]`."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch_size, gen)[0]

    def _sample_active(self, batch_size: int, gen: torch.Generator) -> Tensor:
        """Roots and independents by Bernoulli; then one child per active node, level by level."""
        cfg = self.cfg
        active = torch.zeros(batch_size, self.n_features, dtype=torch.bool)
        starts = self._level_starts
        cur = torch.rand(batch_size, cfg.n_trees, generator=gen) < self.rate[: cfg.n_trees].float()
        active[:, : starts[1]] = cur
        for k in range(1, cfg.depth):
            cur = self._descend(cur, gen)
            active[:, starts[k] : starts[k + 1]] = cur
        if cfg.n_independent > 0:
            ind_rate = self.rate[starts[-1] :].float()
            active[:, starts[-1] :] = (
                torch.rand(batch_size, ind_rate.shape[0], generator=gen) < ind_rate
            )
        return active

    def _descend(self, cur: Tensor, gen: torch.Generator) -> Tensor:
        """Given active nodes [B, n_k], the active children [B, n_k * branching]."""
        b = self.cfg.branching
        batch, n_k = cur.shape
        go = cur & (torch.rand(batch, n_k, generator=gen) < self.cfg.p_descend)
        u = torch.rand(batch, n_k, generator=gen)
        choice = torch.searchsorted(self._sibling_cum, u, right=True).clamp_(max=b - 1)
        children = torch.zeros(batch, n_k, b, dtype=torch.bool)
        children.scatter_(2, choice.unsqueeze(2), go.unsqueeze(2))
        return children.reshape(batch, n_k * b)


# ----- ground-truth scoring ----------------------------------------------------------


def match_features(forest: PlantedForest, decoder: Tensor, threshold: float = 0.9) -> Tensor:
    """Per learned row, the true feature of highest cosine if >= threshold, else -1."""
    return _match_rows(_cosines(forest, decoder), threshold)


def _match_rows(cos: Tensor, threshold: float) -> Tensor:
    best, idx = cos.max(dim=1)
    return torch.where(best >= threshold, idx, torch.full_like(idx, -1))


def _cosines(forest: PlantedForest, decoder: Tensor) -> Tensor:
    """[n_l, N] cosines between learned rows (normalised here) and true directions."""
    w = decoder.detach().to("cpu", torch.float32)
    if w.ndim != 2 or w.shape[1] != forest.cfg.d:
        raise ValueError(f"decoder must be [n, {forest.cfg.d}], got {list(w.shape)}")
    w = w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return w @ forest.directions.T


def _check_parents(decoders: list[Tensor], parents: list[Tensor]) -> list[Tensor]:
    if len(parents) != len(decoders) - 1:
        raise ValueError(f"need {len(decoders) - 1} parent arrays, got {len(parents)}")
    out = []
    for level, par in enumerate(parents):
        par = par.detach().to("cpu").long()
        n_parent, n_child = decoders[level].shape[0], decoders[level + 1].shape[0]
        if par.shape != (n_child,):
            raise ValueError(f"parents[{level}] must have shape [{n_child}], got {list(par.shape)}")
        if par.numel() and (par.min() < -1 or par.max() >= n_parent):
            raise ValueError(f"parents[{level}] must hold -1 or indices below {n_parent}")
        out.append(par)
    return out


def _edge_counts(forest: PlantedForest, p_match: Tensor, c_match: Tensor) -> dict[str, int]:
    """Categorise learned edges given the true matches of their two ends."""
    matched = (p_match >= 0) & (c_match >= 0)
    duplicate = matched & (p_match == c_match)
    pm, cm = p_match.clamp(min=0), c_match.clamp(min=0)
    ancestor = matched & forest.ancestor_matrix[pm, cm]
    return {
        "edges": int(p_match.numel()),
        "ancestor": int(ancestor.sum()),
        "duplicate": int(duplicate.sum()),
        "unmatched": int((~matched).sum()),
        "wrong": int((matched & ~duplicate & ~ancestor).sum()),
    }


def _recall_ceiling(forest: PlantedForest, matches: list[Tensor]) -> float:
    """Share of true (P, C) edges that any hierarchy of these dictionaries could recover:
    P matched at some level above a level where C is matched."""
    n, levels = forest.n_features, len(matches)
    first = torch.full((n,), levels, dtype=torch.long)  # coarsest level matching each
    last = torch.full((n,), -1, dtype=torch.long)  # finest level matching each
    for level, m in enumerate(matches):
        hit = m[m >= 0]
        first[hit] = torch.minimum(first[hit], torch.tensor(level))
        last[hit] = torch.maximum(last[hit], torch.tensor(level))
    child = torch.nonzero(forest.parent >= 0).flatten()
    if child.numel() == 0:
        return float("nan")
    return (first[forest.parent[child]] < last[child]).float().mean().item()


def _recall(forest: PlantedForest, matches: list[Tensor], parents: list[Tensor]) -> float:
    """Share of true (P, C) edges joined by a learned ancestor u~P above a learned v~C."""
    n = forest.n_features
    covered = torch.zeros(n, n, dtype=torch.bool)
    for level in range(1, len(matches)):
        v_match = matches[level]
        up = torch.arange(v_match.numel())
        for above in range(level - 1, -1, -1):
            up = torch.where(up >= 0, parents[above][up.clamp(min=0)], up)
            u_match = torch.where(up >= 0, matches[above][up.clamp(min=0)], -1)
            ok = (u_match >= 0) & (v_match >= 0)
            covered[u_match[ok], v_match[ok]] = True
    child = torch.nonzero(forest.parent >= 0).flatten()
    if child.numel() == 0:
        return float("nan")
    return covered[forest.parent[child], child].float().mean().item()


def score_against_truth(
    forest: PlantedForest,
    decoders: list[Tensor],
    parents: list[Tensor],
    threshold: float = 0.9,
) -> dict:
    """Score a learned hierarchy of dictionaries against the planted forest.

    Args:
        decoders: level l's decoder [n_l, d]; rows need not be unit norm.
        parents: for l < L-1, a [n_{l+1}] long array of each level-(l+1) feature's
            parent in level l, or -1.
        threshold: minimum cosine for a learned row to count as a true feature.

    Returns a dict with
        n_true: N; recovered / recovered_frac: per level, true features whose best
        row there has cosine >= threshold; recovered_any: true features recovered at
        some level; matches: per level, each row's matched true feature or -1;
        edges, ancestor, duplicate, unmatched, wrong: learned-edge counts over all
        level pairs (per_pair: the same per pair). An edge is "ancestor" if the
        parent's match is a proper ancestor of the child's, "duplicate" if both
        match the same true feature (a bigger dictionary re-learned it),
        "unmatched" if either end is unmatched, else "wrong" (reversed, siblings,
        unrelated). edge_precision = ancestor / (ancestor + wrong), NaN when that
        denominator is 0; duplicate_frac = duplicate / edges, NaN when there are no
        edges; recall: share of true parent->child pairs (P, C) for which a learned
        u matched to P is a proper ancestor of a learned v matched to C, following
        v's parent chain through any number of levels (NaN if the forest has no
        edges); recall_ceiling: share of true pairs whose parent is matched at a level
        above one where the child is matched (what any links could recover);
        recall_of_ceiling = recall / recall_ceiling.
    """
    if len(decoders) == 0:
        raise ValueError("need at least one decoder")
    parents = _check_parents(decoders, parents)
    n = forest.n_features
    best_per_true = []
    matches = []
    for dec in decoders:
        if dec.shape[0] == 0:
            raise ValueError("every decoder needs at least one row")
        cos = _cosines(forest, dec)
        best_per_true.append(cos.max(dim=0).values)
        matches.append(_match_rows(cos, threshold))
    hit = torch.stack(best_per_true) >= threshold
    recovered = hit.sum(dim=1).tolist()
    per_pair = [
        _edge_counts(forest, matches[lv][par[par >= 0]], matches[lv + 1][par >= 0])
        for lv, par in enumerate(parents)
    ]
    totals = {
        k: sum(p[k] for p in per_pair)
        for k in ("edges", "ancestor", "duplicate", "unmatched", "wrong")
    }
    judged = totals["ancestor"] + totals["wrong"]
    recall, ceiling = _recall(forest, matches, parents), _recall_ceiling(forest, matches)
    return {
        "n_true": n,
        "recovered": recovered,
        "recovered_frac": [r / n for r in recovered],
        "recovered_any": int(hit.any(dim=0).sum()),
        "matches": matches,
        **totals,
        "per_pair": per_pair,
        "edge_precision": totals["ancestor"] / judged if judged else float("nan"),
        "duplicate_frac": totals["duplicate"] / totals["edges"]
        if totals["edges"]
        else float("nan"),
        "recall": recall,
        "recall_ceiling": ceiling,
        "recall_of_ceiling": recall / ceiling if ceiling > 0 else float("nan"),
    }
