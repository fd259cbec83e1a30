"""The HSAE loss (paper section 3.1), every term named as the paper names it.

    L = sum_l [ ||SAE~_l(x) - x||^2                      reconstruction (perturbed, 3.2)
                + lambda_l sum_i H(pi_l,i - theta_l,i) ]  sparsity (lambda_l L0_l)
        + rho sum_{l<L} sum_{i: C(l,i) != {}} ||f_l,i(x) - sum_{j in C(l,i)} f_l+1,j(x)||^2
                                                          L_PC, the parent-children constraint
        + s sum_{l<L} lambda_l+1 sum_{j: p(j) != -1} H(pi_l+1,j - theta_l+1,j) [a_l,p(j) = 0]
                                                          L_S, the support constraint (ours)
        + ghost grads for dead latents (Jermyn & Templeton 2024)

L_S is not the paper's: a linked child firing where its parent is silent pays (1 + s)
times the L0 price. It is the soft form of the Tree SAE's gate (a child may fire only
where its parent fires, Cao et al. 2026), which suits a co-occurrence hierarchy
(docs/hierarchy.md).

SAE~_l is the perturbed reconstruction: each parent with children is substituted by its
children with probability r (one draw per feature per step, design §3).

`hsae_loss_dense` computes it exactly as the formulas read: the reference. The training
step runs the same loss over live entries only (`hsae.method.losses_live.hsae_loss_live`), tested
against this one value by value and gradient by gradient. Both return a `LossOutput` with
every term reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hsae.method.jumprelu import Step, SupportStep

if TYPE_CHECKING:
    from hsae.method.model import HSAE


# ---------------------------------------------------------------- parent arrays


def has_children(parent: Tensor, n_parents: int) -> Tensor:
    """[n_parents] bool: C(l, i) is not empty. Counts by index_add: no data-dependent size,
    so no host sync on a GPU (the training step calls it)."""
    counts = torch.zeros(n_parents, dtype=torch.int32, device=parent.device)
    counts.index_add_(0, parent.clamp(min=0), (parent >= 0).to(torch.int32))
    return counts > 0


# ---------------------------------------------------------------- perturbation (section 3.2)


def draw_substitution(has_children: Tensor, rate: float, gen: torch.Generator) -> Tensor:
    """m over one level: each parent with children is substituted with probability r.

    One Bernoulli per feature per step, shared by the whole batch (design §3)."""
    draw = torch.rand(has_children.shape, generator=gen, device=gen.device)
    return (draw.to(has_children.device) < rate) & has_children


def perturbed_reconstruction(
    model: HSAE,
    recon: Tensor,
    a: Tensor,
    a_next: Tensor,
    level: int,
    parent_next: Tensor,
    m: Tensor,
) -> Tensor:
    """SAE~_l = b_dec,l + (a_l (1-m)) W_dec,l + (a_l+1 m[parent]) W_dec,l+1.

    Starts from the unperturbed SAE_l(x) and touches only the substituted columns, which
    are few (r = 5 %)."""
    parents = m.nonzero().squeeze(1)
    if parents.numel() == 0:
        return recon
    children = (m[parent_next.clamp(min=0)] & (parent_next >= 0)).nonzero().squeeze(1)
    recon = recon - a[:, parents] @ model.W_dec[level][parents]
    return recon + a_next[:, children] @ model.W_dec[level + 1][children]


# ---------------------------------------------------------------- constraint loss (section 3.1)


def pc_loss(
    a_p: Tensor,
    a_c: Tensor,
    dec_p: Tensor,
    dec_c: Tensor,
    parent: Tensor,
    live_c: Tensor | None = None,
    free_norms: bool = False,
) -> Tensor:
    """Mean over tokens of sum_i L_PC,(l,i), computed from active features only.

    With unit decoder rows,
        ||a_p d_p - sum_j a_j d_j||^2 = a_p^2 - 2 a_p sum_j a_j <d_p, d_j> + ||sum_j a_j d_j||^2,
    so the (batch x parents x d) tensor of the naive formula is never built: the last two
    terms run over the (token, child) entries in `live_c`. Inactive entries add nothing to
    the value, but those inside the straight-through window of theta carry its gradient,
    so training passes live_c = pi > theta - eps/2; None takes every entry (exact gradient
    for any a_c)."""
    n_p = a_p.shape[1]
    weight = has_children(parent, n_p).to(a_p.dtype)
    if free_norms:  # ||a_p d_p||^2 = a_p^2 ||d_p||^2 when rows are not unit
        weight = weight * dec_p.pow(2).sum(-1)
    parent_term = (a_p.pow(2) @ weight).sum()
    live = torch.ones_like(a_c, dtype=torch.bool) if live_c is None else live_c
    tok, child = live.nonzero(as_tuple=True)
    par = parent[child]
    keep = par >= 0
    tok, child, par = tok[keep], child[keep], par[keep]
    a_child = a_c[tok, child]
    cos = (dec_p[parent.clamp(min=0)] * dec_c).sum(-1)  # <d_parent(j), d_j> for every child j
    cross = (a_child * a_p[tok, par] * cos[child]).sum()
    siblings = _sibling_sums_sq(tok, par, a_child, dec_c[child], n_p)
    return (parent_term - 2 * cross + siblings) / a_p.shape[0]


def _sibling_sums_sq(
    tok: Tensor, par: Tensor, a_child: Tensor, d_child: Tensor, n_p: int
) -> Tensor:
    """Sum over (token, parent) groups of ||sum_{active j in C(p)} a_j d_j||^2."""
    if tok.numel() == 0:
        return a_child.new_zeros(())
    groups, inverse = torch.unique(tok * n_p + par, return_inverse=True)
    rows = d_child * a_child.unsqueeze(1)
    sums = rows.new_zeros(groups.numel(), rows.shape[1]).index_add(0, inverse, rows)
    return sums.pow(2).sum()


def pc_loss_naive(a_p: Tensor, a_c: Tensor, dec_p: Tensor, dec_c: Tensor, parent: Tensor) -> Tensor:
    """The constraint loss exactly as the paper writes it; reference for tests."""
    f_p = a_p.unsqueeze(2) * dec_p.unsqueeze(0)
    child = (parent >= 0).nonzero().squeeze(1)
    f_c = a_c[:, child].unsqueeze(2) * dec_c[child].unsqueeze(0)
    child_sum = torch.zeros_like(f_p).index_add(1, parent[child], f_c)
    diff = (f_p - child_sum)[:, has_children(parent, a_p.shape[1])]
    return diff.pow(2).sum((1, 2)).mean()


# ---------------------------------------------------------------- support constraint (ours)


def support_loss(
    pre_c: Tensor, theta_c: Tensor, a_p: Tensor, parent: Tensor, eps: Tensor | float
) -> Tensor:
    """L_S for one pair of levels: mean over tokens of the number of linked children that
    fire where their parent is silent, H(pi_j - theta_j) [a_p(j) = 0].

    The parent's silence is a fact of this step, not a target (detached): the child is
    the one that moves, through `SupportStep`'s window on both pi and theta."""
    linked = parent >= 0
    silent = (a_p.detach() == 0)[:, parent.clamp(min=0)] & linked
    return (SupportStep.apply(pre_c, theta_c, eps) * silent).sum() / pre_c.shape[0]


def support_term(inp: LossInputs, l_s: Callable[[int, Tensor], Tensor], zero: Tensor) -> Tensor:
    """s sum_l lambda_l+1 L_S,l, the term as it enters the loss, given L_S of each pair of
    levels l, l+1 as l_s(l, parent_l) (dense or over live entries); zero when s = 0."""
    if inp.support <= 0:
        return zero
    terms = [
        inp.lambdas[level + 1] * l_s(level, parent) for level, parent in enumerate(inp.parents)
    ]
    return inp.support * torch.stack(terms).sum() if terms else zero


# ---------------------------------------------------------------- sparsity


def sparsity_term(l0: Tensor, l0_row: Tensor | None, inp: LossInputs, level: int) -> Tensor:
    """The level's sparsity term as it enters the loss: lambda_l L0_l (the paper's), or with
    l0_targets the per-row quadratic mean_rows 2/T (L0_row - T)^2 (HSAEConfig.sparsity_loss).
    l0: the batch's mean L0 (straight-through); l0_row: per row (needed when quadratic)."""
    if inp.l0_targets is None:
        return inp.lambdas[level] * l0
    assert l0_row is not None
    target = inp.l0_targets[level]
    return (2 / target * (l0_row - target).pow(2)).mean()


# ---------------------------------------------------------------- dead latents


def ghost_grad_loss(pre: Tensor, residual: Tensor, dec: Tensor, mse: Tensor) -> Tensor:
    """Ghost grads (Jermyn & Templeton, 2024) for the dead features of one level, given
    their pre-activations ``pre`` [B, n_dead] and decoder rows ``dec`` [n_dead, d].

    Dead features decode exp(pi) rescaled to half the residual's norm; the MSE to the
    residual is rescaled to the level's own MSE, so it pulls dead encoders toward what the
    live ones miss without changing the loss scale."""
    ghost = pre.clamp(max=20.0).exp() @ dec
    residual = residual.detach()
    ratio = residual.norm(dim=-1, keepdim=True) / (2 * ghost.norm(dim=-1, keepdim=True) + 1e-8)
    ghost_mse = (ghost * ratio.detach() - residual).pow(2).sum(-1)
    return (ghost_mse * (mse.detach() / (ghost_mse.detach() + 1e-8))).mean()


# ---------------------------------------------------------------- the whole loss


@dataclass
class LossInputs:
    """What one training step needs besides the batch."""

    parents: list[Tensor]
    """parents[l]: parent in level l of each feature of level l+1, or -1."""
    lambdas: Tensor
    rho: float
    substitution: list[Tensor | None]
    """m per level l < L-1 (None: no perturbation this step)."""
    dead: list[Tensor] | None = None
    dense: bool = False
    """Compute densely, exactly as the formulas read (hsae_loss_dense), not over live
    entries (hsae.method.losses_live): the reference the fast path is tested against."""
    capacity: list[int] | None = None
    """Live entries per level on a GPU (fixed sizes keep the step free of host syncs)."""
    support: float = 0.0
    """s: weight of the support constraint L_S, in units of the child level's lambda."""
    l0_targets: Tensor | None = None
    """[L] the target T of the quadratic sparsity loss per level; None: lambda_l L0_l."""


@dataclass
class LossOutput:
    total: Tensor
    l0: Tensor
    """[L] mean active features per token (detached)."""
    fve: Tensor
    """[L] fraction of variance explained by the unperturbed reconstruction (detached)."""
    mse: Tensor
    pc: Tensor
    fired: list[Tensor]
    """[n_l] bool per level: fired on at least one token of the batch."""
    dense_acts: Callable[[], list[Tensor]]
    """The [B, n_l] activations of every level (detached), built on demand."""
    dropped: Tensor | None = None
    """Live entries beyond the GPU capacity this step (counted on the device)."""
    sparsity: Tensor | None = None
    """sum_l lambda_l L0_l, the sparsity term as it entered the loss (detached)."""
    ghost: Tensor | None = None
    """The ghost-grads term (detached; 0 while no latent is dead)."""
    support: Tensor | None = None
    """s sum_l lambda_l+1 L_S,l, the support term as it entered the loss (detached)."""


def hsae_loss_dense(model: HSAE, x: Tensor, inp: LossInputs) -> LossOutput:
    """L_HSAE on one batch: the sum of the per-level SAE losses and rho * the PC losses."""
    pres = [model.pre_acts(x, level) for level in range(model.n_levels)]
    acts = [model.activate(pre, level) for level, pre in enumerate(pres)]
    eps = [model.eps(level) for level in range(model.n_levels)]
    total_var = (x - x.mean(0)).pow(2).sum(-1).mean()
    total, l0s, fves, mses, pcs = x.new_zeros(()), [], [], [], []
    sparsity, ghost = x.new_zeros(()), x.new_zeros(())
    for level, (pre, a) in enumerate(zip(pres, acts)):
        recon = model.decode(a, level)
        mses_clean = (recon - x).pow(2).sum(-1)
        fves.append(1 - mses_clean.mean().detach() / total_var)
        m = inp.substitution[level] if level < model.n_levels - 1 else None
        if m is not None:
            recon = perturbed_reconstruction(
                model, recon, a, acts[level + 1], level, inp.parents[level], m
            )
        mse = (recon - x).pow(2).sum(-1)
        l0_row = Step.apply(pre, model.threshold[level], eps[level]).sum(-1)
        l0_ste = l0_row.mean()
        term = sparsity_term(l0_ste, l0_row, inp, level)
        sparsity = sparsity + term
        total = total + mse.mean() + term
        if inp.dead is not None and bool(inp.dead[level].any()):
            idx = inp.dead[level].nonzero().squeeze(1)
            pre_dead = model.ghost_pre_acts(x, level, idx)
            g = ghost_grad_loss(pre_dead, x - recon, model.W_dec[level][idx], mse)
            ghost, total = ghost + g.detach(), total + g
        l0s.append(l0_ste.detach())
        mses.append(mse.mean().detach())
    for level, parent in enumerate(inp.parents):
        if inp.rho > 0:
            W = model.W_dec
            live = pres[level + 1] > model.threshold[level + 1] - eps[level + 1] / 2
            pc = pc_loss(acts[level], acts[level + 1], W[level], W[level + 1], parent, live,
                         model.free_norms)  # fmt: skip
            total = total + inp.rho * pc
            pcs.append(pc.detach())
    support = support_term(inp, lambda level, parent: support_loss(
        pres[level + 1], model.threshold[level + 1], acts[level], parent, eps[level + 1]
    ), x.new_zeros(()))  # fmt: skip
    total = total + support
    pc_sum = torch.stack(pcs).sum() if pcs else x.new_zeros(())
    return LossOutput(
        total, torch.stack(l0s), torch.stack(fves), torch.stack(mses), pc_sum,
        fired=[(a > 0).any(0) for a in acts],
        dense_acts=lambda: [a.detach() for a in acts],
        sparsity=sparsity.detach(), ghost=ghost, support=support.detach(),
    )  # fmt: skip
