"""Evaluation measures (paper section 4.2; design §5) — one definition each.

Everything here streams over batches of held-out activations: each measure is an
accumulator with ``update(...)`` per batch and ``result() -> dict``, so no call ever
holds all tokens. The module takes plain tensors, not a model, so any producer of
activations (HSAE, independent SAEs, a planted forest) can be measured the same way.

Conventions
-----------
- Levels are 0-based; level 0 is the smallest (coarsest) dictionary.
- ``acts[l]`` is the [B, n_l] JumpReLU output of level l; a feature is *active*
  on a token iff its activation is > 0 (``act = a > 0``).
- ``recons[l]`` is the [B, d] *unperturbed* reconstruction of level l.
- ``parents[l]`` has shape [n_{l+1}]: for each feature of level l+1 its parent in
  level l, or -1 (unassigned). An *assigned edge* is a pair (c -> p) with
  ``parents[l][c] = p >= 0``; C(p) is the set of children of p.

Definitions (the only place they are stated)
--------------------------------------------
Per level l, over N evaluated tokens:
- **L0**: mean over tokens of the number of active features.
- **MSE**: mean over tokens of ||x - x_hat||^2, the squared error *summed over the d
  input dimensions* (not divided by d).
- **FVE** (fraction of variance explained): 1 - sum ||x - x_hat||^2 / sum ||x - x_bar||^2,
  with x_bar the mean of x over *all* evaluated tokens. NaN if the total variance
  is 0 (fewer than two distinct tokens).
- **dead fraction**: share of level-l features active on none of the tokens.

Per level pair (l, l+1):
- **Hamming**: per token, the number of parents p with C(p) != {} for which
  act_p != OR_{j in C(p)} act_j; mean over tokens. Parents without children and
  unassigned children do not count. 0 when no parent has children.
- **P(p|c)**: for every assigned edge (c -> p) whose child c is active on at least one
  token, P(act_p | act_c) = #(tokens with c and p active) / #(tokens with c active);
  the mean over those edges.
- **P(c|p)**: for every assigned edge (c -> p) whose parent p is active on at least one
  token, P(act_c | act_p) = #(tokens with c and p active) / #(tokens with p active);
  the mean over those edges (a parent with k children contributes k edges).
- Either probability is NaN when no edge qualifies (no assigned edge, or none with
  the conditioning feature ever active).

Copies (a link that joins one feature learned twice, not a refinement):
- an assigned edge (c -> p) is a **copy** when its decoder rows point the same way,
  cos(d_c, d_p) >= COPY_COSINE, *and* the two fire on nearly the same tokens,
  Jaccard = #(c and p) / #(c or p) >= COPY_JACCARD. Both are needed: a child whose
  direction is its parent's plus a small offset has a high cosine but fires on a subset
  (low Jaccard); two features that always fire together with unrelated directions are
  not one feature. A copy scores Hamming 0 and P(p|c) = P(c|p) = 1, so the paper's
  measures cannot tell it from a refinement.
- **copy share** of a pair: copies / assigned edges (NaN without edges); needs the
  decoder rows (``decoders``), else NaN.
- ``p_parent_given_child_noncopy`` and ``p_child_given_parent_noncopy``: the same means
  over non-copy edges only. (Hamming over non-copy links needs a second pass with the
  copies unassigned: :func:`evaluate_with_copies`.)

Summaries over pairs (``hamming``, ``p_parent_given_child``, ``p_child_given_parent``
at the top level of :func:`evaluate`) are plain means over level pairs that ignore
NaN entries; NaN if every entry is NaN or there are no pairs. Results hold plain
Python floats/ints/lists, so ``json.dumps`` accepts them (NaN is written as ``NaN``).

Why one file of about 600 lines: every measure shares the accumulator protocol and the
copy rule, and the two-pass evaluation needs them all; split, the halves import each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from hsae.method.copies import COPY_COSINE, COPY_JACCARD, is_copy
from hsae.method.model import unit_rows

F1_MATCH = 0.8

__all__ = [
    "COPY_COSINE",
    "COPY_JACCARD",
    "Evaluator",
    "F1_MATCH",
    "FiringMatch",
    "LevelStats",
    "PairStats",
    "TreeStats",
    "evaluate",
    "evaluate_with_copies",
    "nanmean",
]

Batch = tuple[Tensor, Sequence[Tensor], Sequence[Tensor]]


def nanmean(values: Iterable[float]) -> float:
    """Mean of the non-NaN values; NaN if there are none."""
    kept = [float(v) for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _as_parents(parents: Tensor | Sequence[int]) -> Tensor:
    """A parent array as a 1-D int64 tensor."""
    p = torch.as_tensor(parents).to(torch.long)
    if p.dim() != 1:
        raise ValueError(f"a parent array must be 1-D, got shape {tuple(p.shape)}")
    return p


def _check_parents(p: Tensor, n_parents: int) -> None:
    """Every entry is -1 or a valid index into the parent level."""
    if p.numel() and (int(p.min()) < -1 or int(p.max()) >= n_parents):
        raise ValueError(f"parent indices must lie in [-1, {n_parents - 1}]")


# ----------------------------------------------------------------------------- level


class LevelStats:
    """Streaming L0, MSE, FVE and dead fraction of one level (definitions: module doc).

    The variance of x is accumulated with Chan et al.'s pairwise update (running
    mean vector and sum of squared deviations, float64), so the streamed FVE equals
    the one-shot formula up to float rounding and does not suffer the cancellation
    of sum ||x||^2 - N ||x_bar||^2 when the mean is large.
    """

    def __init__(self, n_features: int) -> None:
        self.n_features = n_features
        self.n_tokens = 0
        self.fire_counts: Tensor | None = None
        """Per feature, the number of tokens on which it was active (int64, [n])."""
        self._active_total: Tensor | None = None
        self._sse: Tensor | None = None
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None

    def update(self, x: Tensor, acts: Tensor, recon: Tensor) -> None:
        """Add one batch: inputs x [B, d], activations [B, n], reconstruction [B, d]."""
        _check_batch(x, acts, recon, self.n_features)
        b = x.shape[0]
        if b == 0:
            return
        x64 = x.detach().to(torch.float64)
        active = acts.detach() > 0
        if self.fire_counts is None:
            self._init_state(x64)
        counts = active.sum(dim=0)
        self.fire_counts += counts
        self._active_total += counts.sum()
        self._sse += (x64 - recon.detach().to(torch.float64)).square().sum()
        self._merge_variance(x64)
        self.n_tokens += b

    def _init_state(self, x64: Tensor) -> None:
        dev = x64.device
        self.fire_counts = torch.zeros(self.n_features, dtype=torch.long, device=dev)
        self._active_total = torch.zeros((), dtype=torch.long, device=dev)
        self._sse = torch.zeros((), dtype=torch.float64, device=dev)
        self._mean = torch.zeros(x64.shape[1], dtype=torch.float64, device=dev)
        self._m2 = torch.zeros((), dtype=torch.float64, device=dev)

    def _merge_variance(self, x64: Tensor) -> None:
        """Chan's merge of (mean, M2, n) with the batch's own (mean, M2, b)."""
        n_a, n_b = self.n_tokens, x64.shape[0]
        n = n_a + n_b
        mean_b = x64.mean(dim=0)
        m2_b = (x64 - mean_b).square().sum()
        delta = mean_b - self._mean
        self._m2 += m2_b + delta.square().sum() * (n_a * n_b / n)
        self._mean += delta * (n_b / n)

    @property
    def total_variance(self) -> float:
        """sum over tokens of ||x - x_bar||^2."""
        return float(self._m2) if self._m2 is not None else float("nan")

    def result(self) -> dict[str, float | int]:
        """``l0``, ``fve``, ``mse``, ``dead_frac``, ``n_tokens`` (NaN where no tokens)."""
        n = self.n_tokens
        if n == 0:
            nan = float("nan")
            return {"l0": nan, "fve": nan, "mse": nan, "dead_frac": nan, "n_tokens": 0}
        sse = float(self._sse)
        var = self.total_variance
        return {
            "l0": int(self._active_total) / n,
            "fve": 1.0 - sse / var if var > 0 else float("nan"),
            "mse": sse / n,
            "dead_frac": int((self.fire_counts == 0).sum()) / max(self.n_features, 1),
            "n_tokens": n,
        }


def _check_batch(x: Tensor, acts: Tensor, recon: Tensor, n_features: int) -> None:
    if x.dim() != 2 or recon.shape != x.shape:
        raise ValueError(f"x and recon must both be [B, d]; got {x.shape}, {recon.shape}")
    if acts.dim() != 2 or acts.shape != (x.shape[0], n_features):
        raise ValueError(f"acts must be [{x.shape[0]}, {n_features}], got {tuple(acts.shape)}")


# ------------------------------------------------------------------------------ pair


class PairStats:
    """Streaming Hamming, P(p|c) and P(c|p) of one level pair (definitions: module doc).

    ``parents`` has shape [n_children] with entries in {-1, 0..n_parents-1}.
    Counts are kept per assigned edge, per child and per parent (int64), so the
    result is exact whatever the batching.
    """

    def __init__(
        self,
        parents: Tensor | Sequence[int],
        n_parents: int,
        edge_cosine: Tensor | None = None,
    ) -> None:
        """``edge_cosine``: [n_children] cos(d_c, d_parent(c)) (any value where unassigned);
        without it the copy measures are NaN."""
        p = _as_parents(parents)
        _check_parents(p, n_parents)
        self.n_parents = n_parents
        self.n_children = p.numel()
        self.n_tokens = 0
        self._edge_child = torch.nonzero(p >= 0).flatten()
        self._edge_parent = p[self._edge_child]
        self._has_children = torch.zeros(n_parents, dtype=torch.bool)
        self._has_children[self._edge_parent] = True
        self._edge_cosine = None
        if edge_cosine is not None:
            self._edge_cosine = edge_cosine.detach().cpu().double()[self._edge_child]
        self._mismatch_total: Tensor | None = None
        self._both: Tensor | None = None
        self._child_count: Tensor | None = None
        self._parent_count: Tensor | None = None

    @property
    def n_edges(self) -> int:
        """Number of assigned edges (children with a parent)."""
        return self._edge_child.numel()

    @property
    def n_parents_with_children(self) -> int:
        """Number of parents p with C(p) != {}."""
        return int(self._has_children.sum())

    def update(self, parent_acts: Tensor, child_acts: Tensor) -> None:
        """Add one batch: activations of level l [B, n_l] and level l+1 [B, n_{l+1}]."""
        self._check(parent_acts, child_acts)
        if parent_acts.shape[0] == 0:
            return
        act_p = parent_acts.detach() > 0
        act_c = child_acts.detach() > 0
        if self._both is None:
            self._init_state(act_p.device)
        self._mismatch_total += self._mismatches(act_p, act_c).sum()
        both = act_c[:, self._edge_child] & act_p[:, self._edge_parent]
        self._both += both.sum(dim=0)
        self._child_count += act_c.sum(dim=0)
        self._parent_count += act_p.sum(dim=0)
        self.n_tokens += act_p.shape[0]

    def _check(self, parent_acts: Tensor, child_acts: Tensor) -> None:
        b = parent_acts.shape[0]
        if parent_acts.shape != (b, self.n_parents):
            raise ValueError(f"parent acts must be [B, {self.n_parents}]")
        if child_acts.shape != (b, self.n_children):
            raise ValueError(f"child acts must be [{b}, {self.n_children}]")

    def _init_state(self, dev: torch.device) -> None:
        self._edge_child = self._edge_child.to(dev)
        self._edge_parent = self._edge_parent.to(dev)
        self._has_children = self._has_children.to(dev)
        self._mismatch_total = torch.zeros((), dtype=torch.long, device=dev)
        self._both = torch.zeros(self.n_edges, dtype=torch.long, device=dev)
        self._child_count = torch.zeros(self.n_children, dtype=torch.long, device=dev)
        self._parent_count = torch.zeros(self.n_parents, dtype=torch.long, device=dev)

    def _mismatches(self, act_p: Tensor, act_c: Tensor) -> Tensor:
        """Per token, the Hamming count: parents with children whose act != OR(children)."""
        n_active_children = torch.zeros(act_p.shape, dtype=torch.int32, device=act_p.device)
        n_active_children.index_add_(
            1, self._edge_parent, act_c[:, self._edge_child].to(torch.int32)
        )
        or_children = n_active_children > 0
        return ((act_p != or_children) & self._has_children).sum(dim=1)

    def result(self) -> dict[str, float | int]:
        """``hamming``, ``p_parent_given_child``, ``p_child_given_parent``, ``n_edges``,
        ``n_parents_with_children``, ``n_tokens``."""
        out: dict[str, float | int] = {
            "hamming": float("nan"),
            "p_parent_given_child": float("nan"),
            "p_child_given_parent": float("nan"),
            "n_edges": self.n_edges,
            "n_parents_with_children": self.n_parents_with_children,
            "n_tokens": self.n_tokens,
        }
        if self.n_tokens == 0 or self.n_edges == 0:  # no link: undefined, not a perfect 0
            return out
        out["hamming"] = int(self._mismatch_total) / self.n_tokens
        child_count = self._child_count[self._edge_child]
        parent_count = self._parent_count[self._edge_parent]
        out["p_parent_given_child"] = _mean_ratio(self._both, child_count)
        out["p_child_given_parent"] = _mean_ratio(self._both, parent_count)
        copies = self.copy_edges()
        if copies is not None:
            keep = ~copies.to(self._both.device)
            out["n_copies"] = int(copies.sum())
            out["copy_children"] = self._edge_child.cpu()[copies].tolist()
            out["copy_share"] = int(copies.sum()) / self.n_edges if self.n_edges else math.nan
            out["p_parent_given_child_noncopy"] = _mean_ratio(self._both[keep], child_count[keep])
            out["p_child_given_parent_noncopy"] = _mean_ratio(self._both[keep], parent_count[keep])
        return out

    def copy_edges(self) -> Tensor | None:
        """[n_edges] bool (edges in child order): which assigned edges are copies (module
        doc); None without decoder cosines."""
        if self._edge_cosine is None:
            return None
        if self.n_tokens == 0:
            return torch.zeros(self.n_edges, dtype=torch.bool)
        n_child = self._child_count[self._edge_child].cpu().double()
        n_parent = self._parent_count[self._edge_parent].cpu().double()
        return is_copy(self._edge_cosine, self._both.cpu().double(), n_child, n_parent)

    def parents_without_copies(self) -> Tensor:
        """The parent array with every copy edge unassigned (-1)."""
        parents = torch.full((self.n_children,), -1, dtype=torch.long)
        parents[self._edge_child.cpu()] = self._edge_parent.cpu()
        copies = self.copy_edges()
        if copies is not None:
            parents[self._edge_child.cpu()[copies]] = -1
        return parents


def _mean_ratio(num: Tensor, den: Tensor) -> float:
    """Mean of num/den over entries with den > 0; NaN if there are none."""
    keep = den > 0
    if not bool(keep.any()):
        return float("nan")
    return float((num[keep].double() / den[keep].double()).mean())


# ------------------------------------------------------------------------------ tree


class TreeStats:
    """Structure of the feature forest, from the parent arrays alone.

    ``n_features`` gives n_l for every level (length L, so ``len(parents) == L - 1``);
    it is needed because the parent arrays do not tell the size of level 0.

    Definitions:
    - assigned fraction of level l >= 1: share of its features with a parent.
    - branching of pair (l, l+1): child count |C(p)| of each level-l feature p.
      ``branching_hist[k]`` = number of level-l features with exactly k children,
      for k = 0..max (entry 0 counts the childless ones, so the list sums to n_l);
      ``branching_mean`` = mean |C(p)| over parents with at least one child (NaN if none).
    - depth of a feature: number of edges on the longest downward path from it
      (0 for a feature without children). ``depth_hist[k]`` = number of level-0
      features (the roots of the forest's full-height trees) whose subtree has depth k;
      ``max_depth`` = its largest k (at most L - 1). ``roots_with_children`` = number
      of level-0 features with at least one child.
    Unassigned features of level >= 1 also root their own (shorter) trees; they are
    counted in ``n_unassigned`` but not in the depth statistics.
    """

    def __init__(self, parents: Sequence[Tensor | Sequence[int]], n_features: Sequence[int]):
        if len(n_features) != len(parents) + 1:
            raise ValueError("need len(n_features) == len(parents) + 1")
        self.n_features = [int(n) for n in n_features]
        self.parents = [_as_parents(p).cpu() for p in parents]
        for lvl, p in enumerate(self.parents):
            if p.numel() != self.n_features[lvl + 1]:
                raise ValueError(
                    f"parents[{lvl}] has {p.numel()} entries, level {lvl + 1} has "
                    f"{self.n_features[lvl + 1]} features"
                )
            _check_parents(p, self.n_features[lvl])

    def child_counts(self, lvl: int) -> Tensor:
        """|C(p)| for every feature p of level lvl (lvl < L - 1)."""
        p = self.parents[lvl]
        return torch.bincount(p[p >= 0], minlength=self.n_features[lvl])

    def depths(self) -> list[Tensor]:
        """Per level, the subtree depth of every feature (bottom-up over levels)."""
        out = [torch.zeros(self.n_features[-1], dtype=torch.long)]
        for lvl in range(len(self.parents) - 1, -1, -1):
            p, below = self.parents[lvl], out[0]
            keep = p >= 0
            d = torch.zeros(self.n_features[lvl], dtype=torch.long)
            d.scatter_reduce_(0, p[keep], below[keep] + 1, reduce="amax", include_self=True)
            out.insert(0, d)
        return out

    def _pair(self, lvl: int) -> dict[str, object]:
        counts = self.child_counts(lvl)
        with_children = counts[counts > 0]
        return {
            "parents_with_children": int(with_children.numel()),
            "branching_hist": torch.bincount(counts).tolist(),
            "branching_mean": float(with_children.double().mean())
            if with_children.numel()
            else float("nan"),
            "branching_max": int(counts.max()) if counts.numel() else 0,
        }

    def result(self) -> dict[str, object]:
        """``n_features``, ``n_assigned``, ``assigned_frac`` (levels >= 1), ``n_unassigned``,
        ``pairs`` (per pair: parents_with_children, branching_hist, branching_mean,
        branching_max), ``roots_with_children``, ``depth_hist``, ``max_depth``."""
        n_assigned = [int((p >= 0).sum()) for p in self.parents]
        root_depth = self.depths()[0]
        return {
            "n_features": list(self.n_features),
            "n_assigned": n_assigned,
            "assigned_frac": [
                a / max(n, 1) for a, n in zip(n_assigned, self.n_features[1:], strict=True)
            ],
            "n_unassigned": [n - a for a, n in zip(n_assigned, self.n_features[1:], strict=True)],
            "pairs": [self._pair(lvl) for lvl in range(len(self.parents))],
            "roots_with_children": int((root_depth > 0).sum()),
            "depth_hist": torch.bincount(root_depth).tolist(),
            "max_depth": int(root_depth.max()) if root_depth.numel() else 0,
        }


# ------------------------------------------------------------------------- all of it


class Evaluator:
    """All measures at once: one :class:`LevelStats` per level, one :class:`PairStats`
    per level pair, and the :class:`TreeStats` of ``parents``.

    ``n_features`` are the level sizes n_0..n_{L-1}; ``parents`` has length L - 1.
    """

    def __init__(
        self,
        parents: Sequence[Tensor | Sequence[int]],
        n_features: Sequence[int],
        decoders: Sequence[Tensor] | None = None,
    ):
        """``decoders``: the [n_l, d] decoder rows of every level, for the copy measures."""
        self.tree = TreeStats(parents, n_features)
        sizes = self.tree.n_features
        self.levels = [LevelStats(n) for n in sizes]
        cosines = edge_cosines(decoders, self.tree.parents) if decoders is not None else None
        self.pairs = [
            PairStats(p, sizes[lvl], None if cosines is None else cosines[lvl])
            for lvl, p in enumerate(self.tree.parents)
        ]

    def update(self, x: Tensor, acts: Sequence[Tensor], recons: Sequence[Tensor]) -> None:
        """Add one batch: x [B, d], one [B, n_l] activation and one [B, d]
        unperturbed reconstruction per level."""
        if len(acts) != len(self.levels) or len(recons) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} levels of acts and recons")
        for stats, a, r in zip(self.levels, acts, recons, strict=True):
            stats.update(x, a, r)
        for lvl, stats in enumerate(self.pairs):
            stats.update(acts[lvl], acts[lvl + 1])

    def result(self) -> dict[str, object]:
        """See :func:`evaluate`."""
        levels = [s.result() for s in self.levels]
        pairs = [s.result() for s in self.pairs]
        return {
            "levels": levels,
            "pairs": pairs,
            "n_tokens": self.levels[0].n_tokens,
            "l0": [lv["l0"] for lv in levels],
            "fve": [lv["fve"] for lv in levels],
            "mse": [lv["mse"] for lv in levels],
            "dead_frac": [lv["dead_frac"] for lv in levels],
            "n_links": [p["n_edges"] for p in pairs],
            "hamming": nanmean(p["hamming"] for p in pairs),
            "p_parent_given_child": nanmean(p["p_parent_given_child"] for p in pairs),
            "p_child_given_parent": nanmean(p["p_child_given_parent"] for p in pairs),
            "copy_share": _copy_share(pairs),
            "tree": self.tree.result(),
        }

    def parents_without_copies(self) -> list[Tensor]:
        return [pair.parents_without_copies() for pair in self.pairs]


class FiringMatch:
    """Matching by firing, on data whose true features are known (a planted forest).

    Per level, the F1 of each latent's firing (a > 0) against each true feature's
    (active): F1 = 2 #(both) / (#latent + #true). A true feature is *recovered by firing*
    at a level when some latent there reaches F1 >= F1_MATCH. Beside matching by cosine,
    this counts a latent that fires with a planted feature but points elsewhere (a
    parent+child blend has the parent's firing, not its direction)."""

    def __init__(self, n_true: int, n_features: Sequence[int]) -> None:
        self.n_true, self.n_features = n_true, list(n_features)
        self.both = [torch.zeros(n, n_true, dtype=torch.float64) for n in self.n_features]
        self.latent = [torch.zeros(n, dtype=torch.float64) for n in self.n_features]
        self.true = torch.zeros(n_true, dtype=torch.float64)

    def update(self, true_active: Tensor, acts: Sequence[Tensor]) -> None:
        t = true_active.detach().cpu().double()
        self.true += t.sum(0)
        for level, a in enumerate(acts):
            fired = (a.detach() > 0).cpu().double()
            self.both[level] += fired.T @ t
            self.latent[level] += fired.sum(0)

    def result(self) -> dict[str, list]:
        """``f1_recovered`` and ``f1_mean`` (mean over true features of the best F1), per
        level."""
        recovered, mean = [], []
        for both, latent in zip(self.both, self.latent, strict=True):
            total = latent.unsqueeze(1) + self.true.unsqueeze(0)
            f1 = torch.where(total > 0, 2 * both / total.clamp(min=1), torch.zeros_like(both))
            best = f1.max(dim=0).values
            recovered.append(int((best >= F1_MATCH).sum()))
            mean.append(float(best.mean()))
        return {"f1_recovered": recovered, "f1_mean": mean}


def edge_cosines(decoders: Sequence[Tensor], parents: Sequence[Tensor]) -> list[Tensor]:
    """Per level pair, cos(d_c, d_parent(c)) for every child c (0 where unassigned)."""
    out = []
    for lvl, p in enumerate(parents):
        dec_p, dec_c = (unit_rows(decoders[k].detach().float().cpu()) for k in (lvl, lvl + 1))
        p = p.cpu()
        cos = (dec_c * dec_p[p.clamp(min=0)]).sum(-1)
        out.append(torch.where(p >= 0, cos, torch.zeros_like(cos)))
    return out


def _copy_share(pairs: list[dict]) -> float:
    """Copies over assigned edges, all level pairs together (NaN without copy measures)."""
    if not pairs or "n_copies" not in pairs[0]:
        return math.nan
    edges = sum(p["n_edges"] for p in pairs)
    return sum(p["n_copies"] for p in pairs) / edges if edges else math.nan


def evaluate_with_copies(
    make_batches: Callable[[], Iterable[Batch]],
    parents: Sequence[Tensor | Sequence[int]],
    n_features: Sequence[int],
    decoders: Sequence[Tensor],
) -> dict[str, object]:
    """:func:`evaluate` with the copy measures, plus ``noncopy``: the paper's three measures
    over non-copy links. Which links are copies is known only after a pass over the tokens,
    so ``make_batches()`` is called twice and must give the same tokens both times."""
    evaluator = Evaluator(parents, n_features, decoders)
    for x, acts, recons in make_batches():
        evaluator.update(x, acts, recons)
    report = evaluator.result()
    kept = evaluator.parents_without_copies()
    rerun = evaluate(make_batches(), kept, n_features)
    report["noncopy"] = {
        "hamming": rerun["hamming"],
        "p_parent_given_child": rerun["p_parent_given_child"],
        "p_child_given_parent": rerun["p_child_given_parent"],
        "n_edges": [int((p >= 0).sum()) for p in kept],
    }
    return report


def evaluate(
    batches: Iterable[Batch],
    parents: Sequence[Tensor | Sequence[int]],
    n_features: Sequence[int] | None = None,
    decoders: Sequence[Tensor] | None = None,
) -> dict[str, object]:
    """Stream ``batches`` of ``(x, acts, recons)`` through every measure.

    ``n_features`` defaults to the widths of the first batch's ``acts``.

    Returns a JSON-serialisable dict:
    - ``levels``: per level {l0, fve, mse, dead_frac, n_tokens};
    - ``pairs``: per level pair {hamming, p_parent_given_child, p_child_given_parent,
      n_edges, n_parents_with_children, n_tokens};
    - ``l0``, ``fve``, ``mse``, ``dead_frac``: the per-level values as lists;
    - ``hamming``, ``p_parent_given_child``, ``p_child_given_parent``: means over
      level pairs ignoring NaN;
    - ``tree``: :meth:`TreeStats.result`; ``n_tokens``: tokens evaluated.
    """
    evaluator: Evaluator | None = None
    for x, acts, recons in batches:
        if evaluator is None:
            sizes = n_features if n_features is not None else [a.shape[1] for a in acts]
            evaluator = Evaluator(parents, sizes, decoders)
        evaluator.update(x, acts, recons)
    if evaluator is None:
        if n_features is None:
            raise ValueError("no batches to evaluate and no n_features given")
        evaluator = Evaluator(parents, n_features, decoders)
    return evaluator.result()
