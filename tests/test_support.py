"""The support constraint L_S (hsae/method/losses.py): its straight-through step against
finite differences, its value on a hand-built case, its weight in the loss, and a
training run in which it really blocks a child from firing outside its parent."""

from __future__ import annotations

import math

import pytest
import torch

from hsae.config import HSAEConfig
from hsae.method.jumprelu import SupportStep
from hsae.method.losses import LossInputs, hsae_loss_dense, support_loss
from hsae.method.model import HSAE

torch.set_num_threads(1)


def test_support_step_moves_pi_and_theta_as_finite_differences_do() -> None:
    """d/dtheta mean H(pi - theta) = -p(theta) and d/dpi = +p(theta) for N(0, 1) pi: the
    window gives both, against the normal density and a central difference."""
    eps, theta0, n = 0.1, 0.5, 400_000
    pre = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pre.requires_grad_()
    theta = torch.tensor([theta0], dtype=torch.float64, requires_grad=True)
    SupportStep.apply(pre, theta, eps).mean().backward()
    shift_grad = pre.grad.sum()  # moving every pi by the same delta
    pdf = math.exp(-0.5 * theta0**2) / math.sqrt(2 * math.pi)
    h = 0.02
    fd = (pre.detach() > theta0 - h).double().mean() - (pre.detach() > theta0 + h).double().mean()
    fd = fd / (2 * h)
    tol = 4 / math.sqrt(n * pdf * eps) * pdf + 4 / math.sqrt(n * pdf * 2 * h) * pdf
    assert shift_grad.item() == pytest.approx(-theta.grad.item(), rel=1e-12)
    assert abs(shift_grad.item() - pdf) < 4 / math.sqrt(n * pdf * eps) * pdf
    assert abs(shift_grad.item() - fd.item()) < tol


def test_support_loss_counts_children_firing_where_their_parent_is_silent() -> None:
    # 3 tokens; parents 0, 1 in the coarse level; children 0 -> 0, 1 -> 0, 2 -> 1, 3 unlinked
    a_p = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    parent = torch.tensor([0, 0, 1, -1])
    pre = torch.tensor(
        [
            [1.0, 0.0, 1.0, 1.0],  # parent 0 fires: child 2 (parent 1 silent) counts
            [1.0, 1.0, 1.0, 1.0],  # parent 1 fires: children 0 and 1 count
            [1.0, 0.0, 0.0, 1.0],  # no parent fires: child 0 counts, 3 is unlinked
        ]
    )
    theta = torch.full((4,), 0.5)
    assert support_loss(pre, theta, a_p, parent, eps=0.1).item() == pytest.approx(4 / 3)
    assert support_loss(pre, theta, a_p, torch.full((4,), -1), eps=0.1).item() == 0.0


def _two_levels() -> HSAE:
    model = HSAE(6, (4, 8), bandwidth=0.5, seed=1)
    with torch.no_grad():
        for theta in model.threshold:
            theta.fill_(0.3)
    return model


def test_the_support_term_is_s_times_the_child_levels_lambda_times_l_s() -> None:
    model = _two_levels()
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    parent = torch.tensor([0, 1, 2, 3, 0, 1, -1, -1])
    lambdas = torch.tensor([0.2, 0.3])
    off = LossInputs([parent], lambdas, 0.0, [None], dense=True)
    on = LossInputs([parent], lambdas, 0.0, [None], dense=True, support=2.5)
    acts = model.encode(x)
    l_s = support_loss(model.pre_acts(x, 1), model.threshold[1], acts[0], parent, 0.5)
    assert l_s.item() > 0  # the case exercises the term
    gap = hsae_loss_dense(model, x, on).total - hsae_loss_dense(model, x, off).total
    assert gap.item() == pytest.approx(2.5 * 0.3 * l_s.item(), rel=1e-5)
    assert hsae_loss_dense(model, x, on).support.item() == pytest.approx(gap.item(), rel=1e-5)


def _child_outside_its_parent(support: float) -> tuple[float, float]:
    """Train a linked child on tokens P + C (its parent P fires) and C alone (it does not);
    the parent level and the decoder biases are held fixed. The share of each kind of
    token the child fires on at the end."""
    torch.manual_seed(0)
    P, C, Q = torch.eye(3)
    inside = torch.arange(256) < 128
    x = torch.where(inside[:, None], P + C, C) + 0.02 * torch.randn(256, 3)
    model = HSAE(3, (1, 2), bandwidth=1.0)
    with torch.no_grad():
        model.W_dec[0].copy_(P[None])
        model.W_enc[0].copy_(P[:, None])
        model.threshold[0].fill_(0.5)
        model.W_dec[1].copy_(torch.stack([C, Q]))
        model.W_enc[1].copy_(model.W_dec[1].T)
        model.threshold[1].fill_(0.6)
        for b in model.b_dec:
            b.zero_()
    fixed = {id(p) for p in (*model.b_dec, model.W_dec[0], model.W_enc[0], model.b_enc[0])}
    fixed.add(id(model.threshold[0]))
    opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in fixed], lr=3e-3)
    inp = LossInputs(
        [torch.tensor([0, -1])], torch.tensor([0.1, 0.1]), 0.0, [None], dense=True,
        support=support,
    )  # fmt: skip
    for _ in range(400):
        opt.zero_grad()
        hsae_loss_dense(model, x, inp).total.backward()
        model.project_decoder_grads()
        opt.step()
        model.apply_constraints()
    with torch.no_grad():
        fires = model.encode(x)[1][:, 0] > 0
    return fires[inside].float().mean().item(), fires[~inside].float().mean().item()


def test_the_support_constraint_blocks_a_child_outside_its_parent() -> None:
    """Without L_S the child fires on C wherever it appears; with it the encoder learns to
    fire only with the parent's context: the gate closes outside and stays open inside."""
    inside, outside = _child_outside_its_parent(support=0.0)
    assert inside > 0.95 and outside > 0.8
    inside, outside = _child_outside_its_parent(support=4.0)
    assert inside > 0.95 and outside < 0.02


def test_the_post_hoc_baseline_trains_without_our_additions() -> None:
    """HSAEConfig.baseline() is the paper's post-hoc baseline whatever the flags: no L_S,
    no annealed L0 target."""
    cfg = HSAEConfig(sizes=(8, 16), target_l0=2.0, support=2.0, l0_start=3.0).baseline()
    assert (cfg.support, cfg.l0_start_multiple, cfg.rho, cfg.link_rule) == (
        0.0, 1.0, 0.0, "encoder",
    )  # fmt: skip
