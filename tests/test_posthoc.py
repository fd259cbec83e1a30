"""`hsae posthoc` over SAEs built and saved by SAE Lens itself: the planted parent of each
child is found, the imported levels encode exactly as SAE Lens does, and the forest is
measured by `hsae eval`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hsae.cli import main
from hsae.trained import TrainedHSAE

sae_lens = pytest.importorskip("sae_lens")
D = 16


def _unit(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True)


def _save(sae, weights: dict, path) -> None:
    with torch.no_grad():
        for name, value in weights.items():
            getattr(sae, name).copy_(value)
    sae.save_model(str(path))


@pytest.fixture
def sae_dirs(tmp_path):
    """A JumpReLU SAE of 8 features and a standard SAE of 24 whose feature j is a noisy
    copy of feature j // 3 of the first: the planted parent of child j is j // 3."""
    gen = torch.Generator().manual_seed(0)
    coarse = _unit(torch.randn(8, D, generator=gen))
    fine = _unit(coarse.repeat_interleave(3, 0) + 0.05 * torch.randn(24, D, generator=gen))
    small = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D, d_sae=8))
    _save(small, {"W_enc": coarse.T, "W_dec": coarse, "b_enc": torch.zeros(8),
                  "b_dec": 0.1 * torch.ones(D), "threshold": torch.full((8,), 0.5)},
          tmp_path / "small")  # fmt: skip
    big = sae_lens.StandardSAE(
        sae_lens.StandardSAEConfig(d_in=D, d_sae=24, apply_b_dec_to_input=False)
    )
    _save(big, {"W_enc": fine.T, "W_dec": fine, "b_enc": -0.3 * torch.ones(24),
                "b_dec": 0.2 * torch.ones(D)}, tmp_path / "big")  # fmt: skip
    return [tmp_path / "small", tmp_path / "big"], (small, big)


def test_posthoc_finds_planted_parents_and_encodes_like_sae_lens(tmp_path, sae_dirs, capsys):
    dirs, saes = sae_dirs
    out = tmp_path / "forest"
    args = ["posthoc", *map(str, dirs), "--out", str(out), "--unassigned_quantile", "0"]
    assert main(args) == 0
    parents = json.loads((out / "hierarchy.json").read_text())["parents"][1]
    assert parents == [j // 3 for j in range(24)]

    model = TrainedHSAE.load(out).model
    x = torch.randn(256, D) * 2
    with torch.no_grad():
        ours = model.encode(x)  # scale 1: raw activations
        for level, sae in enumerate(saes):
            assert torch.allclose(ours[level], sae.encode(x), atol=1e-5)
            assert (ours[level] > 0).any()

    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(0).normal(size=(2048, D)).astype(np.float32))
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(acts), "--eval_tokens", "1024"]) == 0
    assert "Hamming" in capsys.readouterr().out


def test_posthoc_refuses_bad_input(tmp_path, sae_dirs, capsys):
    dirs, _ = sae_dirs
    out = tmp_path / "forest"
    assert main(["posthoc", str(dirs[1]), str(dirs[0]), "--out", str(out)]) == 2  # shrinking
    assert "strictly increasing" in capsys.readouterr().err
    assert main(["posthoc", str(dirs[0]), str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
    assert not out.exists()


def test_posthoc_replaces_a_forest_only_when_told(tmp_path, sae_dirs, capsys):
    dirs, _ = sae_dirs
    out = tmp_path / "forest"
    argv = ["posthoc", *map(str, dirs), "--out", str(out)]
    assert main(argv) == 0
    before = (out / "hierarchy.json").read_bytes()
    (out / "mine.txt").write_text("not hsae's")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "hierarchy.json").read_bytes() == before
    (out / "mine.txt").unlink()
    assert main([*argv, "--overwrite", "--tree", "full"]) == 0
