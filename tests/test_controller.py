"""The lambda controller: its rule step by step, closed-loop convergence on a toy plant, and
that lambda really moves L0 in a trained HSAE (design §1)."""

from __future__ import annotations

import math

import pytest
import torch

from hsae.config import HSAEConfig, RunConfig, TrainConfig
from hsae.data.planted import PlantedConfig, PlantedForest
from hsae.data.streams import planted_stream
from hsae.method.controller import SparsityController
from hsae.method.train import Trainer

torch.set_num_threads(1)


# ----- the update rule, by hand ----------------------------------------------------------


def _controller(**kw) -> SparsityController:
    args = dict(n_levels=2, target_l0=10.0, eta=0.1, momentum=0.9, lambda_init=1.0)
    args.update(kw)
    return SparsityController(lambda_step=0.05, **args)


def test_first_update_only_initialises_the_ema() -> None:
    c = _controller()
    c.update(torch.tensor([20.0, 5.0]))
    assert c.l0_ema.tolist() == [20.0, 5.0]
    assert c.lambdas.tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    ("obs", "sign"),
    [
        # level 0: ema 20, target 10 -> wanted change -eta (20 - 10) = -1.
        #   obs 0:  new ema 18,  observed -2   < -1: falls faster than wanted -> lambda down
        #   obs 15: new ema 19.5, observed -0.5 > -1: too slow -> lambda up
        # level 1: ema 5, target 10 -> wanted +0.5.
        #   obs 5:  observed 0   < +0.5 -> lambda down
        #   obs 20: observed 1.5 > +0.5 -> lambda up
        ([0.0, 5.0], [-1, -1]),
        ([15.0, 20.0], [+1, +1]),
        ([0.0, 20.0], [-1, +1]),
        ([15.0, 5.0], [+1, -1]),
    ],
)
def test_one_step_moves_lambda_by_exp_pm_step(obs: list[float], sign: list[int]) -> None:
    c = _controller()
    c.update(torch.tensor([20.0, 5.0]))
    c.update(torch.tensor(obs))
    want_ema = [0.9 * 20.0 + 0.1 * obs[0], 0.9 * 5.0 + 0.1 * obs[1]]
    assert c.l0_ema.tolist() == pytest.approx(want_ema, rel=1e-6)
    assert c.lambdas.tolist() == pytest.approx([math.exp(0.05 * s) for s in sign], rel=1e-6)


def test_steps_compound_multiplicatively() -> None:
    c = _controller(lambda_init=0.2)
    c.update(torch.tensor([20.0, 5.0]))
    # three steps of L0 collapsing to 0 on level 0 (falls faster than wanted each time:
    # observed = -0.1 ema, wanted = -0.1 (ema - 10)), and of L0 jumping to 100 on level 1
    for _ in range(3):
        c.update(torch.tensor([0.0, 100.0]))
    assert c.lambdas.tolist() == pytest.approx(
        [0.2 * math.exp(-0.15), 0.2 * math.exp(0.15)], rel=1e-6
    )


def test_exactly_wanted_change_increases_lambda() -> None:
    """'When the observed change is faster downwards than dL0*, lambda decreases, otherwise it
    increases': equality is 'otherwise'. Exact in binary: ema 20 -> 15, wanted -0.5 * 10."""
    c = SparsityController(1, 10.0, eta=0.5, momentum=0.5, lambda_init=1.0, lambda_step=0.25)
    c.update(torch.tensor([20.0]))
    c.update(torch.tensor([10.0]))
    assert c.l0_ema.item() == 15.0
    assert c.lambdas.item() == pytest.approx(math.exp(0.25), rel=1e-6)


def test_state_round_trip_continues_identically() -> None:
    a = _controller()
    for obs in ([20.0, 5.0], [12.0, 9.0], [30.0, 1.0]):
        a.update(torch.tensor(obs))
    b = _controller(lambda_init=123.0)
    b.load_state_tensors({k: v.clone() for k, v in a.state_tensors().items()})
    for obs in ([0.0, 50.0], [25.0, 2.0]):
        a.update(torch.tensor(obs))
        b.update(torch.tensor(obs))
    assert torch.equal(a.lambdas, b.lambdas) and torch.equal(a.l0_ema, b.l0_ema)


# ----- closed loop on a toy plant --------------------------------------------------------


def test_controller_reaches_target_on_a_lagged_noisy_plant() -> None:
    """L0_{t+1} = L0_t + k (g(lambda_t) - L0_t) + noise, g(lambda) = 200 / (1 + lambda / 0.5).

    Two levels run in parallel: one starts far above the target (L0 200, lambda 0.01), one
    far below (L0 1, lambda 100). g(lambda*) = 20 at lambda* = 4.5, two decades from either
    start, so the controller has to travel. The observation noise has sd 2 (10 % of target)."""
    target, k = 20.0, 0.2
    c = SparsityController(2, target, eta=0.01, momentum=0.99, lambda_init=1.0, lambda_step=0.01)
    c.lambdas = torch.tensor([0.01, 100.0])
    gen = torch.Generator().manual_seed(0)
    l0 = torch.tensor([200.0, 1.0])
    steps, ema, plant, log_lam = 6000, [], [], []
    for t in range(steps):
        c.update(l0 + 2.0 * torch.randn(2, generator=gen))
        l0 = l0 + k * (200.0 / (1 + c.lambdas / 0.5) - l0)
        if t >= steps - 1000:
            ema.append(c.l0_ema.clone())
            plant.append(l0.clone())
            log_lam.append(c.lambdas.log())
    ema, plant, log_lam = torch.stack(ema), torch.stack(plant), torch.stack(log_lam)
    # the EMA stays within 5 % of the target over the whole last 1000 steps, on both sides
    assert ((ema - target).abs() <= 0.05 * target).all(), (ema.min(0), ema.max(0))
    # the plant's own L0, averaged over the tail, too
    assert ((plant.mean(0) - target).abs() <= 0.05 * target).all(), plant.mean(0)
    # lambda hovers (+-10 % from noise and lag) around the plant's equilibrium 4.5; the
    # geometric mean over the tail is within 5 % of it (L0 within 5 % <=> lambda within ~5.5 %)
    assert ((log_lam.mean(0) - math.log(4.5)).abs() <= 0.05).all(), log_lam.mean(0).exp()


# ----- lambda moves L0 in a real HSAE ----------------------------------------------------


@pytest.fixture(scope="module")
def small_forest() -> PlantedForest:
    return PlantedForest(
        PlantedConfig(d=16, n_trees=4, branching=2, depth=2, n_independent=8, seed=0)
    )


def _train_at_fixed_lambda(
    forest: PlantedForest, lam: float, out_dir
) -> tuple[list[float], Trainer]:
    cfg = RunConfig(
        model=HSAEConfig(sizes=(16, 32), target_l0=4.0, update_every=10**6, l0_start=1.0),
        train=TrainConfig(
            steps=300,
            batch_size=256,
            lr=3e-3,
            lambda_init=lam,
            lambda_step=1e-12,  # lambda effectively frozen
            dead_latents="none",
            checkpoint_every=0,
            scale_tokens=2048,
            progress=False,
        ),
    )
    trainer = Trainer(cfg, 16, planted_stream(forest, 256, seed=1), out_dir)
    trainer.fit()
    x = forest.sample(4096, torch.Generator().manual_seed(99))[0] * trainer.model.scale
    with torch.no_grad():
        l0 = [(a > 0).sum(-1).float().mean().item() for a in trainer.model.encode(x)]
    return l0, trainer


def test_l0_decreases_when_lambda_increases(small_forest, tmp_path) -> None:
    """Three runs that differ only in lambda (0.03, 0.3, 3), all starting at L0 = 4 per level
    (init_from_data). Held-out L0 must fall by at least 10 % per decade of lambda, on every
    level. (Measured: about 6.6 / 5.3 / 3.1 on level 0 and 5.2 / 4.4 / 2.2 on level 1.)"""
    lambdas = (0.03, 0.3, 3.0)
    l0s = []
    for k, lam in enumerate(lambdas):
        l0, trainer = _train_at_fixed_lambda(small_forest, lam, tmp_path / str(k))
        assert torch.allclose(trainer.controller.lambdas, torch.full((2,), lam), rtol=1e-6)
        assert (trainer.last.fve > 0.5).all()  # a working model, not a collapsed one
        l0s.append(l0)
    for level in range(2):
        seq = [l0[level] for l0 in l0s]
        for lo, hi in zip(seq[:-1], seq[1:], strict=True):
            assert hi < 0.9 * lo, (level, seq)


# ----- the default controller hits its target at any run length ---------------------------


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1_000, 20_000])
def test_default_controller_reaches_target_l0(small_forest, tmp_path, steps) -> None:
    """Every default but sizes, target and length: held-out L0 within 10 % of the target on
    every level, for a short and a long run (the controller scales with the run's length,
    TrainConfig.controller_constants). Small batches keep the 20k-step run to seconds."""
    target = 4.0
    cfg = RunConfig(
        model=HSAEConfig(sizes=(16, 32, 64), target_l0=target),
        train=TrainConfig(steps=steps, batch_size=64, checkpoint_every=0, progress=False),
    )
    trainer = Trainer(cfg, 16, planted_stream(small_forest, 64, seed=1), tmp_path)
    trainer.fit()
    x = small_forest.sample(8192, torch.Generator().manual_seed(99))[0] * trainer.model.scale
    with torch.no_grad():
        l0 = [(a > 0).sum(-1).float().mean().item() for a in trainer.model.encode(x)]
    assert all(abs(v - target) <= 0.1 * target for v in l0), l0


# ----- the annealed target (HSAEConfig.l0_start) -------------------------------------------


def test_annealed_target_falls_linearly_to_the_target_by_half_the_run() -> None:
    c = _controller(target_l0=10.0, start_multiple=3.0, steps=1000)
    # by hand: 30 at step 0, 20 a quarter in, 10 from half the run on
    for step, want in [(0, 30.0), (250, 20.0), (500, 10.0), (999, 10.0)]:
        assert c.target_at(step).tolist() == pytest.approx([want, want]), step
    c.update(torch.tensor([30.0, 30.0]), step=250)
    assert c.target.tolist() == pytest.approx([20.0, 20.0])


def test_annealed_target_never_asks_a_level_for_more_than_a_quarter_of_it() -> None:
    c = _controller(target_l0=8.0, start_multiple=3.0, steps=100, sizes=(32, 64, 256))
    assert c.target_at(0).tolist() == pytest.approx([8.0, 16.0, 24.0])
    assert _controller(target_l0=10.0).target_at(0).tolist() == [10.0, 10.0]  # not annealed


@pytest.mark.parametrize(("method", "start"), [("hsae", 3.0), ("paper", 1.0)])
def test_training_starts_at_the_methods_annealed_l0(small_forest, tmp_path, method, start):
    """init_from_data sets the thresholds for the step-0 target: the hsae method starts
    its level of 64 features at 3 x 4 = 12 active, the paper's at the target, 4."""
    cfg = RunConfig(
        model=HSAEConfig(method=method, sizes=(16, 64), target_l0=4.0),
        train=TrainConfig(steps=10, batch_size=256, checkpoint_every=0, progress=False),
    )
    trainer = Trainer(cfg, 16, planted_stream(small_forest, 256, seed=1), tmp_path)
    trainer.init_fresh()
    x = small_forest.sample(8192, torch.Generator().manual_seed(99))[0] * trainer.model.scale
    with torch.no_grad():
        l0 = [(a > 0).sum(-1).float().mean().item() for a in trainer.model.encode(x)]
    assert l0[0] == pytest.approx(4.0, rel=0.15)  # 16 features: capped at 4, not annealed
    assert l0[1] == pytest.approx(4.0 * start, rel=0.15)
