"""Planted forests: the generator's statistics and the ground-truth scoring."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch

from hsae.config import ConfigError
from hsae.data.planted import PlantedConfig, PlantedForest, score_against_truth, zipf_rates

SMALL = PlantedConfig(d=32, n_trees=3, branching=2, depth=3, n_independent=5, seed=1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def forest() -> PlantedForest:
    return PlantedForest(PlantedConfig())


@pytest.fixture(scope="module")
def big_sample(forest: PlantedForest) -> tuple[torch.Tensor, torch.Tensor]:
    return forest.sample(40_000, _gen(123))


# ----- structure and determinism ---------------------------------------------------------


def test_same_seed_same_forest_and_stream() -> None:
    a, b = PlantedForest(PlantedConfig(seed=3)), PlantedForest(PlantedConfig(seed=3))
    assert torch.equal(a.directions, b.directions)
    assert torch.equal(a.geometric, b.geometric)
    xa, acta = a.sample(64, _gen(5))
    xb, actb = b.sample(64, _gen(5))
    assert torch.equal(xa, xb) and torch.equal(acta, actb)
    sa, sb = a.batches(32, seed=9), b.batches(32, seed=9)
    for _ in range(3):
        assert torch.equal(next(sa), next(sb))


def test_different_seeds_differ() -> None:
    a, b = PlantedForest(PlantedConfig(seed=0)), PlantedForest(PlantedConfig(seed=1))
    assert not torch.allclose(a.directions, b.directions)
    s0, s1 = a.batches(32, seed=0), a.batches(32, seed=1)
    assert not torch.equal(next(s0), next(s1))
    first, second = next(s0), next(s0)
    assert not torch.equal(first, second)  # the stream moves on


def test_layout_counts_and_ancestors() -> None:
    f = PlantedForest(SMALL)
    per_tree = 1 + 2 + 4
    assert f.n_features == 3 * per_tree + 5
    assert f.directions.shape == (f.n_features, 32)
    assert torch.allclose(f.directions.norm(dim=1), torch.ones(f.n_features), atol=1e-5)
    assert len(f.true_edges()) == 3 * (per_tree - 1)
    assert (f.depth[f.tree < 0] == -1).all() and (f.parent[f.tree < 0] == -1).all()
    for a in range(f.n_features):
        for b in range(f.n_features):
            chain, p = set(), int(f.parent[b])
            while p >= 0:
                chain.add(p)
                p = int(f.parent[p])
            assert f.is_ancestor(a, b) == (a in chain)
    for p, c in f.true_edges():
        assert f.tree[p] == f.tree[c] and f.depth[c] == f.depth[p] + 1


def test_default_has_three_levels(forest: PlantedForest, big_sample) -> None:
    _, active = big_sample
    assert int(forest.depth.max()) >= 2  # root (0), child (1), grandchild (2)
    assert active[:, forest.depth == 2].any()


def test_mixed_form_is_half_geometric(forest: PlantedForest) -> None:
    assert int(forest.geometric.sum()) == forest.cfg.n_trees // 2


# ----- firing statistics -----------------------------------------------------------------


def test_child_never_fires_without_parent(forest: PlantedForest, big_sample) -> None:
    _, active = big_sample
    child = torch.nonzero(forest.parent >= 0).flatten()
    assert not (active[:, child] & ~active[:, forest.parent[child]]).any()


def test_at_most_one_child_and_descend_rate(forest: PlantedForest, big_sample) -> None:
    _, active = big_sample
    b = forest.cfg.branching
    internal = torch.nonzero((forest.depth >= 0) & (forest.depth < forest.cfg.depth - 1))
    internal = internal.flatten()
    n_children = torch.stack(
        [active[:, (forest.parent == p).nonzero().flatten()].sum(1) for p in internal.tolist()], 1
    )
    assert (forest.parent == internal[0]).sum() == b
    assert n_children.max() <= 1
    parent_on = active[:, internal]
    p_hat = n_children[parent_on].float().mean().item()
    n = int(parent_on.sum())
    sigma = math.sqrt(0.8 * 0.2 / n)
    assert abs(p_hat - forest.cfg.p_descend) < 5 * sigma


def test_root_rates_follow_zipf(forest: PlantedForest, big_sample) -> None:
    _, active = big_sample
    cfg = forest.cfg
    roots = torch.nonzero(forest.depth == 0).flatten()
    # Independent expectation: w_i = 1/i, scaled to sum 2.0, then the 0.5 cap on rank 1
    # and the excess (0.5/w1*... ) shared by the others in proportion to w.
    w = 1.0 / torch.arange(1, cfg.n_trees + 1, dtype=torch.float64)
    expect = torch.empty_like(w)
    expect[0] = 0.5
    expect[1:] = 1.5 * w[1:] / w[1:].sum()
    assert torch.allclose(forest.rate[roots], expect, atol=1e-9)
    assert abs(forest.rate[roots].sum().item() - cfg.root_rate_total) < 1e-9
    emp = active[:, roots].double().mean(0)
    sigma = (expect * (1 - expect) / active.shape[0]).sqrt()
    assert ((emp - expect).abs() < 5 * sigma + 1e-4).all()
    assert emp[0] > emp[-1]


def test_marginal_rates_of_all_features(forest: PlantedForest, big_sample) -> None:
    _, active = big_sample
    emp = active.double().mean(0)
    r = forest.rate
    sigma = (r * (1 - r) / active.shape[0]).sqrt()
    assert ((emp - r).abs() < 5 * sigma + 1e-4).all()
    # siblings differ: first child (Zipf rank 1) fires more than the last
    kids = (forest.parent == 0).nonzero().flatten()
    assert emp[kids[0]] > emp[kids[-1]]


def test_zipf_rates_water_filling() -> None:
    r = zipf_rates(4, 0.0, 2.0)
    assert torch.allclose(r, torch.full((4,), 0.5, dtype=torch.float64))
    r = zipf_rates(3, 2.0, 1.0)
    assert r[0] == 0.5 and abs(r.sum().item() - 1.0) < 1e-12 and r[1] > r[2]
    r = zipf_rates(3, 1.0, 5.0)  # more than 0.5 * 3 asked: every rate saturates
    assert torch.equal(r, torch.full((3,), 0.5, dtype=torch.float64))
    assert zipf_rates(0, 1.0, 2.0).numel() == 0


# ----- geometry --------------------------------------------------------------------------


def test_geometry_form_cosine_matches_offset() -> None:
    cfg = dataclasses.replace(SMALL, form="geometry", geometry_offset=0.6)
    f = PlantedForest(cfg)
    edges = torch.tensor(f.true_edges())
    cos = (f.directions[edges[:, 0]] * f.directions[edges[:, 1]]).sum(1)
    assert torch.allclose(cos, torch.full_like(cos, 1 / math.sqrt(1 + 0.36)), atol=1e-5)
    assert f.geometric.all()


def test_cooccurrence_form_has_unrelated_directions() -> None:
    cfg = dataclasses.replace(SMALL, d=64, n_trees=10, form="cooccurrence")
    f = PlantedForest(cfg)
    edges = torch.tensor(f.true_edges())
    cos = (f.directions[edges[:, 0]] * f.directions[edges[:, 1]]).sum(1)
    assert cos.abs().median() < 0.2  # random pairs in R^64: typical |cos| ~ 0.1
    assert not f.geometric.any()


# ----- reconstruction --------------------------------------------------------------------


def test_x_is_sum_of_active_features() -> None:
    f = PlantedForest(dataclasses.replace(SMALL, noise_std=0.0))
    x, active, mags = f.sample_full(256, _gen(1))
    assert ((mags > 0) == active).all()
    assert torch.allclose(x, mags @ f.directions, atol=1e-5)
    # least squares on the active set recovers the magnitudes (few actives, d = 32)
    for t in range(20):
        idx = active[t].nonzero().flatten()
        if idx.numel() == 0:
            assert torch.allclose(x[t], torch.zeros(32))
            continue
        sol = torch.linalg.lstsq(f.directions[idx].T.double(), x[t].double()).solution
        assert torch.allclose(sol.float(), mags[t, idx], atol=1e-4)


def test_noise_and_magnitude_statistics() -> None:
    cfg = dataclasses.replace(SMALL, noise_std=0.5, magnitude_mean=2.0, magnitude_std=0.4)
    f = PlantedForest(cfg)
    x, _, mags = f.sample_full(20_000, _gen(2))
    resid = x - mags @ f.directions
    assert abs(resid.std().item() - 0.5) < 0.01
    on = mags[mags > 0]
    assert abs(on.mean().item() - 2.0) < 0.02 and abs(on.std().item() - 0.4) < 0.02


def test_sampling_is_fast(forest: PlantedForest) -> None:
    gen = _gen(0)
    forest.sample(1024, gen)
    best = math.inf
    for _ in range(20):  # best of several: other processes may hold the cores
        t0 = time.perf_counter()
        forest.sample(1024, gen)
        best = min(best, time.perf_counter() - t0)
        if best < 0.005:
            break
    assert best < 0.05  # loose guard on a shared machine; typically ~2 ms


# ----- scoring ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small() -> PlantedForest:
    return PlantedForest(SMALL)


def test_score_perfect(small: PlantedForest) -> None:
    d = small.directions
    res = score_against_truth(small, [d, d], [small.parent])
    n_edges = len(small.true_edges())
    assert res["recovered"] == [small.n_features] * 2 and res["recovered_frac"] == [1.0, 1.0]
    assert res["edges"] == res["ancestor"] == n_edges
    assert res["duplicate"] == res["wrong"] == res["unmatched"] == 0
    assert res["edge_precision"] == 1.0 and res["recall"] == 1.0


def test_score_permuted_noisy_rows(small: PlantedForest) -> None:
    n = small.n_features
    g = _gen(7)
    perm0, perm1 = torch.randperm(n, generator=g), torch.randperm(n, generator=g)
    noisy = small.directions + 0.02 * torch.randn(n, 32, generator=g)
    dec0, dec1 = 3.0 * noisy[perm0], noisy[perm1]  # row norms are not ours to assume
    inv0 = torch.argsort(perm0)
    true_par = small.parent[perm1]  # parent (true index) of each level-1 row
    par = torch.where(true_par >= 0, inv0[true_par.clamp(min=0)], -1)
    res = score_against_truth(small, [dec0, dec1], [par])
    assert res["recovered"] == [n, n]
    assert torch.equal(res["matches"][0], perm0) and torch.equal(res["matches"][1], perm1)
    assert res["edge_precision"] == 1.0 and res["recall"] == 1.0


def test_score_unrecovered_row(small: PlantedForest) -> None:
    d = small.directions.clone()
    d[4] = torch.randn(32, generator=_gen(3))  # far from everything at threshold 0.9
    res = score_against_truth(small, [d], [])
    assert res["recovered"] == [small.n_features - 1]
    assert res["matches"][0][4] == -1
    assert math.isnan(res["edge_precision"]) and res["edges"] == 0


def test_score_duplicates_counted_apart(small: PlantedForest) -> None:
    # level l holds the true features of depth <= l; a depth-l node's parent is its true
    # parent, an older node's parent is its own copy one level up (a duplicate edge).
    levels = [torch.nonzero((small.depth >= 0) & (small.depth <= lv)).flatten() for lv in range(3)]
    decoders = [small.directions[ix] for ix in levels]
    parents = []
    for lv in range(1, 3):
        pos_above = {int(t): i for i, t in enumerate(levels[lv - 1])}
        par = []
        for t in levels[lv].tolist():
            key = t if small.depth[t] < lv else int(small.parent[t])
            par.append(pos_above[key])
        parents.append(torch.tensor(par))
    res = score_against_truth(small, decoders, parents)
    n_dup = 3 + (3 + 6)  # roots copied into level 1; roots and children into level 2
    assert res["duplicate"] == n_dup
    assert res["ancestor"] == len(small.true_edges())
    assert res["edge_precision"] == 1.0
    assert res["duplicate_frac"] == pytest.approx(n_dup / (n_dup + res["ancestor"]))
    assert res["recall"] == 1.0


def test_score_wrong_edges_lower_precision(small: PlantedForest) -> None:
    d = small.directions
    par = small.parent.clone()
    edges = small.true_edges()
    first_child = edges[0][1]
    other_root = 1 if small.tree[first_child] != 1 else 2
    par[first_child] = other_root  # unrelated tree
    last_p, last_c = edges[-1]
    par[last_p] = last_c  # reversed: descendant above ancestor
    res = score_against_truth(small, [d, d], [par])
    n_edges = len(edges)
    # edges: n_edges true ones, one replaced by a wrong one, plus a new wrong reversed edge
    # (last_p was a child, so it already had an edge that now becomes the reversed one)
    assert res["wrong"] == 2 and res["ancestor"] == n_edges - 2
    assert res["edge_precision"] == pytest.approx((n_edges - 2) / n_edges)
    assert res["recall"] == pytest.approx((n_edges - 2) / n_edges)


def test_score_recall_through_intermediate_level() -> None:
    f = PlantedForest(PlantedConfig(d=16, n_trees=1, branching=1, depth=2, n_independent=0))
    root, child = f.directions[0:1], f.directions[1:2]
    middle = torch.randn(1, 16, generator=_gen(4))  # matches nothing
    res = score_against_truth(f, [root, middle, child], [torch.tensor([0]), torch.tensor([0])])
    assert res["matches"][1].item() == -1
    assert res["unmatched"] == 2 and res["ancestor"] == res["wrong"] == 0
    assert math.isnan(res["edge_precision"])
    assert res["recall"] == 1.0
    # without the link above the middle feature the path is broken
    res = score_against_truth(f, [root, middle, child], [torch.tensor([-1]), torch.tensor([0])])
    assert res["recall"] == 0.0


def test_score_rejects_bad_shapes(small: PlantedForest) -> None:
    d = small.directions
    with pytest.raises(ValueError):
        score_against_truth(small, [d, d], [])
    with pytest.raises(ValueError):
        score_against_truth(small, [d, d], [torch.zeros(3, dtype=torch.long)])
    with pytest.raises(ValueError):
        score_against_truth(small, [d[:, :5]], [])


# ----- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"d": 0},
        {"d": -3},
        {"depth": 0},
        {"n_trees": 0},
        {"branching": 0},
        {"n_independent": -1},
        {"p_descend": 1.5},
        {"p_descend": -0.1},
        {"root_rate_total": -1.0},
        {"independent_rate_total": -0.5},
        {"form": "hierarchical"},
        {"geometry_offset": 0.0},
        {"magnitude_mean": 0.0},
        {"magnitude_std": -0.1},
        {"noise_std": -1.0},
        {"zipf_exponent": -1.0},
    ],
)
def test_bad_config_raises(change: dict) -> None:
    with pytest.raises(ConfigError) as err:
        PlantedForest(PlantedConfig(**change))
    assert "\n" not in str(err.value)


def test_recall_ceiling_counts_parents_matched_above_their_children(small: PlantedForest) -> None:
    """Level 0 holds the roots, level 1 every feature: a root -> child edge can be linked
    (root at 0, child at 1), a deeper edge cannot (both ends only at level 1). With the
    levels swapped no edge can. Links play no part: unlinked, recall is 0."""
    d = small.directions
    roots = torch.nonzero(small.depth == 0).flatten()
    edges = small.true_edges()
    from_roots = sum(int(small.depth[p]) == 0 for p, _ in edges) / len(edges)
    assert 0 < from_roots < 1
    unlinked = torch.full((small.n_features,), -1)
    res = score_against_truth(small, [d[roots], d], [unlinked])
    assert res["recall_ceiling"] == pytest.approx(from_roots)
    assert res["recall"] == 0.0 and res["recall_of_ceiling"] == 0.0
    deeper = torch.nonzero(small.depth > 0).flatten()
    res = score_against_truth(small, [d[deeper], d[roots]], [torch.full((roots.numel(),), -1)])
    assert res["recall_ceiling"] == 0.0 and math.isnan(res["recall_of_ceiling"])
    res = score_against_truth(small, [d, d], [small.parent])
    assert res["recall_ceiling"] == 1.0 and res["recall_of_ceiling"] == 1.0
