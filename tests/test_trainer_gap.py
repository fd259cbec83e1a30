"""The trainer-gap harness (benchmarks/trainer_gap.py): its switches do what they say."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from trainer_gap import HSAE_RECIPE, SAE, Recipe, changes_toward, measure, train  # noqa: E402


def test_changes_toward_hsae_are_one_field_each_with_unit_paired_to_its_start() -> None:
    changes = changes_toward(HSAE_RECIPE, Recipe())
    differing = [f.name for f in dataclasses.fields(Recipe)
                 if getattr(HSAE_RECIPE, f.name) != getattr(Recipe(), f.name)]  # fmt: skip
    assert len(changes) == len(differing)
    assert {"unit": True, "init_norm": 1.0} in changes
    assert all(len(c) == 1 for c in changes if "unit" not in c)
    assert changes_toward(Recipe(), Recipe()) == []


@pytest.mark.parametrize("unit", [True, False])
def test_unit_rows_stay_unit_and_free_rows_leave_their_start(unit: bool) -> None:
    rows = torch.randn(2048, 8, generator=torch.Generator().manual_seed(0))
    recipe = dataclasses.replace(Recipe(), unit=unit, init_norm=0.1)
    sae = train(recipe, rows, n=16, target=2.0, steps=3, seed=0)
    norms = sae.W_dec.detach().norm(dim=-1)
    if unit:
        assert torch.allclose(norms, torch.ones(16), atol=1e-5)
    else:
        assert norms.max() < 0.5 and (norms - 0.1).abs().max() > 1e-4


def test_measure_on_an_exact_code() -> None:
    """Identity encoder and decoder, theta 0, rows with 3 positive entries each: every row
    is reconstructed exactly (FVE 1), L0 is 3, and all 8 directions are recovered."""
    gen = torch.Generator().manual_seed(1)
    rows = torch.zeros(512, 8)
    for i in range(512):
        rows[i, torch.randperm(8, generator=gen)[:3]] = torch.rand(3, generator=gen) + 0.5
    eye = torch.eye(8)
    sae = SAE(W_enc=eye, b_enc=torch.zeros(8), W_dec=eye, b_dec=torch.zeros(8),
              theta=torch.zeros(8))  # fmt: skip
    m = measure(sae, rows, eye)
    assert m["fve"] == pytest.approx(1.0) and m["l0"] == 3.0
    assert m["recovered"] == 8 and m["dead"] == 0.0
