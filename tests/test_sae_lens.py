"""Each exported level loads with SAE Lens itself, and its encode and decode on raw
activations equal ours on scaled ones (design §6)."""

from __future__ import annotations

import pytest
import torch

from hsae import pipeline
from hsae.config import HSAEConfig, RunConfig, TrainConfig
from hsae.data.planted import PlantedConfig
from hsae.trained import TrainedHSAE

sae_lens = pytest.importorskip("sae_lens")


def test_sae_lens_loads_every_level_and_agrees(tmp_path):
    cfg = RunConfig(
        model=HSAEConfig(sizes=(16, 32, 64), target_l0=4, update_every=20),
        train=TrainConfig(steps=60, batch_size=256, lr=3e-3, lambda_init=0.1,
                          scale_tokens=1024, checkpoint_every=0, progress=False),
    )  # fmt: skip
    source = pipeline.planted_source(PlantedConfig(d=16, n_trees=3, branching=2, depth=2))
    pipeline.train(cfg, source, tmp_path)
    model = TrainedHSAE.load(tmp_path).model
    assert float(model.scale) != 1.0  # the fold is exercised
    x = next(source.heldout(512, 512, seed=1))  # raw, unscaled activations
    with torch.no_grad():
        ours = model.encode(x * model.scale)
        for level in range(model.n_levels):
            sae = sae_lens.SAE.load_from_disk(str(tmp_path / "model" / f"level_{level}"))
            assert type(sae).__name__ == "JumpReLUSAE"
            acts = sae.encode(x)
            assert (ours[level] > 0).any()  # not vacuous
            assert torch.allclose(acts, ours[level], rtol=1e-5, atol=1e-5)
            ours_recon = model.decode(ours[level], level) / model.scale
            assert torch.allclose(sae.decode(acts), ours_recon, rtol=1e-5, atol=1e-5)
