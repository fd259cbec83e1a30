"""The Tree SAE peer of the benchmark (benchmarks/tree_sae.py) against hand-built cases."""

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from tree_sae import TreeLevels, TreeSAE, TreeSAEConfig, greedy_quotas  # noqa: E402


def identity_tree(parents: list[int]) -> TreeSAE:
    """Two layers of 4 in d = 8 whose encoder is the identity: feature i reads x[i]."""
    sae = TreeSAE(8, TreeSAEConfig((4, 4), (2, 2), steps=100), seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(8))
        sae.W_dec.copy_(torch.eye(8))
    sae.parent[1] = torch.tensor(parents)
    return sae


def test_the_gate_blocks_a_child_whose_parent_is_silent():
    sae = identity_tree([0, 1, 2, 4])  # feature 7's parent is the root (index 4)
    x = torch.zeros(2, 8)
    x[:, 4] = 5.0  # child of feature 0, far above anything in layer 0
    x[:, 7] = 3.0  # child of the root
    x[0, 0] = 1.0  # the parent fires on row 0 only
    x[1, 0] = -1.0
    _, latents = sae.encode(x)
    assert latents[0, 4] == 5.0 and latents[1, 4] == 0.0
    assert latents[0, 7] == 3.0 and latents[1, 7] == 3.0


def test_no_child_fires_without_its_parent_on_random_rows():
    sae = identity_tree([0, 1, 2, 3])
    _, latents = sae.encode(torch.randn(512, 8))
    child = latents[:, 4:] > 0
    parent = latents[:, :4] > sae.cfg.fire_threshold
    assert child.any()  # the gate leaves children that may fire
    assert not (child & ~parent).any()


def test_each_layer_keeps_its_own_top_k_and_the_loss_sums_cumulative_reconstructions():
    sae = identity_tree([4, 4, 4, 4])  # every child hangs from the root: no gate
    x = torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0]])
    _, latents = sae.encode(x)
    assert latents.tolist() == [[4.0, 3.0, 0, 0, 0, 0, 3.0, 4.0]]
    first, full = sae.cumulative(latents)
    assert first.tolist() == [[4.0, 3.0, 0, 0, 0, 0, 0, 0]]
    assert full.tolist() == latents.tolist()
    loss, _ = sae.loss(x)
    var = x.var()
    expected = (first - x).pow(2).mean() / var + (full - x).pow(2).mean() / var
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def best_min_payoff(capacity: list[float], n: int) -> float:
    """max over every split of n children of min_p C_p / k_p (over parents given any)."""
    best = 0.0
    for split in itertools.product(range(n + 1), repeat=len(capacity)):
        if sum(split) == n:
            best = max(best, min(c / k for c, k in zip(capacity, split) if k))
    return best


@pytest.mark.parametrize("capacity", [[6.0, 3.0, 1.0], [0.7, 2.9, 1.3, 0.2]])
def test_greedy_quotas_maximise_the_smallest_share(capacity):
    n = 5
    quotas = greedy_quotas(torch.tensor(capacity), n, torch.ones(len(capacity), dtype=torch.bool))
    assert int(quotas.sum()) == n
    got = min(c / k for c, k in zip(capacity, quotas.tolist()) if k)
    assert got == pytest.approx(best_min_payoff(capacity, n))


def test_greedy_quotas_spread_uniformly_when_no_parent_has_capacity():
    quotas = greedy_quotas(torch.zeros(3), 5, torch.tensor([True, False, True]))
    assert quotas.tolist() == [3, 0, 2]


def test_levels_link_each_new_feature_to_its_allocated_parent():
    sae = identity_tree([0, 4, 2, 3])
    levels = TreeLevels(sae, scale=1.0)
    assert levels.sizes == (4, 8)
    (parent,) = levels.parents()
    assert parent.tolist() == [-1, -1, -1, -1, 0, -1, 2, 3]


def test_layers_for_the_benchmark_levels_split_the_l0_in_the_authors_ratio():
    cfg = TreeSAEConfig.for_levels((256, 512, 1024, 2048), target_l0=12, steps=1000)
    assert cfg.features_per_layer == (256, 256, 512, 1024)
    assert cfg.k_per_layer == (8, 2, 1, 1)  # 12 * (21, 5, 4, 2) / 32 = 7.9, 1.9, 1.5, 0.75
    assert TreeSAEConfig.for_levels((1, 2, 3, 4), 32, 10).k_per_layer == (21, 5, 4, 2)
