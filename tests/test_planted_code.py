"""The planted-code diagnostic (benchmarks/planted_code.py): its pursuit against SAE Lens's
own, its support restriction, and its cut of the true code, on hand-built cases."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from planted_code import first_k, pursuit  # noqa: E402


def test_pursuit_equals_sae_lens_matching_pursuit():
    from sae_lens.saes.matching_pursuit_sae import _encode_matching_pursuit

    torch.manual_seed(0)
    dictionary = torch.nn.functional.normalize(torch.randn(64, 16), dim=1)
    x = torch.rand(200, 64).pow(8) @ dictionary  # a few large codes per row, coherent rows
    for k in (1, 3, 12):
        expected = _encode_matching_pursuit(x, dictionary, 0.0, k, True)
        torch.testing.assert_close(pursuit(x, dictionary, k), expected)


def test_pursuit_within_a_support_never_leaves_it():
    torch.manual_seed(1)
    dictionary = torch.nn.functional.normalize(torch.randn(32, 8), dim=1)
    x = torch.randn(50, 8)
    allowed = torch.rand(50, 32) < 0.2
    allowed[0] = False  # nothing allowed: nothing picked
    acts = pursuit(x, dictionary, 6, allowed)
    assert acts[~allowed].abs().max() == 0
    assert (acts > 0).any()


def test_first_k_keeps_the_first_active_features_of_each_row():
    code = torch.tensor([[0.0, 2.0, 0.0, 1.0, 3.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(first_k(code, 2), expected)
