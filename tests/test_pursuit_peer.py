"""The Matching Pursuit peer of the benchmark (benchmarks/synthetic.py) on hand-built
dictionaries: its levels encode by SAE Lens's own pursuit, and its post-hoc links read the
decoder rows."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from synthetic import PursuitLevels, tied_level  # noqa: E402

from hsae.interop.posthoc import link_levels  # noqa: E402


def pursuit_sae(rows: torch.Tensor, max_iterations: int = 4):
    from sae_lens.saes.matching_pursuit_sae import (
        MatchingPursuitTrainingSAE,
        MatchingPursuitTrainingSAEConfig,
    )

    cfg = MatchingPursuitTrainingSAEConfig(
        d_in=rows.shape[1], d_sae=rows.shape[0], max_iterations=max_iterations,
        residual_threshold=0.0,
    )  # fmt: skip
    sae = MatchingPursuitTrainingSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(rows)
        sae.b_dec.zero_()
    return sae.eval()


def test_levels_encode_an_orthonormal_code_exactly_and_decode_it():
    basis = torch.eye(8)
    levels = PursuitLevels([pursuit_sae(basis[:4]), pursuit_sae(basis)])
    x = torch.tensor([[2.0, 0, 0, 1.5, 0, 0, 0.5, 0]])
    coarse, fine = levels.encode(x)
    assert levels.sizes == (4, 8)
    torch.testing.assert_close(fine, x)  # each step takes the largest remaining coordinate
    torch.testing.assert_close(coarse, x[:, :4])
    torch.testing.assert_close(levels.decode(fine, 1), x)
    # the coarse level cannot express coordinate 6: its reconstruction leaves it out
    torch.testing.assert_close(levels.decode(coarse, 0), x * (torch.arange(8) < 4))


def test_the_pursuit_stops_at_its_budget():
    levels = PursuitLevels([pursuit_sae(torch.eye(8), max_iterations=2)])
    (code,) = levels.encode(torch.tensor([[3.0, 0, 2.0, 0, 1.0, 0, 0, 0]]))
    assert code.tolist() == [[3.0, 0, 2.0, 0, 0, 0, 0, 0]]


def test_links_join_each_fine_row_to_the_coarse_row_it_points_along():
    coarse = torch.eye(8)[:4]
    # fine rows 0-3: coarse rows 2, 0, 3, 1, each tilted a little; rows 4-5 point elsewhere
    order = [2, 0, 3, 1]
    tilted = torch.nn.functional.normalize(coarse[order] + 0.2 * torch.eye(8)[4:], dim=1)
    fine = torch.cat([tilted, torch.eye(8)[6:]])
    levels = [tied_level(pursuit_sae(coarse)), tied_level(pursuit_sae(fine))]
    torch.testing.assert_close(levels[1].W_enc, fine.T)
    _, (parent,) = link_levels(levels, similarity="decoder", unassigned_quantile=0.0)
    assert parent[:4].tolist() == order
