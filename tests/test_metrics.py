"""Hand-computed checks of the section-4.2 measures in hsae.evaluation.metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hsae.evaluation.metrics import (
    Evaluator,
    FiringMatch,
    LevelStats,
    PairStats,
    TreeStats,
    evaluate,
    evaluate_with_copies,
    nanmean,
)


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# Hamming example: 3 parents (P2 has no children), 4 children (c3 unassigned).
#   edges: c0 -> P0, c1 -> P0, c2 -> P1, c3 -> -1
HAM_PARENTS = torch.tensor([0, 0, 1, -1])
HAM_P = t(
    [
        [0.4, 0.0, 2.0],  # t0
        [0.0, 1.0, 0.0],  # t1
        [3.0, 0.2, 1.0],
    ]
)  # t2
HAM_C = t([[0.0, 0.7, 0.0, 1.0], [0.9, 0.0, 0.0, 5.0], [0.0, 0.0, 0.3, 0.0]])


def test_hamming_by_hand() -> None:
    # OR(c0, c1) = 1, 1, 0 vs act_P0 = 1, 0, 1 -> mismatch at t1, t2
    # OR(c2)     = 0, 0, 1 vs act_P1 = 0, 1, 1 -> mismatch at t1
    # P2 (no children) and c3 (unassigned) are ignored.
    # per token: t0 = 0, t1 = 2, t2 = 1 -> mean 3 / 3 = 1.0
    s = PairStats(HAM_PARENTS, n_parents=3)
    s.update(HAM_P, HAM_C)
    r = s.result()
    assert r["hamming"] == pytest.approx(1.0)
    assert r["n_edges"] == 3
    assert r["n_parents_with_children"] == 2
    # same data: P(p|c): c0 -> 0/1, c1 -> 1/1, c2 -> 1/1 -> 2/3
    #            P(c|p): c0 -> 0/2, c1 -> 1/2, c2 -> 1/2 -> 1/3
    assert r["p_parent_given_child"] == pytest.approx(2 / 3)
    assert r["p_child_given_parent"] == pytest.approx(1 / 3)


def test_hamming_streamed_equals_one_shot() -> None:
    s = PairStats(HAM_PARENTS, n_parents=3)
    s.update(HAM_P[:1], HAM_C[:1])
    s.update(HAM_P[1:], HAM_C[1:])
    assert s.result()["hamming"] == pytest.approx(1.0)


# Conditional probabilities: 3 parents, 4 children, 4 tokens.
#   edges: c0 -> P0, c1 -> P0, c2 -> P1, c3 -> P2
#   c2 is never active (edge left out of P(p|c)); P2 is never active (edge left out of P(c|p)).
COND_PARENTS = [0, 0, 1, 2]
COND_P = t([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0]])
COND_C = t([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
# P(p|c): c0 active t0,t1, P0 on both -> 2/2; c1 active t1,t2, P0 on t1 -> 1/2;
#         c3 active t3, P2 never -> 0/1; c2 excluded.  mean (1 + 0.5 + 0) / 3 = 0.5
# P(c|p): P0 active t0,t1,t3: c0 -> 2/3, c1 -> 1/3; P1 active t1,t2: c2 -> 0/2;
#         P2 excluded.  mean (2/3 + 1/3 + 0) / 3 = 1/3
COND_PGC, COND_CGP = 0.5, 1 / 3


@pytest.mark.parametrize("split", [4, 1, 3])
def test_conditional_probabilities_by_hand(split: int) -> None:
    s = PairStats(COND_PARENTS, n_parents=3)
    s.update(COND_P[:split], COND_C[:split])
    s.update(COND_P[split:], COND_C[split:])
    r = s.result()
    assert r["p_parent_given_child"] == pytest.approx(COND_PGC)
    assert r["p_child_given_parent"] == pytest.approx(COND_CGP)
    assert r["n_tokens"] == 4


def test_empty_hierarchy_gives_nan_not_a_perfect_hamming() -> None:
    s = PairStats(torch.full((4,), -1), n_parents=3)
    s.update(COND_P, COND_C)
    r = s.result()
    assert math.isnan(r["hamming"])
    assert math.isnan(r["p_parent_given_child"])
    assert math.isnan(r["p_child_given_parent"])
    assert r["n_edges"] == 0
    tree = TreeStats([torch.full((4,), -1)], [3, 4]).result()
    assert tree["assigned_frac"] == [0.0]
    assert tree["depth_hist"] == [3]
    assert tree["max_depth"] == 0
    assert tree["roots_with_children"] == 0
    assert math.isnan(tree["pairs"][0]["branching_mean"])


def test_no_tokens_gives_nan() -> None:
    s = PairStats(COND_PARENTS, n_parents=3)
    assert math.isnan(s.result()["hamming"])
    assert math.isnan(LevelStats(5).result()["fve"])


def test_l0_and_dead_fraction_by_hand() -> None:
    acts = t(
        [
            [0.0, 1.2, 0.0, 0.0, 3.0],
            [0.5, 0.0, 0.0, 0.0, 1.0],
            [0.0, 0.0, 0.0, 0.0, 2.0],
            [0.0, 0.7, 0.0, 0.0, 0.0],
        ]
    )
    # active per token 2, 2, 1, 1 -> L0 = 6 / 4 = 1.5; features 2 and 3 never fire -> 2 / 5
    x = torch.zeros(4, 3)
    s = LevelStats(5)
    s.update(x[:3], acts[:3], x[:3])
    s.update(x[3:], acts[3:], x[3:])
    r = s.result()
    assert r["l0"] == pytest.approx(1.5)
    assert r["dead_frac"] == pytest.approx(0.4)
    assert s.fire_counts.tolist() == [1, 2, 0, 0, 3]
    assert r["mse"] == 0.0


def test_mse_by_hand() -> None:
    # errors (1, 2) and (0, 3): squared sums 5 and 9, mean over tokens 7
    x = t([[1.0, 2.0], [0.0, 3.0]])
    s = LevelStats(1)
    s.update(x, torch.zeros(2, 1), torch.zeros(2, 2))
    assert s.result()["mse"] == pytest.approx(7.0)


def test_fve_streamed_equals_one_shot_and_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g) * 2 + 3
    recon = x + 0.5 * torch.randn(50, 8, generator=g)
    acts = torch.ones(50, 1)
    one, two = LevelStats(1), LevelStats(1)
    one.update(x, acts, recon)
    two.update(x[:17], acts[:17], recon[:17])
    two.update(x[17:], acts[17:], recon[17:])
    xn, rn = x.double().numpy(), recon.double().numpy()
    direct = 1 - ((xn - rn) ** 2).sum() / ((xn - xn.mean(axis=0)) ** 2).sum()
    assert one.result()["fve"] == pytest.approx(direct, abs=1e-12)
    assert two.result()["fve"] == pytest.approx(direct, abs=1e-12)
    assert two.result()["mse"] == pytest.approx(((xn - rn) ** 2).sum(axis=1).mean())


def test_fve_perfect_is_one_and_mean_is_zero() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, generator=g, dtype=torch.float64) + 100.0
    acts = torch.ones(20, 1)
    perfect, mean = LevelStats(1), LevelStats(1)
    x_bar = x.mean(dim=0, keepdim=True).expand_as(x)
    for sl in (slice(0, 7), slice(7, 20)):
        perfect.update(x[sl], acts[sl], x[sl])
        mean.update(x[sl], acts[sl], x_bar[sl])
    assert perfect.result()["fve"] == 1.0
    assert mean.result()["fve"] == pytest.approx(0.0, abs=1e-10)


def test_low_precision_inputs() -> None:
    x = t([[1.0, 2.0], [3.0, 5.0]]).to(torch.bfloat16)
    acts = t([[0.0, 1.0], [1.0, 1.0]]).to(torch.float16)
    s = LevelStats(2)
    s.update(x, acts, x)
    r = s.result()
    assert r["fve"] == 1.0 and r["l0"] == 1.5


# Tree: n = [3, 4, 6]
#   parents[0] (level 1 -> 0): [0, 1, 0, -1]   child counts of level 0: [2, 1, 0]
#   parents[1] (level 2 -> 1): [0, 0, 0, 2, -1, 3]   child counts of level 1: [3, 0, 1, 1]
#   depths: level 1 = [1, 0, 1, 1]; level 0: f0 -> max(1, 1) + 1 = 2, f1 -> 0 + 1 = 1, f2 -> 0
TREE_PARENTS = [torch.tensor([0, 1, 0, -1]), torch.tensor([0, 0, 0, 2, -1, 3])]


def test_tree_stats_by_hand() -> None:
    r = TreeStats(TREE_PARENTS, [3, 4, 6]).result()
    assert r["n_assigned"] == [3, 5]
    assert r["assigned_frac"] == pytest.approx([3 / 4, 5 / 6])
    assert r["n_unassigned"] == [1, 1]
    p0, p1 = r["pairs"]
    assert p0 == {
        "parents_with_children": 2,
        "branching_hist": [1, 1, 1],
        "branching_mean": 1.5,
        "branching_max": 2,
    }
    assert p1["parents_with_children"] == 3
    assert p1["branching_hist"] == [1, 2, 0, 1]
    assert p1["branching_mean"] == pytest.approx(5 / 3)
    assert p1["branching_max"] == 3
    assert r["roots_with_children"] == 2
    assert r["depth_hist"] == [1, 1, 1]
    assert r["max_depth"] == 2
    json.dumps(r)


def test_invalid_parents_rejected() -> None:
    with pytest.raises(ValueError):
        PairStats([0, 3], n_parents=3)
    with pytest.raises(ValueError):
        TreeStats([torch.tensor([0, 0])], [2, 3])


def test_evaluate_keys_summaries_and_json() -> None:
    # level 0 = COND parents' level, level 1 = COND children, level 2 unlinked (all -1)
    acts2 = t([[1, 0], [0, 0], [0, 1], [0, 0]])
    x = t([[1, 0], [0, 1], [1, 1], [2, 0]])
    parents = [torch.tensor(COND_PARENTS), torch.full((2,), -1)]
    batches = [
        (x[i : i + 2], [COND_P[i : i + 2], COND_C[i : i + 2], acts2[i : i + 2]], [x[i : i + 2]] * 3)
        for i in (0, 2)
    ]
    r = evaluate(batches, parents)
    assert len(r["levels"]) == 3 and len(r["pairs"]) == 2
    assert r["n_tokens"] == 4
    assert r["fve"] == [1.0, 1.0, 1.0]
    assert r["l0"] == pytest.approx([5 / 4, 5 / 4, 2 / 4])
    # pair 0 Hamming: OR(c0,c1) = 1,1,1,0 vs P0 = 1,1,0,1 -> t2, t3;
    # OR(c2) = 0,0,0,0 vs P1 = 0,1,1,0 -> t1, t2; OR(c3) = 0,0,0,1 vs P2 = 0 -> t3
    # per token 0, 1, 2, 2 -> 5 / 4; pair 1 has no links -> undefined (NaN), not a
    # perfect 0, and left out of the summary like its P(p|c)
    assert r["pairs"][0]["hamming"] == pytest.approx(1.25)
    assert math.isnan(r["pairs"][1]["hamming"])
    assert r["hamming"] == pytest.approx(1.25)
    assert r["n_links"] == [4, 0]
    # NaN of the unlinked pair is ignored in the summary
    assert r["p_parent_given_child"] == pytest.approx(COND_PGC)
    assert r["p_child_given_parent"] == pytest.approx(COND_CGP)
    assert set(r["levels"][0]) >= {"l0", "fve", "mse", "dead_frac"}
    assert set(r["pairs"][0]) >= {
        "hamming",
        "p_parent_given_child",
        "p_child_given_parent",
        "n_edges",
    }
    assert r["tree"]["n_features"] == [3, 4, 2]
    json.loads(json.dumps(r))


def test_single_level_and_nanmean() -> None:
    x = t([[1, 0], [0, 1]])
    r = evaluate([(x, [torch.ones(2, 3)], [x])], [])
    assert r["pairs"] == [] and math.isnan(r["hamming"])
    assert r["tree"]["depth_hist"] == [3]
    assert nanmean([float("nan"), 1.0, 3.0]) == 2.0
    with pytest.raises(ValueError):
        evaluate([], [])
    ev = Evaluator([], [3])
    assert ev.result()["n_tokens"] == 0


# ----------------------------------------------------------------------------- copies


def test_copy_measures_on_a_hand_built_pair() -> None:
    """Parents p0 (tokens 0-3) and p1 (tokens 4-7); children c0 -> p0 fires on p0's tokens
    along p0's direction (a copy: cos 1, Jaccard 1), c1 -> p0 fires on tokens 0-1 along
    another direction (cos 0), c2 -> p1 fires on tokens 4-5 along p1's direction (cos 1,
    Jaccard 0.5: a refinement, not a copy). By hand:
    copy share 1/3; P(c|p) 2/3 over all links, (1/2 + 1/2)/2 = 1/2 over non-copy links;
    P(p|c) 1 either way; Hamming 2/8 (p1 misses children on tokens 6, 7) over all links,
    4/8 over non-copy links (p0 without its copy also misses tokens 2, 3)."""
    on = lambda tokens: torch.tensor([1.0 if t in tokens else 0.0 for t in range(8)])  # noqa: E731
    parent_acts = torch.stack([on({0, 1, 2, 3}), on({4, 5, 6, 7})], dim=1)
    child_acts = torch.stack([on({0, 1, 2, 3}), on({0, 1}), on({4, 5})], dim=1)
    eye = torch.eye(3)
    decoders = [eye[:2], torch.stack([eye[0], eye[2], eye[1]])]
    parents = [torch.tensor([0, 0, 1])]
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))

    def batches():
        yield x, [parent_acts, child_acts], [x, x]

    report = evaluate_with_copies(batches, parents, [2, 3], decoders)
    pair = report["pairs"][0]
    assert pair["n_copies"] == 1
    assert report["copy_share"] == pytest.approx(1 / 3)
    assert pair["p_child_given_parent"] == pytest.approx(2 / 3)
    assert pair["p_child_given_parent_noncopy"] == pytest.approx(1 / 2)
    assert pair["p_parent_given_child_noncopy"] == pytest.approx(1.0)
    assert report["hamming"] == pytest.approx(2 / 8)
    assert report["noncopy"]["hamming"] == pytest.approx(4 / 8)
    assert report["noncopy"]["p_child_given_parent"] == pytest.approx(1 / 2)
    assert report["noncopy"]["n_edges"] == [2]


def test_high_cosine_alone_or_jaccard_alone_is_not_a_copy() -> None:
    """cos 1 with Jaccard 0.5, and Jaccard 1 with cos 0: neither is a copy."""
    both = torch.ones(4, 1)
    half = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
    stats = PairStats(torch.tensor([0, 0]), 1, edge_cosine=torch.tensor([1.0, 0.0]))
    stats.update(both, torch.cat([half, both], dim=1))
    assert stats.result()["n_copies"] == 0
    assert stats.result()["copy_share"] == 0.0


def test_firing_match_f1_by_hand() -> None:
    """Two true features over 4 tokens: t0 fires on tokens 0, 1; t1 on token 2. Latent 0
    fires on 0, 1 (F1 1 with t0), latent 1 on 1, 2 (F1 1/2 with t0, 2/3 with t1). Best F1:
    t0 1, t1 2/3; recovered at F1 >= 0.8: t0 only."""
    true = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=torch.bool)
    acts = torch.tensor([[0.5, 0.0], [1.0, 2.0], [0.0, 1.0], [0.0, 0.0]])
    match = FiringMatch(2, [2])
    match.update(true[:2], [acts[:2]])  # two batches: counts add up
    match.update(true[2:], [acts[2:]])
    out = match.result()
    assert out["f1_recovered"] == [1]
    assert out["f1_mean"] == [pytest.approx((1 + 2 / 3) / 2)]
