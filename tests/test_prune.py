"""Pruned levels (hsae.method.prune) against hand-built levels and hand-computed figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hsae import pipeline
from hsae.config import ConfigError, HSAEConfig, RunConfig, TrainConfig
from hsae.data.planted import PlantedConfig
from hsae.io import load_json
from hsae.method.hierarchy import Hierarchy
from hsae.method.model import HSAE
from hsae.method.prune import level_fit, prune_levels
from hsae.method.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def identity_levels(coarse_dirs: torch.Tensor) -> HSAE:
    """d = 4; level 1 holds the four basis directions (a_i = x_i, threshold 0); level 0
    holds ``coarse_dirs`` (2 unit rows), its encoder their transpose."""
    model = HSAE(4, (2, 4), bandwidth=0.5)
    with torch.no_grad():
        for level, dirs in ((0, coarse_dirs), (1, torch.eye(4))):
            model.W_dec[level].copy_(dirs)
            model.W_enc[level].copy_(dirs.T)
            model.b_enc[level].zero_()
            model.threshold[level].fill_(1e-6)
            model.b_dec[level].zero_()
    return model


def forest_rows() -> list[torch.Tensor]:
    """A parent e0 on every row with one of three children (e1 on half the rows, e2 and
    e3 on a quarter each), magnitude 1: two batches of 8 rows."""
    child = torch.tensor([1, 1, 2, 3, 1, 1, 2, 3])
    rows = torch.zeros(8, 4)
    rows[:, 0] = 1.0
    rows[torch.arange(8), child] = 1.0
    return [rows, rows.clone()]


def test_level_fit_matches_a_hand_computed_fve_and_energy():
    # level 0 holds e0 and the blend (e1 + e2)/sqrt(2)
    blend = torch.tensor([0.0, 1.0, 1.0, 0.0]) / 2**0.5
    model = identity_levels(torch.stack([torch.eye(4)[0], blend]))
    rows = forest_rows()
    x = torch.cat(rows)
    a0 = x[:, 0]
    a1 = (x @ blend).clamp(min=0)
    x_hat = a0[:, None] * torch.eye(4)[0] + a1[:, None] * blend
    fve = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    got_fve, energy = level_fit(model, 0, rows)
    assert abs(got_fve - float(fve)) < 1e-6
    assert torch.allclose(energy, torch.stack([(a0**2).sum(), (a1**2).sum()]))
    assert level_fit(model, 1, rows)[0] > 1 - 1e-6  # the basis explains every row


def test_prune_keeps_the_finer_levels_most_energetic_features():
    # level 0 holds two useless directions; level 1's energies are 16, 8, 4, 4
    model = identity_levels(torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0]]) + torch.eye(4)[3])
    own = level_fit(model, 0, forest_rows())[0]
    assert prune_levels(model, forest_rows(), tolerance=0.0) == [0]
    assert torch.equal(model.W_dec[0], torch.eye(4)[:2])  # the parent e0 and the child e1
    assert torch.equal(model.W_enc[0], torch.eye(4)[:, :2])
    assert torch.equal(model.threshold[0], model.threshold[1][:2])
    assert level_fit(model, 0, forest_rows())[0] > own


def test_prune_leaves_a_level_that_explains_more_bit_identical():
    # rows carry e0 + e1 or e2 + e3: level 0's two blends reconstruct every row exactly,
    # while any two of the basis rows leave half the rows' norm unexplained
    blends = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]]) / 2**0.5
    model = identity_levels(blends)
    rows = [torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]]).repeat(4, 1)] * 2
    before = [p[0].detach().clone() for p in (model.W_enc, model.W_dec, model.threshold)]
    assert level_fit(model, 0, rows)[0] > 1 - 1e-6
    assert prune_levels(model, rows, tolerance=0.0) == []
    after = [p[0] for p in (model.W_enc, model.W_dec, model.threshold)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # with a tolerance wider than the loss, the level is pruned
    assert prune_levels(model, rows, tolerance=1.0) == [0]
    kept = [int(row.argmax()) for row in model.W_dec[0]]  # four tied energies: any two
    assert len(set(kept)) == 2 and torch.equal(model.W_dec[0], torch.eye(4)[kept])


def test_relinked_children_find_the_kept_parent_and_never_their_own_copy():
    model = identity_levels(torch.zeros(2, 4) + torch.eye(4)[3])
    rows = forest_rows()
    prune_levels(model, rows, tolerance=0.0)  # level 0 = e0 (parent), e1 (a child)
    cfg = HSAEConfig(sizes=(2, 4), target_l0=1, parent_pick="specific")
    hierarchy = Hierarchy(cfg)
    hierarchy.relink(model, [*rows, torch.zeros(8, 4)])  # e0 on 2/3 of the rows: not dense
    # e1, e2, e3 fire only with e0: each links to level 0's e0; e1's copy at level 0 is
    # refused (same direction, same tokens), and e0 has no parent that fires on all its rows
    assert hierarchy.parents[0].tolist() == [-1, 0, 0, 0]


def tiny_run(tmp_path, **model) -> tuple:
    forest = PlantedConfig(d=16, n_trees=3, branching=2, depth=2, n_independent=4, seed=0)
    cfg = RunConfig(
        model=HSAEConfig(sizes=(8, 16, 32), target_l0=3, update_every=10, **model),
        train=TrainConfig(steps=40, batch_size=128, scale_tokens=1024, progress=False, seed=1,
                          checkpoint_every=0),
    )  # fmt: skip
    source = pipeline.planted_source(forest)
    trainer = Trainer(cfg, source.d, source.stream(128, 1), tmp_path)
    return trainer, trainer.fit()


def test_a_pruned_run_holds_finer_features_and_links_no_copy(tmp_path):
    # a tolerance of 1 prunes every level, whatever it costs
    trainer, result = tiny_run(tmp_path, prune=True, prune_tolerance=1.0, parent_pick="specific")
    assert result.summary["pruned_levels"] == [1, 0]
    dec = result.model.W_dec
    for level in (0, 1):
        finer = {tuple(row.tolist()) for row in dec[level + 1]}
        assert all(tuple(row.tolist()) in finer for row in dec[level])  # the finer's own rows
        assert len({tuple(row.tolist()) for row in dec[level]}) == dec[level].shape[0]
        for child, parent in enumerate(result.hierarchy.parents[level].tolist()):
            if parent >= 0:  # a feature kept at both levels never links to itself
                assert not torch.equal(dec[level + 1][child], dec[level][parent])
    assert any(p.ge(0).any() for p in result.hierarchy.parents)


def test_a_pruned_posthoc_run_links_from_the_pruned_features(tmp_path):
    """Post-hoc links are made once, after pruning, from firing counted on the pruned
    levels: a kept feature is never its own parent, and links exist."""
    _, result = tiny_run(tmp_path, prune=True, prune_tolerance=1.0, links="posthoc")
    assert result.summary["pruned_levels"] == [1, 0]
    dec = result.model.W_dec
    for level, parents in enumerate(result.hierarchy.parents):
        for child, parent in enumerate(parents.tolist()):
            if parent >= 0:
                assert not torch.equal(dec[level + 1][child], dec[level][parent])
    assert any(p.ge(0).any() for p in result.hierarchy.parents)


def test_an_unpruned_run_keeps_its_own_levels(tmp_path):
    _, result = tiny_run(tmp_path, prune=False)
    assert result.summary["pruned_levels"] == []


def test_prune_is_off_unless_asked_and_never_in_the_baseline():
    cfg = HSAEConfig(sizes=(8, 16), target_l0=3)
    assert not cfg.prune and not HSAEConfig(sizes=(8, 16), target_l0=3, method="paper").prune
    assert not HSAEConfig(sizes=(8, 16), target_l0=3, prune=True).baseline().prune


def test_prune_refuses_nested_levels_and_a_negative_tolerance():
    with pytest.raises(ConfigError, match="prune and nested"):
        HSAEConfig(sizes=(8, 16), target_l0=3, prune=True, nested=True).validate()
    with pytest.raises(ConfigError, match="prune_tolerance must be >= 0"):
        HSAEConfig(sizes=(8, 16), target_l0=3, prune_tolerance=-0.1).validate()


def test_the_shipped_synthsaebench_recipe_is_a_valid_config_that_prunes():
    """examples/synthsaebench.json, the recipe docs/hierarchy.md measures with pruning."""
    data = load_json(Path(__file__).parents[1] / "examples" / "synthsaebench.json")
    cfg = RunConfig.from_dict(data | {"model": data["model"] | {"sizes": [8, 16],
                                                                 "target_l0": 3}})  # fmt: skip
    cfg.validate()
    assert cfg.model.prune and cfg.model.parent_pick == "specific"
    assert cfg.model.sparsity_loss == "quadratic" and cfg.clip_bound == 1.0
