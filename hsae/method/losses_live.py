"""The training loss over live entries only: the same value and gradients as
:func:`hsae.method.losses.hsae_loss_dense` (the paper's formulas, written densely), at a fraction
of the cost.

A level's JumpReLU output a = pi H(pi - theta) is zero wherever pi <= theta, and the
straight-through gradient of theta reaches only entries with |pi - theta| < eps/2. So the
whole loss lives on the *live* entries, pi > theta - eps/2: about L0 per token out of n.
Per token and level of n features in d dimensions, the FLOP of each part:

    part                       dense (SAE Lens)   here
    encoder forward            2 d n              2 d n   (pi decides which entries live)
    decoder forward            2 d n              2 d live
    decoder backward           4 d n              4 d live
    encoder backward           2 d n              2 d live (b_dec's share: one d x n matvec)
    constraint loss, L_PC      -                  ~ d live (sibling groups of two or more)

The substitution of section 3.2 touches the few entries of substituted parents and their
children. Ghost grads recompute pi for the dead columns only.

On the CPU, entry lists are compacted (data-dependent sizes are free there). On a GPU a
data-dependent size forces a host-device sync, so live entries come from
``torch.nonzero_static`` with a fixed capacity and every other selection keeps all entries
with a 0/1 weight: the step runs without a sync. Overflow of the capacity is counted on the
device and reported where the training loop syncs anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from hsae.method.jumprelu import JumpReLU, Step, SupportStep
from hsae.method.losses import (
    LossInputs,
    LossOutput,
    ghost_grad_loss,
    has_children,
    sparsity_term,
    support_term,
)

if TYPE_CHECKING:
    from hsae.method.model import HSAE


@dataclass
class Live:
    """The live entries of one level for one batch, sorted by token."""

    tok: Tensor
    feat: Tensor
    pre: Tensor
    """pi at each entry; gradients reach W_enc, b_enc and b_dec."""
    act: Tensor
    """a = JumpReLU(pi) at each entry (zero for entries inside the window below theta)."""
    eps: Tensor | float
    """The straight-through window at each entry (its feature's; HSAE.eps)."""
    offsets: Tensor
    """Index of each token's first entry (the bags of ``F.embedding_bag``)."""
    order: Tensor
    """The entries in feature order: the bags of the backward passes, one per feature."""
    starts: Tensor
    """Index, in that order, of each feature's first entry."""
    valid: Tensor | None
    """0/1 per entry when the list is padded to a fixed capacity (GPU); None when exact."""
    dropped: Tensor | None
    """Live entries beyond the capacity (GPU; counted on the device)."""
    batch: int
    n: int

    def dense(self) -> Tensor:
        """The [batch, n] activations (differentiable)."""
        flat = self.act.new_zeros(self.batch * self.n)
        return flat.index_add(0, self.tok * self.n + self.feat, self.act).view(self.batch, -1)

    def fired(self) -> Tensor:
        """[n] bool: which features fired on at least one token."""
        counts = self.act.new_zeros(self.n).index_add_(0, self.feat, (self.act > 0).to(self.act))
        return counts > 0


def feature_major(feat: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The entries in feature order, and where each feature's entries start in it."""
    order = torch.argsort(feat, stable=True)
    counts = _counts(feat, n)
    return order, counts.cumsum(0) - counts


def _counts(index: Tensor, n: int) -> Tensor:
    """How often each of 0..n-1 occurs (bincount, whose output size costs a GPU sync)."""
    return torch.zeros(n, dtype=torch.long, device=index.device).index_add_(
        0, index, torch.ones_like(index)
    )


def _bag_sum(rows: Tensor, index: Tensor, order: Tensor, starts: Tensor, weight: Tensor) -> Tensor:
    """Per feature f, sum over f's entries e of weight[e] * rows[index[e]]: one embedding
    bag per feature, without materialising an entries x d tensor."""
    return F.embedding_bag(index[order], rows, starts, mode="sum", per_sample_weights=weight[order])


class GatheredLinear(torch.autograd.Function):
    """pi at the live entries, pi = (x - b_dec) W_enc + b_enc, whose values the dense
    forward matmul already computed; the backward touches only those entries.

    Column f of W_enc's gradient is the sum over f's entries of grad * (x - b_dec)[token];
    d pi / d b_dec = -W_enc, so b_dec's gradient is -W_enc @ grad_b (one matvec)."""

    @staticmethod
    def forward(ctx, x_centred, W_enc, b_enc, b_dec, tok, feat, order, starts, values):
        # W_enc, b_enc and b_dec are inputs only so that autograd routes their gradients here
        ctx.save_for_backward(x_centred, W_enc, tok, feat, order, starts)
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_centred, W_enc, tok, feat, order, starts = ctx.saved_tensors
        grad_W = _bag_sum(x_centred, tok, order, starts, grad)
        grad_b = grad.new_zeros(W_enc.shape[1]).index_add_(0, feat, grad)
        return None, grad_W.T, grad_b, -(W_enc @ grad_b), None, None, None, None, None


class LiveDecode(torch.autograd.Function):
    """sum over a token's entries of a W_dec[feature]: one embedding bag per token.

    Row f of W_dec's gradient is the sum over f's entries of a * grad[token] (bags per
    feature); a's gradient is <grad[token], W_dec[feature]> per entry."""

    @staticmethod
    def forward(ctx, W_dec, act, tok, feat, offsets, order, starts):
        ctx.save_for_backward(W_dec, act, tok, feat, offsets, order, starts)
        return F.embedding_bag(feat, W_dec, offsets, mode="sum", per_sample_weights=act)

    @staticmethod
    def backward(ctx, grad: Tensor):
        W_dec, act, tok, feat, offsets, order, starts = ctx.saved_tensors
        grad = grad.contiguous()
        grad_W = _bag_sum(grad, tok, order, starts, act)
        grad_act = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad, W_dec, feat, offsets, tok, 0
        )
        return grad_W, grad_act, None, None, None, None, None


def live_entries(mask: Tensor, capacity: int | None):
    """(token, feature) of every True in ``mask``, row-major. With a capacity (GPU): padded
    to that many entries, with a 0/1 validity and the count of entries that did not fit,
    all without a host sync."""
    if capacity is None:
        tok, feat = mask.nonzero(as_tuple=True)
        return tok, feat, None, None
    found = torch.nonzero_static(mask, size=capacity, fill_value=-1)
    valid = found[:, 0] >= 0
    # padding points at the last token's last feature so the token order stays sorted
    tok = torch.where(valid, found[:, 0], mask.shape[0] - 1)
    feat = torch.where(valid, found[:, 1], mask.shape[1] - 1)
    return tok, feat, valid, (mask.sum() - capacity).clamp(min=0)


def encode_live(model: HSAE, x: Tensor, level: int, capacity: int | None = None) -> Live:
    """The level's live entries for a (scaled) batch x."""
    W, b, theta = model.W_enc[level], model.b_enc[level], model.threshold[level]
    x_centred = x - model.b_dec[level].detach()
    with torch.no_grad():  # pi - b_enc, compared with theta - b_enc: one pass less over [B, n]
        pre_all = x_centred @ W
        eps = model.eps(level)
        mask = pre_all > theta - b - eps / 2
    tok, feat, valid, dropped = live_entries(mask, capacity)
    values = pre_all.view(-1).index_select(0, tok * W.shape[1] + feat).float() + b[feat]
    order, starts = feature_major(feat, W.shape[1])
    pre = GatheredLinear.apply(
        x_centred, W, b, model.b_dec[level], tok, feat, order, starts, values
    )
    if valid is not None:  # padded entries: pushed far below theta, so they stay silent
        pre = torch.where(valid, pre, pre.detach() - 1e4)
    if isinstance(eps, Tensor):
        eps = eps.index_select(0, feat)
    act = JumpReLU.apply(pre, theta.index_select(0, feat), eps)
    counts = _counts(tok, x.shape[0])
    offsets = counts.cumsum(0) - counts
    return Live(
        tok, feat, pre, act, eps, offsets, order, starts, valid, dropped, x.shape[0], W.shape[1]
    )


def decode_live(model: HSAE, live: Live, level: int) -> Tensor:
    """SAE_l(x) = b_dec,l + sum over live entries of a W_dec,l[feature]."""
    out = LiveDecode.apply(
        model.W_dec[level], live.act, live.tok, live.feat, live.offsets, live.order, live.starts
    )
    return out + model.b_dec[level]


# ---------------------------------------------------------------- selections


def _keep(mask: Tensor, weight: Tensor, *index: Tensor, compact: bool) -> tuple[Tensor, ...]:
    """The entries where ``mask`` holds: gathered when ``compact``; otherwise (sync-free,
    GPU) all entries stay, weighted by the mask: the same sums, no data-dependent size."""
    if compact:
        where = mask.nonzero().squeeze(1)
        return (weight[where], *(t[where] for t in index))
    return (weight * mask, *index)


def _rows_sum(tok: Tensor, feat: Tensor, weight: Tensor, W: Tensor, batch: int) -> Tensor:
    """sum over entries of weight * W[feat], per token: [batch, d]."""
    rows = W.index_select(0, feat) * weight.unsqueeze(1)
    return rows.new_zeros(batch, W.shape[1]).index_add_(0, tok, rows)


def substitution_delta(
    model: HSAE, cur: Live, nxt: Live, level: int, parent_next: Tensor, m: Tensor
) -> Tensor:
    """SAE~_l - SAE_l (section 3.2): substituted parents out, their children in."""
    parent = parent_next.clamp(min=0)
    taken = m[parent[nxt.feat]] & (parent_next[nxt.feat] >= 0)
    compact = cur.valid is None
    w_out, tok_out, feat_out = _keep(m[cur.feat], cur.act, cur.tok, cur.feat, compact=compact)
    w_in, tok_in, feat_in = _keep(taken, nxt.act, nxt.tok, nxt.feat, compact=compact)
    removed = _rows_sum(tok_out, feat_out, w_out, model.W_dec[level], cur.batch)
    added = _rows_sum(tok_in, feat_in, w_in, model.W_dec[level + 1], cur.batch)
    return added - removed


# ---------------------------------------------------------------- constraint loss


def pc_loss_live(
    p: Live, c: Live, dec_p: Tensor, dec_c: Tensor, parent: Tensor, free_norms: bool = False
) -> Tensor:
    """Mean over tokens of sum_i L_PC,(l,i) (section 3.1) from live entries.

    With unit decoder rows (see :func:`hsae.method.model.pc_loss`),
        ||a_p d_p - sum_j a_j d_j||^2 = a_p^2 - 2 a_p sum_j a_j <d_p, d_j> + ||sum_j a_j d_j||^2.
    The last term, per (token, parent) group of live children, is sum_j a_j^2 plus, for
    groups of two or more, ||sum_j a_j d_j||^2 - sum_j a_j^2: only those need rows of d.
    The gradients then equal the dense formula's up to a radial part in each decoder row,
    which training drops anyway (HSAE.project_decoder_grads). With free_norms (rows of
    any norm) a^2 becomes a^2 ||d||^2 in each place and the gradients are exact."""
    linked = parent >= 0
    weight = has_children(parent, p.n).to(p.act.dtype)
    if free_norms:
        weight = weight * dec_p.pow(2).sum(-1)
    parent_term = (p.act.pow(2) * weight[p.feat]).sum()
    par = parent.clamp(min=0)[c.feat]
    a_c = c.act * linked[c.feat]
    # (token, parent) of each child entry; an unlinked child's entry gets a key of its own
    # (negative), so that it never joins a sibling group: grouping them all under parent 0
    # made a run without links cost entries x d work per step
    own = -1 - torch.arange(c.feat.numel(), device=c.feat.device)
    key = torch.where(linked[c.feat], c.tok * p.n + par, own)
    a_par = _lookup(p.tok * p.n + p.feat, p.act, key)
    cos = (dec_p.index_select(0, parent.clamp(min=0)) * dec_c).sum(-1)
    cross = (a_c * a_par * cos.index_select(0, c.feat)).sum()
    own = a_c.pow(2)
    if free_norms:
        own = own * dec_c.pow(2).sum(-1).index_select(0, c.feat)
    shared = _shared_groups(key, a_c, c.feat, dec_c, c.valid is None, free_norms)
    siblings = own.sum() + shared
    return (parent_term - 2 * cross + siblings) / p.batch


def support_loss_live(p: Live, c: Live, parent: Tensor, theta_c: Tensor) -> Tensor:
    """L_S for one pair of levels (:func:`hsae.method.losses.support_loss`) from live
    entries: every child entry whose step or window is nonzero is live."""
    linked = parent >= 0
    key = c.tok * p.n + parent.clamp(min=0)[c.feat]
    parent_fires = _lookup(p.tok * p.n + p.feat, (p.act > 0).to(c.pre.dtype), key)
    silent = linked[c.feat] & (parent_fires == 0)
    if c.valid is not None:
        silent = silent & c.valid
    step = SupportStep.apply(c.pre, theta_c.index_select(0, c.feat), c.eps)
    return (step * silent).sum() / c.batch


def _lookup(keys: Tensor, values: Tensor, queries: Tensor) -> Tensor:
    """values[i] where keys[i] == query, else 0; keys ascending (entries are row-major)."""
    if keys.numel() == 0:
        return values.new_zeros(queries.shape)
    pos = torch.searchsorted(keys, queries).clamp(max=keys.numel() - 1)
    return values.index_select(0, pos) * (keys.index_select(0, pos) == queries)


def _shared_groups(
    key: Tensor, a: Tensor, feat: Tensor, dec: Tensor, compact: bool, free_norms: bool = False
) -> Tensor:
    """sum over groups of equal key with two or more entries of ||sum a d||^2 - sum a^2
    (sum a^2 ||d||^2 with free_norms)."""
    order = torch.argsort(key, stable=True)
    key = key.index_select(0, order)
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    group = first.cumsum(0) - 1
    size = torch.zeros_like(key).index_add_(0, group, torch.ones_like(key))
    a, feat, group = _keep(
        size.index_select(0, group) > 1,
        a.index_select(0, order), feat.index_select(0, order), group, compact=compact,
    )  # fmt: skip
    n_groups = key.numel()  # sync-free: as many rows as entries
    if compact:  # renumber the groups left 0, 1, ...; none left: no (entries x d) buffer
        group = torch.unique_consecutive(group, return_inverse=True)[1]
        n_groups = int(group[-1]) + 1 if group.numel() else 0
    rows = dec.index_select(0, feat) * a.unsqueeze(1)
    sums = rows.new_zeros(n_groups, dec.shape[1]).index_add_(0, group, rows)
    own = rows.pow(2).sum() if free_norms else a.pow(2).sum()
    return sums.pow(2).sum() - own


# ---------------------------------------------------------------- the whole loss


def capacity_for(batch: int, n: int, target_l0: float) -> int:
    """Live entries kept per level on a GPU: room for 4x the target L0, plus 64.

    Thresholds start at the target L0 and the window below them added about 10 % more
    entries on the CPU benchmark, so this leaves wide room. GPU memory grows with it: the
    sibling sums of the constraint loss hold a (capacity x d) buffer per level pair, about
    2.5 GB at the paper's sizes (batch 1024, L0 50, d 2304)."""
    return batch * min(n, int(4 * target_l0) + 64)


def hsae_loss_live(model: HSAE, x: Tensor, inp: LossInputs) -> LossOutput:
    """L_HSAE on one batch (as :func:`hsae.method.losses.hsae_loss_dense`), over live entries, in
    lists of ``inp.capacity`` entries per level when given (GPU, no sync)."""
    caps = inp.capacity or [None] * model.n_levels
    lives = [encode_live(model, x, level, caps[level]) for level in range(model.n_levels)]
    total_var = (x - x.mean(0)).pow(2).sum(-1).mean()
    total, l0s, fves, mses, pcs = x.new_zeros(()), [], [], [], []
    sparsity, ghost = x.new_zeros(()), x.new_zeros(())
    for level, live in enumerate(lives):
        recon = decode_live(model, live, level)
        mse = (recon - x).pow(2).sum(-1)
        fves.append(1 - mse.mean().detach() / total_var)  # of the unperturbed reconstruction
        m = inp.substitution[level] if level < model.n_levels - 1 else None
        if m is not None:
            delta = substitution_delta(model, live, lives[level + 1], level, inp.parents[level], m)
            recon = recon + delta
            mse = (recon - x).pow(2).sum(-1)
        theta = model.threshold[level]
        theta_e = theta.index_select(0, live.feat)
        step = Step.apply(live.pre, theta_e, live.eps)
        l0 = step.sum() / x.shape[0]
        l0_row = None
        if inp.l0_targets is not None:  # the quadratic loss prices each row's L0
            l0_row = x.new_zeros(x.shape[0]).index_add(0, live.tok, step)
        term = sparsity_term(l0, l0_row, inp, level)
        sparsity = sparsity + term
        total = total + mse.mean() + term
        if inp.dead is not None:
            g = _ghost(model, x, recon, level, inp.dead[level], mse, live.valid is None)
            ghost, total = ghost + g.detach(), total + g
        l0s.append(l0.detach())
        mses.append(mse.mean().detach())
    if inp.rho > 0:
        W = model.W_dec
        for level, parent in enumerate(inp.parents):
            pc = pc_loss_live(lives[level], lives[level + 1], W[level], W[level + 1], parent,
                              model.free_norms)  # fmt: skip
            total = total + inp.rho * pc
            pcs.append(pc.detach())
    support = support_term(inp, lambda level, parent: support_loss_live(
        lives[level], lives[level + 1], parent, model.threshold[level + 1]
    ), x.new_zeros(()))  # fmt: skip
    total = total + support
    pc_sum = torch.stack(pcs).sum() if pcs else x.new_zeros(())
    dropped = [live.dropped for live in lives if live.dropped is not None]
    return LossOutput(
        total, torch.stack(l0s), torch.stack(fves), torch.stack(mses), pc_sum,
        fired=[live.fired() for live in lives],
        dense_acts=lambda: [live.dense().detach() for live in lives],
        dropped=torch.stack(dropped).sum() if dropped else None,
        sparsity=sparsity.detach(), ghost=ghost, support=support.detach(),
    )  # fmt: skip


def _ghost(
    model: HSAE, x: Tensor, recon: Tensor, level: int, dead: Tensor, mse: Tensor, compact: bool
) -> Tensor:
    """Ghost grads on the dead columns only, their pi recomputed with gradients (compact);
    sync-free, every column with the live ones masked out."""
    if compact:
        idx = dead.nonzero().squeeze(1)
        if idx.numel() == 0:
            return x.new_zeros(())
        pre = model.ghost_pre_acts(x, level, idx)
        return ghost_grad_loss(pre, x - recon, model.W_dec[level][idx], mse)
    pre = model.ghost_pre_acts(x, level).masked_fill(~dead, -torch.inf)  # exp(-inf) = 0: no sync
    return ghost_grad_loss(pre, x - recon, model.W_dec[level], mse) * dead.any()
