"""The Tree SAE (Cao et al. 2026, arXiv 2605.07922) as a peer on the benchmark's rows.

Written here from the paper's equations and algorithms as its authors' code implements them
(github.com/tue147/tree-sae, MIT): that code is not on PyPI and needs TransformerLens and
Lightning. One TopK dictionary split into privilege layers:

- Activation coverage (Eq. 6): a feature of layer l >= 1 fires only on tokens where its
  parent fires; its parent is one feature of a lower layer, or an always-active root.
  Each layer keeps its own top k_l among the features whose parent fires.
- Reconstruction condition (Eq. 7): every layer's cumulative reconstruction (layers 0..l)
  reconstructs x; the loss is the sum of their MSEs, each divided by Var(x).
- AuxK (Eq. 8) on layer 0: its dead features reconstruct layer 0's residual.
- Dynamic allocation (Algorithms 1-2): each candidate parent gathers a capacity, the
  step's loss shared among the parents that fired in the batch. At every reallocation
  each parent's quota of children is set greedily from the capacities, and dead children
  move from over-full parents to under-full ones. At the root reset the dead children are
  moved to the root and allocation stops.

The authors' schedule is in steps of a 97,656-step GPT-2 run (dead after 1,953 steps,
first reallocation at 3,000, then x2 up to 10,000, root reset at 50,000); here each is
the same share of the run. The input is scaled as every other method's (E||x|| = sqrt(d))
instead of standardised per token, so all methods read the same rows.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hsae.method.model import drop_radial_grad, unit_rows
from hsae.method.train import estimate_scale

# The authors' schedule, in steps of their GPT-2 runs (500M tokens in steps of 5 x 1,024)
GPT2_STEPS = 97_656
DEAD_AFTER = 1953  # a latent silent this long is dead (10M tokens)
ELIGIBLE_WITHIN = 50_000 // 5120  # a parent may take children if it fired this recently
FIRST_REALLOCATION, LAST_INTERVAL = 3000, 10_000  # doubling in between
ROOT_RESET = 50_000


@dataclass
class TreeSAEConfig:
    features_per_layer: tuple[int, ...]
    k_per_layer: tuple[int, ...]
    steps: int
    lr: float = 3e-3
    auxk: int = 256
    auxk_coef: float = 1 / 32
    fire_threshold: float = 1e-3

    @classmethod
    def for_levels(cls, levels: tuple[int, ...], target_l0: float, steps: int) -> TreeSAEConfig:
        """Privilege layers whose prefixes are the level sizes, the target L0 split over them
        in the ratio of the authors' 4-layer GPT-2 runs."""
        widths = tuple(b - a for a, b in zip((0, *levels), levels))
        return cls(widths, k_split(target_l0, K_RATIO), steps)

    def share(self, gpt2_steps: int) -> int:
        """An authors' step count as the same share of this run."""
        return max(1, round(gpt2_steps * self.steps / GPT2_STEPS))


K_RATIO = (21, 5, 4, 2)  # the authors' k per layer at L0 32


def k_split(total: float, ratio: tuple[int, ...]) -> tuple[int, ...]:
    """round(total) split in `ratio` by largest remainders, at least 1 each."""
    n = round(total)
    exact = [n * r / sum(ratio) for r in ratio]
    k = [max(1, int(e)) for e in exact]
    for i in sorted(range(len(k)), key=lambda i: int(exact[i]) - exact[i])[: n - sum(k)]:
        k[i] += 1
    return tuple(k)


class TreeSAE(nn.Module):
    def __init__(self, d_in: int, cfg: TreeSAEConfig, seed: int):
        super().__init__()
        self.cfg = cfg
        self.bounds = [0]
        for n in cfg.features_per_layer:
            self.bounds.append(self.bounds[-1] + n)
        gen = torch.Generator().manual_seed(seed)
        W_dec = unit_rows(torch.randn(self.bounds[-1], d_in, generator=gen))
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        # parent[l][i]: the parent of layer l's i-th feature; bounds[l] stands for the root
        self.parent = [torch.zeros(0, dtype=torch.long)] + [
            torch.randint(0, self.bounds[layer] + 1, (n,), generator=gen)
            for layer, n in enumerate(cfg.features_per_layer)
            if layer > 0
        ]
        self.since_fired = torch.zeros(self.bounds[-1], dtype=torch.long)

    def span(self, layer: int) -> slice:
        return slice(self.bounds[layer], self.bounds[layer + 1])

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Pre-activations and latents, layer by layer under the coverage gate (Eq. 6)."""
        pre = (x - self.b_dec) @ self.W_enc
        latents = torch.zeros_like(pre)
        for layer, k in enumerate(self.cfg.k_per_layer):
            gated = pre[:, self.span(layer)]
            if layer > 0:
                gated = gated * self.parent_fires(latents, layer)
            values, idx = gated.topk(k, dim=1)
            latents = latents.scatter(1, idx + self.bounds[layer], values.relu())
        return pre, latents

    def parent_fires(self, latents: Tensor, layer: int) -> Tensor:
        """[batch, layer l's size]: whether each feature's parent fires on each row."""
        lower = latents[:, : self.bounds[layer]] > self.cfg.fire_threshold
        root = torch.ones_like(lower[:, :1])
        return torch.cat([lower, root], 1)[:, self.parent[layer]]

    def cumulative(self, latents: Tensor) -> list[Tensor]:
        """Each layer's cumulative reconstruction, layers 0..l (Eq. 7)."""
        out, total = [], self.b_dec.expand(latents.shape[0], -1)
        for layer in range(len(self.cfg.k_per_layer)):
            total = total + latents[:, self.span(layer)] @ self.W_dec[self.span(layer)]
            out.append(total)
        return out

    def loss(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre, latents = self.encode(x)
        recons = self.cumulative(latents)
        var = x.var() + 1e-8
        loss = sum((r - x).pow(2).mean() / var for r in recons)
        return loss + self.auxk_loss(x, pre, recons[0]), latents

    def auxk_loss(self, x: Tensor, pre: Tensor, recon: Tensor) -> Tensor:
        """Eq. 8 on layer 0: its top-auxk dead pre-activations reconstruct its residual."""
        dead = self.since_fired[self.span(0)] >= self.cfg.share(DEAD_AFTER)
        if not dead.any():
            return x.new_zeros(())
        values, idx = (pre[:, self.span(0)] * dead).topk(min(self.cfg.auxk, int(dead.sum())), 1)
        error = x - recon
        aux = torch.zeros_like(pre[:, self.span(0)]).scatter(1, idx, values.relu())
        aux = aux @ self.W_dec[self.span(0)]
        spread = (error - error.mean(1, keepdim=True)).pow(2).mean()
        return self.cfg.auxk_coef * ((error - aux).pow(2).mean() / spread).nan_to_num(0)


class Allocation:
    """Algorithms 1-2: capacities, quotas and the moves of dead children."""

    def __init__(self, sae: TreeSAE):
        self.sae, cfg = sae, sae.cfg
        self.capacity = [torch.zeros(b + 1) for b in sae.bounds[:-1]]
        self.interval, self.since = cfg.share(FIRST_REALLOCATION), 0
        self.reset_at, self.stopped = cfg.share(ROOT_RESET), False

    @torch.no_grad()
    def step(self, step: int, loss: float, fired: Tensor) -> None:
        sae = self.sae
        for layer in range(1, len(sae.bounds) - 1):
            pool = torch.cat([fired[: sae.bounds[layer]].float(), torch.ones(1)])
            self.capacity[layer] += pool * loss / pool.sum()
        self.since += 1
        if self.stopped:
            return
        if step + 1 >= self.reset_at:
            for layer in range(1, len(sae.bounds) - 1):
                sae.parent[layer][self.dead_children(layer)] = sae.bounds[layer]
            self.stopped = True
        elif self.since >= self.interval:
            for layer in range(1, len(sae.bounds) - 1):
                self.reallocate(layer)
            self.since = 0
            self.interval = min(sae.cfg.share(LAST_INTERVAL), self.interval * 2)

    def dead_children(self, layer: int) -> Tensor:
        return self.sae.since_fired[self.sae.span(layer)] >= self.sae.cfg.share(DEAD_AFTER)

    def reallocate(self, layer: int) -> None:
        sae, index = self.sae, self.sae.parent[layer]
        n_parents = sae.bounds[layer]
        recent = sae.since_fired[:n_parents] < sae.cfg.share(ELIGIBLE_WITHIN)
        eligible = torch.cat([recent, torch.ones(1, dtype=torch.bool)])  # the root always
        quotas = greedy_quotas(self.capacity[layer], len(index), eligible)
        counts = torch.bincount(index, minlength=n_parents + 1)
        dead = self.dead_children(layer)
        movers = [
            torch.nonzero((index == p) & dead).flatten()[: int(counts[p] - quotas[p])]
            for p in torch.nonzero(counts > quotas).flatten().tolist()
        ]
        receivers = [
            torch.full((int(quotas[p] - counts[p]),), p, dtype=torch.long)
            for p in torch.nonzero(quotas > counts).flatten().tolist()
        ]
        if movers and receivers:
            movers, receivers = torch.cat(movers), torch.cat(receivers)
            n = min(len(movers), len(receivers))
            index[movers[:n]] = receivers[:n]
        self.capacity[layer].zero_()


def greedy_quotas(capacity: Tensor, n_children: int, eligible: Tensor) -> Tensor:
    """Algorithm 1: children per parent maximising min_p C_p / k_p, one child at a time to
    the parent with the largest C_p / (k_p + 1); uniform over the eligible parents when
    none has capacity."""
    quotas = torch.zeros(len(capacity), dtype=torch.long)
    heap = [(-float(c), p) for p, c in enumerate(capacity.tolist()) if eligible[p] and c > 0]
    if not heap:
        ids = torch.nonzero(eligible).flatten()
        quotas[ids] = n_children // len(ids)
        quotas[ids[: n_children % len(ids)]] += 1
        return quotas
    heapq.heapify(heap)
    for _ in range(n_children):
        _, p = heapq.heappop(heap)
        quotas[p] += 1
        heapq.heappush(heap, (-float(capacity[p]) / (int(quotas[p]) + 1), p))
    return quotas


def geometric_median(x: Tensor, iters: int = 100) -> Tensor:
    """Weiszfeld's algorithm: the Tree SAE's start for b_dec."""
    point = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - point).norm(dim=1).clamp_min(1e-8)
        point = (w[:, None] * x).sum(0) / w.sum()
    return point


def fit(batches, d_in: int, cfg: TreeSAEConfig, seed: int) -> tuple[TreeSAE, float]:
    """Train on `cfg.steps` batches; returns the SAE and the input scale it reads."""
    scale, _ = estimate_scale(batches(0), 65536)
    sae = TreeSAE(d_in, cfg, seed)
    allocation = Allocation(sae)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, eps=6.25e-10)
    for step, x in zip(range(cfg.steps), batches(0)):
        x = x * scale
        if step == 0:
            sae.b_dec.data = geometric_median(x)
        loss, latents = sae.loss(x)
        opt.zero_grad()
        loss.backward()
        sae.W_dec.data = unit_rows(sae.W_dec.data)  # as the authors: before the step
        drop_radial_grad(sae.W_dec)
        opt.step()
        fired = (latents > cfg.fire_threshold).any(0)
        sae.since_fired = torch.where(fired, 0, sae.since_fired + 1)
        allocation.step(step, float(loss.detach()), fired)
    with torch.no_grad():
        sae.W_dec.data = unit_rows(sae.W_dec.data)
    return sae, scale


class TreeLevels:
    """A trained Tree SAE read as the benchmark's levels: level l is the prefix of layers
    0..l, with the Tree SAE's own gated encoder, and each new feature of layer l + 1 is
    linked to its allocated parent (none for the root's children)."""

    def __init__(self, sae: TreeSAE, scale: float):
        self.sae, self.scale = sae, torch.tensor(scale)
        self.sizes = tuple(sae.bounds[1:])
        self.W_dec = [sae.W_dec.detach()[:n] for n in self.sizes]

    def encode(self, x: Tensor) -> list[Tensor]:
        _, latents = self.sae.encode(x)
        return [latents[:, :n] for n in self.sizes]

    def decode(self, acts: Tensor, level: int) -> Tensor:
        return acts @ self.W_dec[level] + self.sae.b_dec.detach()

    def parents(self) -> list[Tensor]:
        out = []
        for layer in range(1, len(self.sizes)):
            parent = torch.full((self.sizes[layer],), -1, dtype=torch.long)
            alloc = self.sae.parent[layer]
            parent[self.sae.span(layer)] = torch.where(alloc == self.sae.bounds[layer], -1, alloc)
            out.append(parent)
        return out
