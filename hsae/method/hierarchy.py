"""Parent-child links between adjacent levels and the hierarchy update (section 3.3).

The hierarchy is stored as one int array per level pair: `parents[l][j]` is the parent in
level l of feature j of level l+1, or -1 (unassigned). Children sets C(l, i) are derived
from it and are disjoint by construction.

Update rule: S[j, i] = similarity of child j and candidate parent i;
parent(j) = argmax_i S[j, i]; the children whose best similarity lies in the bottom
`unassigned_quantile` get -1 (partial tree). Variants (appendix F.3): full (quantile 0),
binary (at most two children per parent), fixed (frozen after the first update).

Conditional rule (beyond the paper): S[j, i] = P(i fires | j fires), counted over the
tokens since the last update. A parent fires wherever its child does, so the true parent
scores 1 whatever the two directions; copies (hsae.method.copies), parents that never
fired and dense parents, firing on at least `link_threshold` of all tokens (any child
would pass the threshold beside them: P(p | c) >= P(p) says nothing), are no candidates,
and a child whose best S is below `link_threshold` gets -1.
Among the eligible parents (S >= link_threshold) a child takes the most likely (highest
S) or, with parent_pick = specific, the most specific: the highest P(j fires | i fires).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hsae.config import HSAEConfig
from hsae.method import distributed
from hsae.method.copies import is_copy
from hsae.method.losses import has_children
from hsae.method.model import HSAE
from hsae.method.nested import unlink_inherited


def unlinked(sizes: tuple[int, ...], device: torch.device | str = "cpu") -> list[Tensor]:
    """A hierarchy with no links: early training, before the first update."""
    return [torch.full((n,), -1, dtype=torch.long, device=device) for n in sizes[1:]]


def children_lists(parent: Tensor, n_parents: int) -> list[list[int]]:
    """C(l, i) for every i, as Python lists (for reports and exploration)."""
    out: list[list[int]] = [[] for _ in range(n_parents)]
    for child, p in enumerate(parent.tolist()):
        if p >= 0:
            out[p].append(child)
    return out


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    a = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return a @ b.T


@torch.no_grad()
def similarity(model: HSAE, level: int, kind: str, coact: Tensor | None = None) -> Tensor:
    """S[j, i] between child j (level l+1) and candidate parent i (level l)."""
    if kind == "encoder":
        return _cosine(model.W_enc[level + 1].T, model.W_enc[level].T)
    if kind == "decoder":
        return _cosine(model.W_dec[level + 1], model.W_dec[level])
    if kind == "coactivation":
        if coact is None:
            raise ValueError("coactivation similarity needs co-activation statistics")
        return coact
    raise ValueError(f"unknown similarity {kind!r}")


COUNT_WINDOW = 0.25
"""The conditional rule counts firing over this share of each update interval, the steps
that end at the update: the update reads only those counts, and counting every step
nearly doubled the step's time (benchmarks/synthetic.py, 274 s against 144 s)."""


def pair_counts(child_fired: Tensor, parent_fired: Tensor) -> Tensor:
    """[n_c, n_p] number of tokens on which child j and parent i both fire.

    From the active entries (one count per active (child, parent) pair per token) while
    they are few; as one dense product when rows are so busy that the pairs would
    outnumber the entries of the result (early training, before L0 settles). On a GPU
    always the dense product: it is cheap there, and sizing the sparse path would cost
    a host sync."""
    n_c, n_p = child_fired.shape[1], parent_fired.shape[1]
    if child_fired.is_cuda:
        return _dense_pair_counts(child_fired, parent_fired)
    k_c, k_p = _most_active(child_fired), _most_active(parent_fired)
    if child_fired.shape[0] * k_c * k_p > n_c * n_p:
        return _dense_pair_counts(child_fired, parent_fired)
    c_idx, c_ok = _active_indices(child_fired, k_c)
    p_idx, p_ok = _active_indices(parent_fired, k_p)
    flat = (c_idx[:, :, None] * n_p + p_idx[:, None, :])[c_ok[:, :, None] & p_ok[:, None, :]]
    return torch.bincount(flat, minlength=n_c * n_p).view(n_c, n_p)


def _dense_pair_counts(child_fired: Tensor, parent_fired: Tensor) -> Tensor:
    return (child_fired.T.float() @ parent_fired.float()).round().long()


def _most_active(fired: Tensor) -> int:
    return max(int(fired.sum(1).max()), 1) if fired.numel() else 1


def _active_indices(fired: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """[batch, k] indices of the active entries per row (k >= the most in any row), and
    which of them are real (rows with fewer are padded)."""
    vals, idx = fired.to(torch.int8).topk(k, dim=1, sorted=False)
    return idx, vals > 0


@torch.no_grad()
def conditional_similarity(
    model: HSAE, level: int, both: Tensor, n_child: Tensor, n_parent: Tensor
) -> Tensor:
    """S[j, i] = P(parent i fires | child j fires); copies and dead parents get -1."""
    S = both / n_child.clamp(min=1)[:, None]
    cosine = _cosine(model.W_dec[level + 1], model.W_dec[level])
    excluded = is_copy(cosine, both, n_child[:, None], n_parent[None, :]) | (n_parent == 0)
    return S.masked_fill(excluded, -1.0)


def assign_parents(S: Tensor, tree: str, unassigned_quantile: float) -> Tensor:
    """parent(j) = argmax_i S[j, i], with the bottom quantile of children left unassigned.

    Exactly floor(q * n_children) children get -1 (ties broken by index), except for the
    full tree, where every child gets a parent."""
    best, parent = S.max(dim=1)
    q = 0.0 if tree == "full" else unassigned_quantile
    n_unassigned = math.floor(q * S.shape[0] + 1e-9)  # 0.29 * 100 is 28.999... in floats
    if n_unassigned > 0:
        order = torch.sort(best, stable=True).indices
        parent[order[:n_unassigned]] = -1
    if tree == "binary":
        parent = _cap_children(S, parent >= 0, capacity=2)
    return parent


def _cap_children(S: Tensor, eligible: Tensor, capacity: int) -> Tensor:
    """Greedy assignment with at most `capacity` children per parent.

    Children take their parents in decreasing order of best similarity; a child whose
    preferred parents are full takes its best parent with room left, or -1 if none has."""
    parent = torch.full((S.shape[0],), -1, dtype=torch.long, device=S.device)
    room = torch.full((S.shape[1],), capacity, dtype=torch.long, device=S.device)
    best = S.max(dim=1).values
    for j in torch.sort(best, descending=True, stable=True).indices.tolist():
        if not eligible[j] or not bool((room > 0).any()):
            continue
        scores = S[j].masked_fill(room == 0, float("-inf"))
        i = int(scores.argmax())
        parent[j] = i
        room[i] -= 1
    return parent


class Hierarchy:
    """The parent arrays of an HSAE and the rule that updates them."""

    def __init__(self, cfg: HSAEConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.parents = unlinked(cfg.sizes, device)
        self.frozen = False
        self.coact: list[Tensor] | None = None
        if cfg.link_rule == "coactivation":
            self.coact = [
                torch.zeros(b, a, device=device) for a, b in zip(cfg.sizes, cfg.sizes[1:])
            ]
        # conditional rule: counts since the last update (both-fire per pair, fires per level)
        self.both: list[Tensor] | None = None
        self.fires: list[Tensor] | None = None
        self.tokens = torch.zeros((), device=device)  # the tokens the counts are over
        if cfg.link_rule == "conditional":
            self.both = [torch.zeros(b, a, device=device) for a, b in zip(cfg.sizes, cfg.sizes[1:])]
            self.fires = [torch.zeros(n, device=device) for n in cfg.sizes]

    def has_children(self, level: int) -> Tensor:
        return has_children(self.parents[level], self.cfg.sizes[level])

    @torch.no_grad()
    def observe(self, acts: list[Tensor]) -> None:
        """coactivation: EMA of the fraction of tokens on which child j and parent i both
        fire. conditional: counts of both-fire and of firing since the last update, over
        the global batch (summed over ranks: a count, not a mean, since a child seen on one
        token of one rank must still score P(p|c) = 1, not 1/2 clamped)."""
        if self.both is not None and self.fires is not None:
            fired = [a > 0 for a in acts]
            self.tokens += fired[0].shape[0] * distributed.world_size()  # equal local batches
            for level, f in enumerate(fired):
                self.fires[level] += distributed.total(f.sum(0).float())
            for level, stats in enumerate(self.both):
                stats += distributed.total(pair_counts(fired[level + 1], fired[level]).float())
        if self.coact is None:
            return
        m = self.cfg.coact_momentum
        fired = [(a > 0).to(a.dtype) for a in acts]
        for level, stats in enumerate(self.coact):
            both = distributed.mean(fired[level + 1].T @ fired[level] / fired[level].shape[0])
            stats.mul_(m).add_(both, alpha=1 - m)

    def _conditional_parents(self, model: HSAE, level: int) -> Tensor:
        assert self.both is not None and self.fires is not None
        n_child, n_parent, both = self.fires[level + 1], self.fires[level], self.both[level]
        S = conditional_similarity(model, level, both, n_child, n_parent)
        dense = n_parent >= self.cfg.link_threshold * self.tokens
        eligible = (self.cfg.link_threshold <= S) & ~dense[None, :]
        if self.cfg.parent_pick == "specific":
            S = (both / n_parent.clamp(min=1)[None, :]).masked_fill(~eligible, -1.0)
        parent = S.argmax(dim=1)
        parent[~eligible.any(dim=1) | (n_child == 0)] = -1
        if self.cfg.tree == "binary":
            parent = _cap_children(S, parent >= 0, capacity=2)
        return parent

    @torch.no_grad()
    def update(self, model: HSAE) -> None:
        """One hierarchy update with the model's parameters fixed."""
        if self.frozen:
            return
        for level in range(len(self.parents)):
            if self.both is not None:
                self.parents[level] = self._conditional_parents(model, level)
                continue
            coact = self.coact[level] if self.coact is not None else None
            S = similarity(model, level, self.cfg.link_rule, coact)
            self.parents[level] = assign_parents(S, self.cfg.tree, self.cfg.unassigned_quantile)
        if self.cfg.nested:
            unlink_inherited(self.parents, self.cfg.sizes)
        for counts in (self.both or []) + (self.fires or []) + [self.tokens]:
            counts.zero_()  # the next update reads the tokens after this one
        self.frozen = self.cfg.tree == "fixed"

    @torch.no_grad()
    def relink(self, model: HSAE, rows: list[Tensor]) -> None:
        """Links made afresh from the model's firing on ``rows`` (scaled batches): after its
        features were replaced (hsae.method.prune), the counts so far describe others."""
        for counts in (self.both or []) + (self.fires or []) + [self.tokens]:
            counts.zero_()
        for x in rows:
            self.observe(model.encode(x))
        self.frozen = False
        self.update(model)

    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"hierarchy.parents.{i}": p for i, p in enumerate(self.parents)}
        for i, c in enumerate(self.coact or []):
            out[f"hierarchy.coact.{i}"] = c
        for i, c in enumerate(self.both or []):
            out[f"hierarchy.both.{i}"] = c
        for i, c in enumerate(self.fires or []):
            out[f"hierarchy.fires.{i}"] = c
        if self.fires is not None:
            out["hierarchy.tokens"] = self.tokens
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor], frozen: bool) -> None:
        self.parents = [tensors[f"hierarchy.parents.{i}"].clone() for i in range(len(self.parents))]
        if self.coact is not None:
            self.coact = [tensors[f"hierarchy.coact.{i}"].clone() for i in range(len(self.coact))]
        if self.both is not None and self.fires is not None:
            self.both = [tensors[f"hierarchy.both.{i}"].clone() for i in range(len(self.both))]
            self.fires = [tensors[f"hierarchy.fires.{i}"].clone() for i in range(len(self.fires))]
            # a checkpoint written before the token count: no parent counts as dense
            # until the counts restart at the next update
            self.tokens = tensors.get("hierarchy.tokens", torch.tensor(float("inf"))).clone()
            self.tokens = self.tokens.to(self.fires[0].device)
        self.frozen = frozen
