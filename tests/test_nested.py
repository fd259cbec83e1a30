"""Nested levels (hsae/method/nested.py): a coarser level is the finer level's prefix and
stays so through training; the shared parameters' gradient is the sum of every level's
loss gradient, against finite differences; only the finest level's L0 is priced; and an
inherited feature carries no link."""

from __future__ import annotations

import pytest
import torch
from test_train import make_trainer, tiny_cfg

from hsae.config import ConfigError, HSAEConfig
from hsae.method import nested
from hsae.method.losses import LossInputs, hsae_loss_dense
from hsae.method.model import HSAE

pytestmark = pytest.mark.usefixtures("one_thread")


def _nested_model() -> HSAE:
    model = HSAE(5, (2, 4, 7), bandwidth=0.5, seed=3).double()
    with torch.no_grad():
        for theta in model.threshold:
            theta.fill_(0.2)
    nested.sync(model)
    return model


def _loss(model: HSAE, x: torch.Tensor) -> torch.Tensor:
    """Every level's reconstruction and L0 terms, every level priced (the fold must add
    them all up), no links."""
    parents = [torch.full((n,), -1, dtype=torch.long) for n in model.sizes[1:]]
    lambdas = torch.full((model.n_levels,), 0.01, dtype=torch.float64)
    inputs = LossInputs(parents, lambdas, 0.0, [None, None], None, dense=True)
    return hsae_loss_dense(model, x, inputs).total


def test_sync_makes_every_coarser_level_the_finest_levels_prefix() -> None:
    model = HSAE(5, (2, 4, 7), bandwidth=0.5, seed=3)
    assert not torch.equal(model.W_dec[0], model.W_dec[2][:2])  # independent draws before
    nested.sync(model)
    for level, n in enumerate(model.sizes[:-1]):
        assert torch.equal(model.W_dec[level], model.W_dec[-1][:n])
        assert torch.equal(model.W_enc[level], model.W_enc[-1][:, :n])
        assert torch.equal(model.b_enc[level], model.b_enc[-1][:n])
        assert torch.equal(model.threshold[level], model.threshold[-1][:n])
        assert torch.equal(model.b_dec[level], model.b_dec[-1])


def test_folded_gradient_is_the_sum_over_levels_as_finite_differences_give() -> None:
    """Moving one shared encoder entry (and its copies: one parameter) changes the total
    loss of all three levels; the folded gradient on the owner must be that derivative."""
    model = _nested_model()
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _loss(model, x).backward()
    nested.fold_grads(model)
    assert all(p.grad is None for p in (model.W_enc[0], model.W_enc[1], model.b_dec[0]))
    h = 1e-6
    for row, col in [(0, 0), (3, 1), (2, 3), (4, 6)]:  # shared by 3, 3, 2 and 1 levels
        folded = model.W_enc[-1].grad[row, col].item()
        moved = []
        for sign in (1, -1):
            probe = _nested_model()
            with torch.no_grad():
                probe.W_enc[-1][row, col] += sign * h
            nested.sync(probe)
            moved.append(_loss(probe, x).item())
        assert folded == pytest.approx((moved[0] - moved[1]) / (2 * h), rel=1e-5, abs=1e-9)
    # b_dec is one vector for all levels: its gradient gathers every level's
    bias_fd = []
    for sign in (1, -1):
        probe = _nested_model()
        with torch.no_grad():
            probe.b_dec[-1][2] += sign * h
        nested.sync(probe)
        bias_fd.append(_loss(probe, x).item())
    assert model.b_dec[-1].grad[2].item() == pytest.approx(
        (bias_fd[0] - bias_fd[1]) / (2 * h), rel=1e-5
    )


def test_only_the_finest_level_is_priced() -> None:
    assert nested.priced_levels(3, nested=True).tolist() == [0.0, 0.0, 1.0]
    assert nested.priced_levels(3, nested=False).tolist() == [1.0, 1.0, 1.0]


def test_nested_training_keeps_the_prefix_and_links_only_new_features(tmp_path) -> None:
    cfg = tiny_cfg(60, nested=True, link_threshold=0.5)
    trainer = make_trainer(cfg, tmp_path)
    start = [w.detach().clone() for w in trainer.model.W_dec]
    result = trainer.fit()
    model, sizes = result.model, cfg.model.sizes
    for level, n in enumerate(sizes[:-1]):
        assert torch.equal(model.W_dec[level], model.W_dec[-1][:n])
        assert torch.equal(model.threshold[level], model.threshold[-1][:n])
        assert torch.equal(model.b_dec[level], model.b_dec[-1])
    assert not torch.allclose(model.W_dec[0], start[-1][: sizes[0]]), "training moved nothing"
    # the loss priced the finest level's L0 alone
    assert trainer.last_lambdas[:-1].eq(0).all() and trainer.last_lambdas[-1] > 0
    for level, parent in enumerate(result.hierarchy.parents):
        assert (parent[: sizes[level]] == -1).all(), "an inherited feature got a link"
    assert any((p[sizes[lv] :] >= 0).any() for lv, p in enumerate(result.hierarchy.parents))


def test_nested_and_support_are_refused_together() -> None:
    with pytest.raises(ConfigError, match="nested"):
        HSAEConfig(sizes=(8, 16), target_l0=2, nested=True, support=1.0).validate()


def test_the_post_hoc_baseline_is_never_nested() -> None:
    assert HSAEConfig(nested=True).baseline().nested is False
