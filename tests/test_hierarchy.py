"""Parent assignment, similarities and the hierarchy update, on hand-built cases."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load, save

from hsae.config import HSAEConfig
from hsae.interop.posthoc import link_by_firing, link_levels
from hsae.method.hierarchy import (
    Hierarchy,
    assign_parents,
    children_lists,
    conditional_similarity,
    has_children,
    pair_counts,
    similarity,
)
from hsae.method.model import HSAE
from hsae.trained_dir import LevelWeights

torch.set_num_threads(1)


def _distinct_S(n_c: int, n_p: int, seed: int) -> torch.Tensor:
    """A similarity matrix without ties (a random permutation of distinct values)."""
    gen = torch.Generator().manual_seed(seed)
    vals = torch.linspace(-1, 1, n_c * n_p)[torch.randperm(n_c * n_p, generator=gen)]
    return vals.reshape(n_c, n_p)


# ----- assign_parents --------------------------------------------------------------------


@pytest.mark.parametrize(("n_c", "q"), [(10, 0.2), (10, 0.25), (17, 0.2), (23, 0.5), (7, 0.1)])
def test_partial_leaves_the_lowest_floor_q_n_unassigned(n_c: int, q: float) -> None:
    S = _distinct_S(n_c, 4, seed=n_c)
    parent = assign_parents(S, "partial", q)
    k = math.floor(q * n_c)
    best, arg = S.max(dim=1)
    lowest = set(torch.argsort(best)[:k].tolist())
    assert {j for j in range(n_c) if parent[j] == -1} == lowest
    for j in range(n_c):
        if j not in lowest:
            assert parent[j] == arg[j]


def test_partial_on_a_hand_written_matrix() -> None:
    S = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # best 0.9 -> 0
            [0.2, 0.3, 0.1],  # best 0.3 (lowest) -> -1
            [0.0, 0.5, 0.8],  # best 0.8 -> 2
            [0.4, 0.6, 0.2],  # best 0.6 -> 1
            [0.35, 0.1, 0.0],  # best 0.35 (second lowest) -> -1
            [0.1, 0.7, 0.65],  # best 0.7 -> 1
            [0.5, 0.45, 0.2],  # best 0.5 -> 0
            [0.0, 0.1, 0.95],  # best 0.95 -> 2
            [0.55, 0.0, 0.0],  # best 0.55 -> 0
            [0.3, 0.2, 0.4],  # best 0.4 -> 2
        ]
    )
    assert assign_parents(S, "partial", 0.2).tolist() == [0, -1, 2, 1, -1, 1, 0, 2, 0, 2]
    # full: quantile ignored, every child gets its argmax
    assert assign_parents(S, "full", 0.2).tolist() == [0, 1, 2, 1, 0, 1, 0, 2, 0, 2]
    assert children_lists(assign_parents(S, "full", 0.2), 3) == [[0, 4, 6, 8], [1, 3, 5], [2, 7, 9]]


def test_full_tree_assigns_everybody_to_the_argmax() -> None:
    S = _distinct_S(31, 5, seed=2)
    for q in (0.0, 0.2, 0.9):
        parent = assign_parents(S, "full", q)
        assert torch.equal(parent, S.argmax(dim=1))


def test_binary_greedy_by_similarity_known_by_hand() -> None:
    """Rows permuted so that index order differs from similarity order.

    Greedy in decreasing best similarity: c(0.9) -> p0, c(0.8) -> p0 (p0 full),
    c(0.7) prefers p0, full -> p1 (0.6), c(0.5) prefers p0, full -> p1 (0.4) (p1 full),
    c(0.35): no room anywhere -> -1 (5 children, capacity 2 x 2)."""
    rows = {
        "a": [0.9, 0.1],
        "b": [0.8, 0.2],
        "c": [0.7, 0.6],
        "d": [0.5, 0.4],
        "e": [0.3, 0.35],
    }
    order = ["e", "c", "a", "d", "b"]
    S = torch.tensor([rows[k] for k in order])
    want = {"a": 0, "b": 0, "c": 1, "d": 1, "e": -1}
    got = assign_parents(S, "binary", 0.0).tolist()
    assert got == [want[k] for k in order]
    # The plain argmax would give p0 four children: the cap is what changed it.
    assert (S.argmax(1) == 0).sum() == 4


def test_binary_greedy_is_not_index_order() -> None:
    """Two children want p0; the more similar one (higher index) wins it."""
    S = torch.tensor([[0.5, 0.4], [0.6, 0.1], [0.9, 0.0]])
    # greedy: c2 (0.9) -> p0, c1 (0.6) -> p0, c0 (0.5) -> p0 full -> p1
    assert assign_parents(S, "binary", 0.0).tolist() == [1, 0, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_caps_children_and_keeps_quantile_unassigned(seed: int) -> None:
    n_c, n_p, q = 40, 8, 0.2
    S = _distinct_S(n_c, n_p, seed)
    parent = assign_parents(S, "binary", q)
    counts = torch.bincount(parent[parent >= 0], minlength=n_p)
    assert counts.max() <= 2
    lowest = torch.argsort(S.max(1).values)[: math.floor(q * n_c)]
    assert (parent[lowest] == -1).all()
    # 32 eligible children, 16 places: every place is taken
    assert counts.sum() == 2 * n_p


# ----- similarity ------------------------------------------------------------------------


def _tiny_model() -> HSAE:
    """d = 3, parents (level 0) 2 features, children (level 1) 3 features."""
    model = HSAE(3, (2, 3), bandwidth=0.05)
    with torch.no_grad():
        # encoder columns; norms differ on purpose (cosines must normalise)
        model.W_enc[0].copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
        model.W_enc[1].copy_(torch.tensor([[2.0, 0.0, -1.0], [1.0, 3.0, 0.0], [0.0, 1.0, 1.0]]))
        # decoder rows: chosen so that the decoder picks the other parent for child 0 and 1
        model.W_dec[0].copy_(torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
        model.W_dec[1].copy_(torch.tensor([[0.8, 0.0, 0.6], [0.0, 0.6, 0.8], [0.6, 0.8, 0.0]]))
    return model


def test_encoder_similarity_equals_hand_cosines() -> None:
    model = _tiny_model()
    S = similarity(model, 0, "encoder")
    s5, s10, s2 = math.sqrt(5), math.sqrt(10), math.sqrt(2)
    want = torch.tensor([[2 / s5, 1 / s5], [0.0, 3 / s10], [-1 / s2, 0.0]])
    assert torch.allclose(S, want, atol=1e-6)
    assert assign_parents(S, "full", 0.0).tolist() == [0, 1, 1]


def test_decoder_similarity_equals_hand_cosines() -> None:
    model = _tiny_model()
    S = similarity(model, 0, "decoder")
    want = torch.tensor([[0.6, 0.8], [0.8, 0.0], [0.0, 0.6]])
    assert torch.allclose(S, want, atol=1e-6)
    assert assign_parents(S, "full", 0.0).tolist() == [1, 0, 1]
    # a cosine: scaling a row changes nothing
    with torch.no_grad():
        model.W_dec[1][2].mul_(3.0)
    assert torch.allclose(similarity(model, 0, "decoder"), want, atol=1e-6)


def test_unknown_similarity_and_missing_statistics_raise() -> None:
    model = _tiny_model()
    with pytest.raises(ValueError):
        similarity(model, 0, "coactivation")
    with pytest.raises(ValueError):
        similarity(model, 0, "bogus")


def test_observe_is_an_ema_of_the_joint_firing_fraction() -> None:
    cfg = HSAEConfig(sizes=(2, 3), target_l0=1.0, similarity="coactivation", coact_momentum=0.75)
    hier = Hierarchy(cfg)
    # 4 tokens. Parent 0 fires on t0, t1; parent 1 on t2.
    a0 = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    # child 0 fires on t0; child 1 on t2; child 2 on t2, t3
    a1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 5.0]])
    J1 = torch.tensor([[0.25, 0.0], [0.0, 0.25], [0.0, 0.25]])  # [child, parent]
    hier.observe([a0, a1])
    assert torch.allclose(hier.coact[0], 0.25 * J1)  # EMA from 0: (1 - m) * J1

    # second batch: parent 0 fires on all, parent 1 on t3; child 2 on t0, t1, t3
    b0 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    b1 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    J2 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.75, 0.25]])
    hier.observe([b0, b1])
    assert torch.allclose(hier.coact[0], 0.75 * 0.25 * J1 + 0.25 * J2)

    # the update takes the argmax of these statistics (partial quantile 0.2 * 3 -> 0 left out)
    hier.update(_tiny_model())
    assert hier.parents[0].tolist() == [0, 1, 0]


# ----- Hierarchy.update ------------------------------------------------------------------


def _cfg(tree: str) -> HSAEConfig:
    """The paper's method: its tree variants act on the encoder-cosine rule."""
    return HSAEConfig(
        sizes=(6, 12, 20), target_l0=2.0, method="paper", tree=tree, unassigned_quantile=0.2
    )


def _permute_level0(model: HSAE, perm: torch.Tensor) -> None:
    """New feature k of level 0 is old feature perm[k] (encoder and decoder)."""
    with torch.no_grad():
        model.W_enc[0].copy_(model.W_enc[0][:, perm].clone())
        model.W_dec[0].copy_(model.W_dec[0][perm].clone())


def _expected_after_permutation(old: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    inv = torch.argsort(perm)
    return torch.where(old >= 0, inv[old.clamp(min=0)], old)


def test_fixed_tree_freezes_after_first_update() -> None:
    cfg = _cfg("fixed")
    model = HSAE(8, cfg.sizes, bandwidth=0.05, seed=3)
    hier = Hierarchy(cfg)
    assert all((p == -1).all() for p in hier.parents)  # no links before the first update
    hier.update(model)
    first = [p.clone() for p in hier.parents]
    assert all((p >= 0).any() for p in first)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    _permute_level0(model, perm)
    # the weights changed so that an unfrozen update would move parents...
    want = _expected_after_permutation(first[0], perm)
    assert not torch.equal(want, first[0])
    hier.update(model)
    for p, q in zip(hier.parents, first, strict=True):
        assert torch.equal(p, q)


def test_partial_tree_follows_the_weights() -> None:
    cfg = _cfg("partial")
    model = HSAE(8, cfg.sizes, bandwidth=0.05, seed=3)
    hier = Hierarchy(cfg)
    hier.update(model)
    first = [p.clone() for p in hier.parents]
    assert [(p == -1).sum().item() for p in first] == [math.floor(0.2 * 12), math.floor(0.2 * 20)]
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    _permute_level0(model, perm)
    hier.update(model)
    assert torch.equal(hier.parents[0], _expected_after_permutation(first[0], perm))
    assert not torch.equal(hier.parents[0], first[0])
    assert torch.equal(hier.parents[1], first[1])  # level 1 -> 2 unchanged
    assert torch.equal(hier.has_children(0), has_children(hier.parents[0], cfg.sizes[0]))


def test_state_round_trip() -> None:
    cfg = HSAEConfig(sizes=(4, 7, 11), target_l0=2.0, similarity="coactivation", tree="fixed")
    model = HSAE(5, cfg.sizes, bandwidth=0.05, seed=1)
    model.init_from_data(torch.randn(200, 5, generator=torch.Generator().manual_seed(0)), 2.0)
    hier = Hierarchy(cfg)
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hier.observe(model.encode(x))
    hier.update(model)
    assert hier.frozen

    blob = save({k: v.contiguous() for k, v in hier.state_tensors().items()})
    other = Hierarchy(cfg)
    other.load_state_tensors(load(blob), frozen=hier.frozen)
    assert other.frozen
    for a, b in zip(hier.parents, other.parents, strict=True):
        assert torch.equal(a, b) and a.dtype == b.dtype
    for a, b in zip(hier.coact, other.coact, strict=True):
        assert torch.equal(a, b)
    assert any((c > 0).any() for c in other.coact)
    # the restored hierarchy behaves like the original: frozen, and keeps observing
    with torch.no_grad():
        acts = model.encode(x)
    hier.observe(acts)
    other.observe(acts)
    for a, b in zip(hier.coact, other.coact, strict=True):
        assert torch.allclose(a, b)


# ----- the conditional rule ---------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_counts_equal_the_dense_product(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    child = torch.rand(50, 13, generator=gen) < 0.2
    parent = torch.rand(50, 7, generator=gen) < 0.3
    child[3] = False  # a token where no child fires
    expected = child.double().T @ parent.double()
    assert torch.equal(pair_counts(child, parent).double(), expected)


def _conditional_case() -> tuple[HSAE, list[torch.Tensor]]:
    """3 parents, 4 children over 10 tokens, worked out by hand:
    - child 0 fires on t0-t3, parent 1 on t0-t5: P(p1 | c0) = 1 (its parent);
    - child 1 fires on t6-t9, parent 0 on t6, t7 only: P(p0 | c1) = 0.5 < 0.8 (none);
    - child 2 is parent 2 learned again: same decoder row, same tokens t8, t9 (a copy,
      excluded); no other parent fires with it, so it gets -1;
    - child 3 fires on t4, t5, inside parent 1's tokens: its parent is 1."""
    model = HSAE(4, (3, 4), bandwidth=0.5, seed=0)
    with torch.no_grad():
        model.W_dec[0].copy_(torch.eye(4)[:3])
        model.W_dec[1].copy_(torch.tensor([[0, 0, 0, 1.0], [0, 0, 0, 1.0], [0, 0, 1.0, 0],
                                           [0, 0, 0, 1.0]]))  # fmt: skip
    a0 = torch.zeros(10, 3)
    a0[0:6, 1] = 1.0
    a0[6:8, 0] = 1.0
    a0[8:10, 2] = 1.0
    a1 = torch.zeros(10, 4)
    a1[0:4, 0] = 1.0
    a1[6:10, 1] = 1.0
    a1[8:10, 2] = 1.0
    a1[4:6, 3] = 1.0
    return model, [a0, a1]


def test_conditional_rule_links_true_parents_and_refuses_copies() -> None:
    model, acts = _conditional_case()
    cfg = HSAEConfig(sizes=(3, 4), target_l0=1.0, similarity="conditional", link_threshold=0.8)
    hier = Hierarchy(cfg)
    hier.observe(acts[:1] + acts[1:])  # one batch of 10 tokens
    assert hier.fires is not None and hier.fires[1].tolist() == [4, 4, 2, 2]
    hier.update(model)
    assert hier.parents[0].tolist() == [1, -1, -1, 1]
    # the counts restart after an update: a second update without new tokens links nobody
    hier.update(model)
    assert hier.parents[0].tolist() == [-1, -1, -1, -1]


def test_the_method_picks_the_link_rule() -> None:
    """On the hand case with tied encoders (W_enc = W_dec^T), the paper's method links
    child 2 to its copy, parent 2 (encoder cosine 1); the default method (hsae) links by
    P(p|c) and refuses the copy. An explicit --model.similarity overrides either."""
    model, acts = _conditional_case()
    with torch.no_grad():
        for level in range(2):
            model.W_enc[level].copy_(model.W_dec[level].T)
    linked = {}
    for name, cfg in {
        "hsae": HSAEConfig(sizes=(3, 4), target_l0=1.0),
        "paper": HSAEConfig(sizes=(3, 4), target_l0=1.0, method="paper"),
        "paper, conditional": HSAEConfig(
            sizes=(3, 4), target_l0=1.0, method="paper", similarity="conditional"
        ),
    }.items():
        hier = Hierarchy(cfg)
        hier.observe(acts)
        hier.update(model)
        linked[name] = hier.parents[0].tolist()
    assert linked["paper"][2] == 2
    assert linked["hsae"] == linked["paper, conditional"] == [1, -1, -1, 1]


def test_conditional_rule_without_the_copy_check_would_link_the_copy() -> None:
    """The control: child 2's best parent by P(p|c) alone is its copy (1.0)."""
    model, acts = _conditional_case()
    both = pair_counts(acts[1] > 0, acts[0] > 0).float()
    n_c, n_p = (acts[1] > 0).sum(0).float(), (acts[0] > 0).sum(0).float()
    raw = both / n_c[:, None]
    assert raw[2].argmax() == 2 and raw[2, 2] == 1.0
    S = conditional_similarity(model, 0, both, n_c, n_p)
    assert S[2, 2] == -1.0 and S[0, 1] == 1.0 and S[1, 0] == 0.5


def test_conditional_rule_excludes_dead_parents() -> None:
    model, acts = _conditional_case()
    acts[0][:, 0] = 0.0  # parent 0 never fires
    both = pair_counts(acts[1] > 0, acts[0] > 0).float()
    n_c, n_p = (acts[1] > 0).sum(0).float(), (acts[0] > 0).sum(0).float()
    assert (conditional_similarity(model, 0, both, n_c, n_p)[:, 0] == -1.0).all()


def test_conditional_state_round_trip() -> None:
    model, acts = _conditional_case()
    cfg = HSAEConfig(sizes=(3, 4), target_l0=1.0, similarity="conditional")
    hier = Hierarchy(cfg)
    hier.observe(acts)
    other = Hierarchy(cfg)
    other.load_state_tensors(load(save(hier.state_tensors())), frozen=False)
    hier.update(model)
    other.update(model)
    assert torch.equal(hier.parents[0], other.parents[0])


def _nested_parents_case() -> tuple[HSAE, list[torch.Tensor]]:
    """Two candidate parents, one broad and one inside it, and three children, 10 tokens.

    - parent 0 fires on t0-t6 (not dense: 70 % of the tokens), parent 1 on t0-t3 (inside
      parent 0);
    - child 0 fires on t0, t1: both parents score P(p|c) = 1; P(c|p) is 2/7 for parent 0
      and 0.5 for parent 1, the most specific;
    - child 1 fires on t1-t5: P(p|c) is 1 for parent 0 and 0.6 for parent 1, which is
      not eligible though its P(c|p), 0.75, is higher than parent 0's 5/7;
    - child 2 fires on t0-t3 along parent 1's direction: a copy of parent 1, no candidate.
    """
    model = HSAE(4, (2, 3), bandwidth=0.5, seed=0)
    eye = torch.eye(4)
    with torch.no_grad():
        model.W_dec[0].copy_(eye[:2])
        model.W_dec[1].copy_(torch.stack([eye[2], eye[3], eye[1]]))
    parents = torch.zeros(10, 2)
    parents[0:7, 0] = 1.0
    parents[0:4, 1] = 1.0
    children = torch.zeros(10, 3)
    children[0:2, 0] = 1.0
    children[1:6, 1] = 1.0
    children[0:4, 2] = 1.0
    return model, [parents, children]


@pytest.mark.parametrize("pick, expected", [("likely", [0, 0, 0]), ("specific", [1, 0, 0])])
def test_parent_pick_takes_the_most_likely_or_the_most_specific_eligible_parent(
    pick: str, expected: list[int]
) -> None:
    model, acts = _nested_parents_case()
    cfg = HSAEConfig(sizes=(2, 3), target_l0=1.0, similarity="conditional", parent_pick=pick)
    hier = Hierarchy(cfg)
    hier.observe(acts)
    hier.update(model)
    assert hier.parents[0].tolist() == expected


@pytest.mark.parametrize(("parent_tokens", "linked"), [(7, True), (8, False), (10, False)])
def test_a_dense_parent_is_no_candidate(parent_tokens: int, linked: bool) -> None:
    """Two children on t0, t1 under a parent on the first ``parent_tokens`` of 10 tokens:
    P(p|c) = 1 each time, but a parent on at least link_threshold (0.8) of all tokens
    would pass the threshold beside any child, so it takes none."""
    model = HSAE(4, (1, 2), bandwidth=0.5, seed=0)
    with torch.no_grad():
        model.W_dec[0].copy_(torch.eye(4)[:1])
        model.W_dec[1].copy_(torch.eye(4)[1:3])
    parent, children = torch.zeros(10, 1), torch.zeros(10, 2)
    parent[:parent_tokens] = 1.0
    children[:2] = 1.0
    hier = Hierarchy(HSAEConfig(sizes=(1, 2), target_l0=1.0, similarity="conditional"))
    hier.observe([parent, children])
    hier.update(model)
    assert hier.parents[0].tolist() == ([0, 0] if linked else [-1, -1])


def test_the_token_count_travels_with_the_counts_and_older_checkpoints_take_none_as_dense():
    cfg = HSAEConfig(sizes=(1, 2), target_l0=1.0, similarity="conditional")
    hier = Hierarchy(cfg)
    hier.observe([torch.ones(10, 1), torch.zeros(10, 2)])
    state = hier.state_tensors()
    assert float(state["hierarchy.tokens"]) == 10.0
    resumed = Hierarchy(cfg)
    resumed.load_state_tensors(state, frozen=False)
    assert float(resumed.tokens) == 10.0
    del state["hierarchy.tokens"]  # a checkpoint written before the count
    resumed.load_state_tensors(state, frozen=False)
    assert float(resumed.tokens) == float("inf")


def test_link_by_firing_links_a_planted_child_from_raw_rows() -> None:
    """Post-hoc conditional links from rows: level 0 reads e0 and e2, level 1 reads e1 (a
    child that only occurs with e0), e0 again and e2 again (copies). Only the child is
    linked, to e0's latent; the encoder-cosine rule links the copies instead."""
    eye = torch.eye(3)
    level0 = LevelWeights(W_enc=eye[:, [0, 2]], b_enc=torch.zeros(2), W_dec=eye[[0, 2]],
                          b_dec=torch.zeros(3), threshold=torch.full((2,), 0.5))  # fmt: skip
    level1 = LevelWeights(W_enc=eye[:, [1, 0, 2]], b_enc=torch.zeros(3), W_dec=eye[[1, 0, 2]],
                          b_dec=torch.zeros(3), threshold=torch.full((3,), 0.5))  # fmt: skip
    model, by_cosine = link_levels([level0, level1], tree="full")
    rows = torch.stack([eye[0], eye[0] + eye[1], eye[2], eye[0] + eye[1], eye[0], eye[2]])
    parents = link_by_firing(model, [rows[:2], rows[2:]])
    assert parents[0].tolist() == [0, -1, -1]
    assert by_cosine[0].tolist()[1:] == [0, 1]
