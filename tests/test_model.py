"""The model: STE gradients, the PC loss, perturbation, the full loss, ghost grads, init.

Every check compares the library with an independent expectation: finite differences,
the normal density, the naive (dense) formula of the paper, or a hand computation.
"""

from __future__ import annotations

import math

import pytest
import torch

from hsae.method.jumprelu import JumpReLU, Step
from hsae.method.losses import (
    LossInputs,
    draw_substitution,
    ghost_grad_loss,
    pc_loss,
    pc_loss_naive,
    perturbed_reconstruction,
)
from hsae.method.model import HSAE, THRESHOLD_FLOOR, upper_quantile

torch.set_num_threads(1)


def _normal_pdf(t: float) -> float:
    return math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


def _unit(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True)


# ----- straight-through estimators -------------------------------------------------------

N_STE = 1_000_000
EPS = 0.1  # rectangle bandwidth; pre-activations are N(0, 1)
THETAS = torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=torch.float64)


@pytest.fixture(scope="module")
def normal_pre() -> torch.Tensor:
    """[N, 4]: the same 1e6 standard normal pre-activations against each of 4 thresholds."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(N_STE, 1, generator=gen, dtype=torch.float64).expand(-1, len(THETAS))


def _ste_grad(fn, pre: torch.Tensor) -> torch.Tensor:
    theta = THETAS.clone().requires_grad_()
    fn.apply(pre, theta, EPS).mean(0).sum().backward()
    return theta.grad


def _count_tol(expected_density: torch.Tensor, width: float) -> torch.Tensor:
    """4 sigma relative tolerance of a density estimated from the count in a window."""
    return 4.0 / (N_STE * expected_density * width).sqrt()


def test_step_ste_matches_finite_difference_and_normal_density(normal_pre) -> None:
    """d/dtheta mean H(pi - theta) = -p(theta): STE, finite differences and the pdf agree."""
    ste = _ste_grad(Step, normal_pre)

    def mean_step(theta: torch.Tensor) -> torch.Tensor:
        return (normal_pre > theta).to(torch.float64).mean(0)

    # With h = eps/2 the central difference counts the same window as the rectangle kernel,
    # so the two agree up to samples lying exactly on the window's edge (allow 2 samples).
    h = EPS / 2
    fd_same = (mean_step(THETAS + h) - mean_step(THETAS - h)) / (2 * h)
    assert torch.allclose(ste, fd_same, rtol=0, atol=2 / (N_STE * EPS))

    # An independent, narrower difference and the analytic value -phi(theta): both are
    # counts in a window, so the tolerance is 4 sigma of a Poisson count (bias O(h^2) is
    # far below it).
    h = 0.02
    fd = (mean_step(THETAS + h) - mean_step(THETAS - h)) / (2 * h)
    pdf = torch.tensor([_normal_pdf(t) for t in THETAS.tolist()], dtype=torch.float64)
    assert torch.all((ste + pdf).abs() <= _count_tol(pdf, EPS) * pdf), (ste, -pdf)
    assert torch.all((fd + pdf).abs() <= _count_tol(pdf, 2 * h) * pdf), (fd, -pdf)
    tol = _count_tol(pdf, EPS) + _count_tol(pdf, 2 * h)
    assert torch.all((ste - fd).abs() <= tol * pdf), (ste, fd)


def test_jumprelu_ste_matches_finite_difference_and_normal_density(normal_pre) -> None:
    """d/dtheta mean pi H(pi - theta) = -theta p(theta)."""
    ste = _ste_grad(JumpReLU, normal_pre)

    def mean_jump(theta: torch.Tensor) -> torch.Tensor:
        return (normal_pre * (normal_pre > theta)).mean(0)

    expected = -THETAS * torch.tensor(
        [_normal_pdf(t) for t in THETAS.tolist()], dtype=torch.float64
    )
    assert ste[0] == 0.0  # theta = 0: -theta p(theta) = 0 exactly
    nz = slice(1, None)
    pdf = -expected[nz] / THETAS[nz]

    # Same window (h = eps/2): they differ only by the mean of (pi - theta) over the window
    # divided by theta: for a normal density a bias of eps^2/12 (relative) plus noise of
    # sd eps / (theta sqrt(12 count)); allow the bias plus 4 sd.
    h = EPS / 2
    fd_same = (mean_jump(THETAS + h) - mean_jump(THETAS - h)) / (2 * h)
    count = N_STE * pdf * EPS
    tol = EPS**2 / 12 + 4 * EPS / (THETAS[nz] * (12 * count).sqrt())
    assert torch.all((ste[nz] - fd_same[nz]).abs() <= tol * fd_same[nz].abs()), (ste, fd_same)

    h = 0.02
    fd = (mean_jump(THETAS + h) - mean_jump(THETAS - h)) / (2 * h)
    ex = expected[nz]
    assert torch.all((ste[nz] - ex).abs() <= _count_tol(pdf, EPS) * ex.abs()), (ste, expected)
    assert torch.all((fd[nz] - ex).abs() <= _count_tol(pdf, 2 * h) * ex.abs()), (fd, expected)


def test_jumprelu_gradient_wrt_pre_is_the_step() -> None:
    """Away from the threshold d a / d pi = H(pi - theta): by autograd and by differences."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.tensor([0.2, 0.5, 1.0, 0.05], dtype=torch.float64)
    pre = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    pre = torch.where((pre - theta).abs() < 0.1, pre + 0.3, pre)  # keep clear of theta
    assert ((pre - theta).abs() >= 0.1).all()
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    above = (pre > theta).to(torch.float64)
    assert 0 < above.sum() < above.numel()

    p = pre.clone().requires_grad_()
    (JumpReLU.apply(p, theta, EPS) * w).sum().backward()
    assert torch.equal(p.grad, w * above)

    def f(x: torch.Tensor) -> float:
        return float((JumpReLU.apply(x, theta, EPS) * w).sum())

    h = 1e-5
    fd = torch.zeros_like(pre)
    for idx in torch.cartesian_prod(torch.arange(6), torch.arange(4)).tolist():
        e = torch.zeros_like(pre)
        e[tuple(idx)] = h
        fd[tuple(idx)] = (f(pre + e) - f(pre - e)) / (2 * h)
    assert torch.allclose(fd, w * above, atol=1e-8)

    # The L0 step has no gradient w.r.t. pi (its true derivative is 0 away from theta).
    p = pre.clone().requires_grad_()
    Step.apply(p, theta, EPS).sum().backward()
    assert torch.equal(p.grad, torch.zeros_like(pre))


# ----- parent-child constraint loss ------------------------------------------------------


def _pc_case(seed: int, dtype=torch.float64, B: int = 7, n_p: int = 6, n_c: int = 15, d: int = 8):
    """Sparse non-negative activations, unit decoder rows, parents with -1s, one parent with
    many children and some parents with none."""
    gen = torch.Generator().manual_seed(seed)
    a_p = torch.rand(B, n_p, generator=gen, dtype=dtype) * (torch.rand(B, n_p, generator=gen) < 0.6)
    a_c = torch.rand(B, n_c, generator=gen, dtype=dtype) * (torch.rand(B, n_c, generator=gen) < 0.5)
    dec_p = _unit(torch.randn(n_p, d, generator=gen, dtype=dtype))
    dec_c = _unit(torch.randn(n_c, d, generator=gen, dtype=dtype))
    parent = torch.randint(-1, n_p - 2, (n_c,), generator=gen)  # parents n_p-2, n_p-1: none
    parent[:6] = 0  # parent 0 has many children
    parent[6] = -1
    return a_p, a_c, dec_p, dec_c, parent


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pc_loss_equals_naive(seed: int, dtype) -> None:
    a_p, a_c, dec_p, dec_c, parent = _pc_case(seed, dtype)
    fast = pc_loss(a_p, a_c, dec_p, dec_c, parent)
    naive = pc_loss_naive(a_p, a_c, dec_p, dec_c, parent)
    assert naive > 0
    assert torch.allclose(fast, naive, rtol=1e-5, atol=0), (fast, naive)


def test_pc_loss_naive_matches_a_hand_computation() -> None:
    """The reference itself: one token, parent 0 with children 0 and 1, parent 1 childless."""
    a_p = torch.tensor([[2.0, 5.0]])
    a_c = torch.tensor([[1.0, 3.0, 7.0]])
    dec_p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    dec_c = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    parent = torch.tensor([0, 0, -1])
    # f_p0 = (2, 0); children sum = 1*(0,1) + 3*(1,0) = (3, 1); ||(2,0)-(3,1)||^2 = 2.
    for fn in (pc_loss, pc_loss_naive):
        assert fn(a_p, a_c, dec_p, dec_c, parent).item() == pytest.approx(2.0, rel=1e-6)


def test_pc_loss_without_children_is_zero() -> None:
    a_p, a_c, dec_p, dec_c, parent = _pc_case(5)
    none = torch.full_like(parent, -1)
    assert pc_loss(a_p, a_c, dec_p, dec_c, none).item() == 0.0
    assert pc_loss_naive(a_p, a_c, dec_p, dec_c, none).item() == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pc_loss_gradients_wrt_activations_equal_naive(seed: int) -> None:
    """All entries, including inactive children (a = 0): the JumpReLU STE passes dL/da at
    such entries on to theta when pi lies within eps/2 below theta, so they matter."""
    a_p, a_c, dec_p, dec_c, parent = _pc_case(seed)
    grads = []
    for fn in (pc_loss, pc_loss_naive):
        ap, ac = a_p.clone().requires_grad_(), a_c.clone().requires_grad_()
        grads.append(torch.autograd.grad(fn(ap, ac, dec_p, dec_c, parent), [ap, ac]))
    (gp_fast, gc_fast), (gp_naive, gc_naive) = grads
    assert torch.allclose(gp_fast, gp_naive, rtol=1e-9, atol=1e-12)
    active = a_c > 0
    assert torch.allclose(gc_fast[active], gc_naive[active], rtol=1e-9, atol=1e-12)
    diff = (gc_fast - gc_naive).abs()
    assert torch.allclose(gc_fast, gc_naive, rtol=1e-9, atol=1e-12), (
        "pc_loss's gradient w.r.t. inactive child activations differs from the naive loss "
        f"at {(diff > 1e-9).sum().item()} entries (max {diff.max().item():.3g})"
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pc_loss_threshold_gradient_with_live_window_equals_naive(seed: int) -> None:
    """Training passes live_c = pi > theta - eps/2: the entries whose threshold gets a
    straight-through gradient. The children's theta gradient then equals the naive one."""
    gen = torch.Generator().manual_seed(seed)
    B, n_p, n_c, d, eps = 64, 6, 15, 8, 0.2
    pre_p, pre_c = torch.randn(B, n_p, generator=gen), torch.randn(B, n_c, generator=gen)
    dec_p = _unit(torch.randn(n_p, d, generator=gen))
    dec_c = _unit(torch.randn(n_c, d, generator=gen))
    parent = torch.randint(-1, n_p, (n_c,), generator=gen)
    grads = []
    for naive in (False, True):
        theta_p = torch.full((n_p,), 0.5, requires_grad=True)
        theta_c = torch.full((n_c,), 0.5, requires_grad=True)
        a_p, a_c = JumpReLU.apply(pre_p, theta_p, eps), JumpReLU.apply(pre_c, theta_c, eps)
        if naive:
            loss = pc_loss_naive(a_p, a_c, dec_p, dec_c, parent)
        else:
            loss = pc_loss(a_p, a_c, dec_p, dec_c, parent, live_c=pre_c > theta_c - eps / 2)
        grads.append(torch.autograd.grad(loss, [theta_p, theta_c]))
    assert grads[1][1].abs().max() > 1e-3  # the window holds entries: not vacuous
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pc_loss_decoder_gradients_agree_after_radial_projection(seed: int) -> None:
    """The fast formula takes ||d_p|| = 1, so its parent-row gradient lacks exactly the radial
    term (2/B) sum_t a_p^2 d_p; `HSAE.project_decoder_grads` removes radial parts in training."""
    a_p, a_c, dec_p, dec_c, parent = _pc_case(seed)
    grads = []
    for fn in (pc_loss, pc_loss_naive):
        dp, dc = dec_p.clone().requires_grad_(), dec_c.clone().requires_grad_()
        grads.append(torch.autograd.grad(fn(a_p, a_c, dp, dc, parent), [dp, dc]))
    (gp_fast, gc_fast), (gp_naive, gc_naive) = grads

    # The statement used in training: after HSAE.project_decoder_grads they agree.
    model = HSAE(dec_p.shape[1], (dec_p.shape[0], dec_c.shape[0]), bandwidth=EPS)
    projected = []
    for gp, gc in ((gp_fast, gc_fast), (gp_naive, gc_naive)):
        with torch.no_grad():
            model.W_dec[0].copy_(dec_p)
            model.W_dec[1].copy_(dec_c)
        model.W_dec[0].grad = gp.float().clone()
        model.W_dec[1].grad = gc.float().clone()
        model.project_decoder_grads()
        projected.append((model.W_dec[0].grad.clone(), model.W_dec[1].grad.clone()))
    assert torch.allclose(projected[0][0], projected[1][0], atol=1e-5)
    assert torch.allclose(projected[0][1], projected[1][1], atol=1e-5)
    # and the projection really removed the radial part
    assert torch.allclose(
        (projected[0][0] * dec_p.float()).sum(-1), torch.zeros(len(dec_p)), atol=1e-5
    )

    # Child rows agree without projection; parent rows differ by the radial term only.
    assert torch.allclose(gc_fast, gc_naive, rtol=1e-9, atol=1e-12)
    has = torch.zeros(len(dec_p), dtype=torch.float64)
    has[parent[parent >= 0]] = 1.0
    radial = 2 * (a_p.pow(2).mean(0) * has).unsqueeze(1) * dec_p
    assert radial.abs().max() > 1e-3  # the test is not vacuous
    assert torch.allclose(gp_naive - gp_fast, radial, rtol=1e-9, atol=1e-12)


# ----- perturbation ----------------------------------------------------------------------


def test_draw_substitution_rate_and_support() -> None:
    n, rate, draws = 60, 0.05, 3000
    has = torch.zeros(n, dtype=torch.bool)
    has[::3] = True
    gen = torch.Generator().manual_seed(0)
    masks = torch.stack([draw_substitution(has, rate, gen) for _ in range(draws)])
    assert masks.shape == (draws, n)  # one Bernoulli per feature per step: shape [n] only
    assert not masks[:, ~has].any()  # never on a feature without children
    counts = masks[:, has].sum(0).double()
    k = int(has.sum())
    total, mean = counts.sum(), draws * k * rate
    assert abs(total - mean) <= 4 * math.sqrt(mean * (1 - rate))  # pooled, 4 sigma
    # every feature with children, separately (5 sigma)
    per = draws * rate
    assert ((counts - per).abs() <= 5 * math.sqrt(per * (1 - rate))).all()
    # consecutive draws are not all the same (the generator advances)
    assert (masks[1:] != masks[:-1]).any()


def _small_model(seed: int = 0, sizes=(5, 9), d: int = 6) -> HSAE:
    model = HSAE(d, sizes, bandwidth=0.05, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for level in range(len(sizes)):
            model.W_enc[level].add_(0.3 * torch.randn(model.W_enc[level].shape, generator=gen))
            model.b_enc[level].copy_(0.1 * torch.randn(sizes[level], generator=gen))
            model.b_dec[level].copy_(0.2 * torch.randn(d, generator=gen))
    return model


def _dense_perturbed(model, a, a_next, level, parent_next, m):
    """SAE~_l = b_dec,l + (a_l (1-m)) W_dec,l + (a_l+1 m[parent]) W_dec,l+1, term by term."""
    n_next = a_next.shape[1]
    m_parent = torch.tensor(
        [bool(m[parent_next[j]]) if parent_next[j] >= 0 else False for j in range(n_next)]
    )
    out = model.b_dec[level].expand(a.shape[0], -1).clone()
    for i in range(a.shape[1]):
        if not m[i]:
            out = out + a[:, i : i + 1] * model.W_dec[level][i]
    for j in range(n_next):
        if m_parent[j]:
            out = out + a_next[:, j : j + 1] * model.W_dec[level + 1][j]
    return out


def test_perturbed_reconstruction_equals_dense_formula() -> None:
    model = _small_model()
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, a_next = model.encode(x)
        recon = model.decode(a, 0)
        assert (a > 0).any() and (a_next > 0).any()
        parent_next = torch.tensor([0, 0, 2, -1, 2, 4, -1, 0, 1])
        m = torch.tensor([True, False, True, False, True])  # 4 has a child, 3 has none
        got = perturbed_reconstruction(model, recon, a, a_next, 0, parent_next, m)
        want = _dense_perturbed(model, a, a_next, 0, parent_next, m)
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(got, recon, atol=1e-3)  # the substitution did something

        # m all False: the unperturbed reconstruction
        none = torch.zeros(5, dtype=torch.bool)
        same = perturbed_reconstruction(model, recon, a, a_next, 0, parent_next, none)
        assert torch.equal(same, recon)
        assert torch.allclose(
            recon, _dense_perturbed(model, a, a_next, 0, parent_next, none), atol=1e-5
        )


def test_unassigned_children_are_never_substituted_in() -> None:
    """Children with parent -1 must not be added when parent 0 is substituted (-1 is not a
    valid index and must not wrap to 0 or to the last parent)."""
    model = _small_model(seed=1)
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, a_next = model.encode(x)
        a_next = a_next + 0.5  # every child active, so a wrong inclusion always shows
        recon = model.decode(a, 0)
        parent_next = torch.tensor([-1, 0, -1, 4, -1, -1, 0, -1, -1])
        for substituted in ([0], [4], [0, 4]):
            m = torch.zeros(5, dtype=torch.bool)
            m[substituted] = True
            got = perturbed_reconstruction(model, recon, a, a_next, 0, parent_next, m)
            kids = [j for j, p in enumerate(parent_next.tolist()) if p in substituted]
            want = recon - a[:, substituted] @ model.W_dec[0][substituted]
            want = want + a_next[:, kids] @ model.W_dec[1][kids]
            assert torch.allclose(got, want, atol=1e-5), substituted


# ----- the whole loss --------------------------------------------------------------------


def _hand_level(model: HSAE, x: torch.Tensor, level: int):
    W_enc, b_enc = model.W_enc[level], model.b_enc[level]
    W_dec, b_dec, theta = model.W_dec[level], model.b_dec[level], model.threshold[level]
    pre = (x - b_dec) @ W_enc + b_enc
    fire = pre > theta
    a = torch.where(fire, pre, torch.zeros_like(pre))
    return a, a @ W_dec + b_dec, fire.sum(-1).double().mean()


def test_hsae_loss_without_rho_or_substitution_is_sum_of_sae_losses() -> None:
    sizes = (5, 9, 14)
    model = _small_model(sizes=sizes)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(32, 6, generator=gen)
    lambdas = torch.tensor([0.3, 0.1, 0.02])
    parents = [
        torch.randint(-1, 5, (9,), generator=gen),
        torch.randint(-1, 9, (14,), generator=gen),
    ]
    with torch.no_grad():
        want, l0s, mses = 0.0, [], []
        for level in range(3):
            a, recon, l0 = _hand_level(model, x, level)
            assert torch.allclose(a, model.encode(x)[level])
            assert torch.allclose(recon, model.decode(model.encode(x)[level], level))
            mse = (recon - x).pow(2).sum(-1).double().mean()
            want += mse + lambdas[level].double() * l0
            l0s.append(l0)
            mses.append(mse)
    total_var = (x - x.mean(0)).pow(2).sum(-1).mean()
    for substitution in (
        [None, None],
        [torch.zeros(5, dtype=torch.bool), torch.zeros(9, dtype=torch.bool)],
    ):
        out = model(x, LossInputs(parents, lambdas, 0.0, substitution))
        assert out.total.item() == pytest.approx(float(want), rel=1e-5)
        assert torch.allclose(out.l0.double(), torch.stack(l0s))
        assert torch.allclose(out.mse.double(), torch.stack(mses), rtol=1e-5)
        assert torch.allclose(out.fve, 1 - out.mse / total_var, rtol=1e-5)
        assert out.pc.item() == 0.0


def test_hsae_loss_perturbs_with_the_mask_and_never_the_last_level() -> None:
    sizes = (5, 9)
    model = _small_model(sizes=sizes)
    x = torch.randn(24, 6, generator=torch.Generator().manual_seed(8))
    lambdas = torch.tensor([0.1, 0.1])
    parents = [torch.tensor([0, 0, 2, -1, 2, 4, -1, 0, 1])]
    m0 = torch.tensor([True, False, True, False, False])
    m_last = torch.ones(9, dtype=torch.bool)  # a mask for the last level must be ignored
    out = model(x, LossInputs(parents, lambdas, 0.0, [m0, m_last]))
    clean = model(x, LossInputs(parents, lambdas, 0.0, [None, None]))
    with torch.no_grad():
        a0, a1 = model.encode(x)
        want0 = _dense_perturbed(model, a0, a1, 0, parents[0], m0)
    assert out.mse[0].item() == pytest.approx((want0 - x).pow(2).sum(-1).mean().item(), rel=1e-5)
    assert out.mse[0].item() != pytest.approx(clean.mse[0].item(), rel=1e-3)
    assert out.mse[1].item() == clean.mse[1].item()
    # the FVE is always of the unperturbed reconstruction
    assert torch.allclose(out.fve, clean.fve)


def test_hsae_loss_adds_rho_times_the_naive_pc_loss() -> None:
    sizes = (5, 9, 14)
    model = _small_model(sizes=sizes)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(20, 6, generator=gen)
    parents = [
        torch.randint(-1, 5, (9,), generator=gen),
        torch.randint(-1, 9, (14,), generator=gen),
    ]
    lambdas = torch.tensor([0.1, 0.1, 0.1])
    none = [None, None]
    rho = 0.37
    base = model(x, LossInputs(parents, lambdas, 0.0, none)).total
    out = model(x, LossInputs(parents, lambdas, rho, none))
    with torch.no_grad():
        acts = model.encode(x)
        pc = sum(
            pc_loss_naive(acts[k], acts[k + 1], model.W_dec[k], model.W_dec[k + 1], parents[k])
            for k in range(2)
        )
    assert pc > 0
    assert (out.total - base).item() == pytest.approx(rho * pc.item(), rel=1e-4)
    assert out.pc.item() == pytest.approx(pc.item(), rel=1e-5)


# ----- ghost grads -----------------------------------------------------------------------


def _ghost_setup():
    model = _small_model(seed=2, sizes=(8, 12))
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(11))
    pre = model.pre_acts(x, 0)
    a = model.activate(pre, 0)
    recon = model.decode(a, 0)
    mse = (recon - x).pow(2).sum(-1)
    return model, x, pre, recon, mse


@pytest.mark.parametrize("dense", [False, True])
def test_ghost_grads_add_nothing_without_dead_features(dense: bool) -> None:
    model, x, pre, recon, mse = _ghost_setup()
    dead = torch.zeros(8, dtype=torch.bool)
    lambdas = torch.tensor([0.1, 0.1])
    parents = [torch.full((12,), -1)]
    none_dead = [dead, torch.zeros(12, dtype=torch.bool)]
    with_dead = model(x, LossInputs(parents, lambdas, 0.0, [None], none_dead, dense))
    without = model(x, LossInputs(parents, lambdas, 0.0, [None], None, dense))
    assert with_dead.total.item() == without.total.item()


def test_ghost_grad_loss_reaches_only_dead_encoder_columns() -> None:
    model, x, pre, recon, mse = _ghost_setup()
    dead = torch.zeros(8, dtype=torch.bool)
    dead[[1, 4, 6]] = True
    loss = ghost_grad_loss(pre[:, dead], x - recon, model.W_dec[0][dead], mse)
    # Rescaled to the level's own MSE (Jermyn & Templeton): per token ghost_mse * mse/ghost_mse.
    assert loss.item() == pytest.approx(mse.mean().item(), rel=1e-4)
    loss.backward()
    g = model.W_enc[0].grad
    assert torch.equal(g[:, ~dead], torch.zeros_like(g[:, ~dead]))
    assert (g[:, dead].norm(dim=0) > 1e-6).all()


@pytest.mark.parametrize("dense", [False, True])
def test_hsae_loss_ghost_grads_revive_dead_encoders(dense: bool) -> None:
    """Features that never fire (theta far above pi, outside the STE window) get no encoder
    gradient from the plain loss and a nonzero one once marked dead; every other parameter,
    the shared b_dec included, gets exactly the plain loss's gradient."""
    model = _small_model(seed=3, sizes=(8, 12))
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        model.threshold[0][[2, 5]] = 1e3
    lambdas = torch.tensor([0.1, 0.1])
    parents = [torch.full((12,), -1)]
    dead0 = torch.zeros(8, dtype=torch.bool)
    dead0[[2, 5]] = True
    grads = []
    for dead in (None, [dead0, torch.zeros(12, dtype=torch.bool)]):
        model.zero_grad(set_to_none=True)
        model(x, LossInputs(parents, lambdas, 0.0, [None], dead, dense)).total.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    plain, ghost = grads
    assert torch.equal(plain["W_enc.0"][:, [2, 5]], torch.zeros(6, 2))
    assert (ghost["W_enc.0"][:, [2, 5]].norm(dim=0) > 1e-6).all()
    live = ~dead0
    assert torch.allclose(plain["W_enc.0"][:, live], ghost["W_enc.0"][:, live])
    assert torch.allclose(plain["b_enc.0"][live], ghost["b_enc.0"][live])
    assert torch.allclose(plain["W_dec.0"][live], ghost["W_dec.0"][live])
    assert torch.allclose(plain["b_dec.0"], ghost["b_dec.0"], atol=1e-7)


# ----- initialisation and constraints ----------------------------------------------------


def test_init_from_data_hits_target_l0_per_level() -> None:
    d, target = 16, 4.0
    gen = torch.Generator().manual_seed(5)
    mix = torch.randn(d, d, generator=gen) / math.sqrt(d)
    x = torch.randn(8000, d, generator=gen) @ mix + 0.7
    model = HSAE(d, (32, 64), bandwidth=0.05, seed=1)
    model.init_from_data(x, target)
    for level in range(2):
        assert torch.allclose(model.b_dec[level], x.mean(0))
        pre = model.pre_acts(x, level)
        assert (model.threshold[level] > model.bandwidth / 2).all()  # not merely the clamp
        l0 = (pre > model.threshold[level]).sum(-1).float().mean().item()
        assert l0 == pytest.approx(target, rel=0.03), (level, l0)
        # each feature starts at the firing rate target / n_l
        rate = (pre > model.threshold[level]).float().mean(0)
        assert torch.allclose(rate, torch.full_like(rate, target / model.sizes[level]), atol=2e-3)
        # and the same holds on a fresh sample from the same distribution (4 sigma)
        fresh = torch.randn(8000, d, generator=gen) @ mix + 0.7
        l0_fresh = (model.pre_acts(fresh, level) > model.threshold[level]).sum(-1).float()
        assert abs(l0_fresh.mean().item() - target) <= 4 * l0_fresh.std().item() / math.sqrt(8000)


def test_apply_constraints_unit_rows_positive_thresholds() -> None:
    model = _small_model(sizes=(5, 9))
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for level in range(2):
            model.W_dec[level].mul_(torch.rand(model.sizes[level], 1, generator=gen) * 3 + 0.1)
            model.threshold[level].copy_(torch.randn(model.sizes[level], generator=gen))
    before = [w.detach().clone() for w in model.W_dec]
    theta_before = [t.detach().clone() for t in model.threshold]
    model.apply_constraints()
    for level in range(2):
        w = model.W_dec[level]
        assert torch.allclose(w.norm(dim=-1), torch.ones(model.sizes[level]), atol=1e-6)
        assert torch.allclose(w, _unit(before[level]), atol=1e-6)  # directions kept
        t, tb = model.threshold[level], theta_before[level]
        assert (t > 0).all()
        assert torch.equal(t[tb > THRESHOLD_FLOOR], tb[tb > THRESHOLD_FLOOR])
        assert (t[tb <= THRESHOLD_FLOOR] == THRESHOLD_FLOOR).all()


@pytest.mark.parametrize(
    ("rows", "cols", "q"),
    [
        (4096, 64, 1 - 12 / 64),
        (1000, 7, 0.3),
        (513, 3, 0.999),
        (5, 2, 1.0),
        (5, 2, 0.0),
        (1, 3, 0.5),
    ],
)
def test_upper_quantile_is_torch_quantile_bit_for_bit(rows: int, cols: int, q: float) -> None:
    """init_from_data's thresholds must not move: runs (and the paper's figures) stay the
    same whichever computes them. A third of the entries are rounded to make ties."""
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols))
    x[: rows // 3] = torch.round(x[: rows // 3] * 4) / 4
    assert torch.equal(upper_quantile(x, q), torch.quantile(x, q, dim=0))


def test_fold_decoder_norms_keeps_every_output_and_gives_unit_rows() -> None:
    """Free decoder norms folded into the encoder: pre-activations grow by the row's norm,
    so the same latents fire and a_i d_i, every reconstruction, is unchanged."""
    model = _small_model(sizes=(5, 9))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for level in range(2):
            model.W_dec[level].mul_(torch.rand(model.sizes[level], 1, generator=gen) * 3 + 0.05)
            model.threshold[level].copy_(torch.rand(model.sizes[level], generator=gen) * 0.3)
    x = torch.randn(64, 6, generator=gen)
    fired = [a > 0 for a in model.encode(x)]
    recon = [model.decode(a, level) for level, a in enumerate(model.encode(x))]
    model.fold_decoder_norms()
    for level, a in enumerate(model.encode(x)):
        assert torch.equal(a > 0, fired[level])
        assert torch.allclose(model.decode(a, level), recon[level], atol=1e-5)
        assert torch.allclose(model.W_dec[level].norm(dim=-1), torch.ones(model.sizes[level]))


def test_free_norms_are_left_alone_by_the_constraints() -> None:
    model = HSAE(6, (5, 9), bandwidth=0.05, seed=0, decoder_init_norm=0.1)
    assert torch.allclose(model.W_dec[1].norm(dim=-1), torch.full((9,), 0.1))
    assert torch.equal(model.W_enc[1], model.W_dec[1].T)
    model.W_dec[1].grad = torch.ones(9, 6)
    model.project_decoder_grads()
    model.apply_constraints()
    assert torch.equal(model.W_dec[1].grad, torch.ones(9, 6))  # radial part kept
    assert torch.allclose(model.W_dec[1].norm(dim=-1), torch.full((9,), 0.1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pc_loss_with_free_norms_equals_naive_with_every_gradient(seed: int) -> None:
    """Decoder rows of any norm: with free_norms the fast formula is the naive one exactly,
    value and decoder gradients, radial parts included (nothing is projected away)."""
    a_p, a_c, dec_p, dec_c, parent = _pc_case(seed)
    gen = torch.Generator().manual_seed(seed + 50)
    dec_p = dec_p * (torch.rand(dec_p.shape[0], 1, generator=gen, dtype=dec_p.dtype) * 2 + 0.1)
    dec_c = dec_c * (torch.rand(dec_c.shape[0], 1, generator=gen, dtype=dec_c.dtype) * 2 + 0.1)
    grads, values = [], []
    for fast in (True, False):
        dp, dc = dec_p.clone().requires_grad_(), dec_c.clone().requires_grad_()
        ap, ac = a_p.clone().requires_grad_(), a_c.clone().requires_grad_()
        if fast:
            loss = pc_loss(ap, ac, dp, dc, parent, free_norms=True)
        else:
            loss = pc_loss_naive(ap, ac, dp, dc, parent)
        values.append(loss.item())
        grads.append(torch.autograd.grad(loss, [dp, dc, ap, ac]))
    assert values[0] == pytest.approx(values[1], rel=1e-9)
    assert pc_loss(a_p, a_c, dec_p, dec_c, parent).item() != pytest.approx(values[1], rel=1e-3)
    for fast, naive in zip(*grads):
        assert torch.allclose(fast, naive, rtol=1e-9, atol=1e-12)
