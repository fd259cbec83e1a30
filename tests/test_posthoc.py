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


# ---------------------------------------------------------------- links from activations
# A co-occurrence forest in d = 8: parent P_a = e_a (a = 0, 1) fires on every row with one
# of its three children, C_3a … C_3a+2 (e_2 … e_7). The directions are orthogonal, so no
# cosine says which parent a child has; only firing does.


def _forest_rows(tmp_path, n: int = 4096, d: int = 8):
    """The rows as a .npy file: e_a + e_{2 + 3a + b}, a and b drawn per row, plus noise."""
    rng = np.random.default_rng(0)
    parent = rng.integers(0, 2, n)
    child = 2 + 3 * parent + rng.integers(0, 3, n)
    x = np.zeros((n, d), dtype=np.float32)
    x[np.arange(n), parent] = 1.0
    x[np.arange(n), child] = 1.0
    x += 0.01 * rng.standard_normal((n, d)).astype(np.float32)
    np.save(tmp_path / "acts.npy", x)
    return tmp_path / "acts.npy"


def _jumprelu(directions: torch.Tensor, threshold: float, path) -> str:
    """A JumpReLU SAE (SAE Lens's own class) whose features are ``directions``."""
    n, d = directions.shape
    sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=d, d_sae=n))
    weights = {"W_enc": directions.T, "W_dec": directions, "b_enc": torch.zeros(n),
               "b_dec": torch.zeros(d), "threshold": torch.full((n,), threshold)}  # fmt: skip
    _save(sae, weights, path)
    return str(path)


def test_posthoc_with_data_links_children_to_the_parent_they_fire_with(tmp_path, capsys):
    acts = _forest_rows(tmp_path)
    eye = torch.eye(8)
    dirs = [_jumprelu(eye[:2], 0.5, tmp_path / "parents"),
            _jumprelu(eye[2:], 0.5, tmp_path / "children")]  # fmt: skip
    assert main(["posthoc", *dirs, "--out", str(tmp_path / "firing"), "--data", str(acts)]) == 0
    printed = capsys.readouterr().out
    assert "links by firing on 3,891 rows" in printed  # 4,096 less the held-out 5 %
    assert "--data" not in printed.splitlines()[-1]  # eval reads the recorded rows
    firing = json.loads((tmp_path / "firing" / "hierarchy.json").read_text())["parents"][1]
    assert firing == [0, 0, 0, 1, 1, 1]

    # Cosine links see orthogonal directions only: they cannot find the pairs.
    assert main(["posthoc", *dirs, "--out", str(tmp_path / "cosine"), "--tree", "full"]) == 0
    cosine = json.loads((tmp_path / "cosine" / "hierarchy.json").read_text())["parents"][1]
    assert cosine != [0, 0, 0, 1, 1, 1]

    capsys.readouterr()
    assert main(["eval", str(tmp_path / "firing"), "--eval_tokens", "205"]) == 0
    assert "Hamming" in capsys.readouterr().out


def test_posthoc_prune_takes_the_parents_from_the_finer_sae(tmp_path, capsys):
    """The coarse SAE holds two blends P_a + C_3a (a flat SAE's absorption), which explain
    a third of the rows (FVE 0 here); the fine SAE holds all eight true features. Pruning
    replaces the blends by the fine SAE's two most energetic features, the parents (each
    on half the rows; FVE 0.25), and the children then link to them; the fine SAE's own
    parents are copies of the kept ones, so they stay unlinked."""
    acts = _forest_rows(tmp_path)
    eye = torch.eye(8)
    blends = _unit(eye[[0, 1]] + eye[[2, 5]])
    dirs = [_jumprelu(blends, 0.8, tmp_path / "blends"),
            _jumprelu(eye, 0.5, tmp_path / "fine")]  # fmt: skip
    out = tmp_path / "pruned"
    assert main(["posthoc", *dirs, "--out", str(out), "--data", str(acts), "--prune"]) == 0
    assert "pruned: level 0 from level 1" in capsys.readouterr().out
    trained = TrainedHSAE.load(out)
    assert torch.allclose(trained.model.W_dec[0], eye[:2], atol=1e-6)
    assert trained.parents[0].tolist() == [-1, -1, 0, 0, 0, 1, 1, 1]
    assert trained.config["posthoc"]["pruned_levels"] == [0]

    # Without --prune the blends stay, and the children they do not hold find no parent
    # that fires on all their rows.
    assert main(["posthoc", *dirs, "--out", str(tmp_path / "flat"), "--data", str(acts)]) == 0
    flat = TrainedHSAE.load(tmp_path / "flat")
    assert torch.allclose(flat.model.W_dec[0], blends, atol=1e-6)
    assert flat.parents[0].tolist()[2:] != [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prune"], "--prune needs --data"),
        (["--similarity", "conditional"], "conditional links count firing: pass --data"),
        (["--data", "ACTS", "--prune", "--similarity", "encoder"], "--prune needs --data"),
        (["--data", "WIDE"], "16"),
        (["--data", "ACTS", "--link_tokens", "0"], "--link_tokens"),
    ],
)
def test_posthoc_with_data_refuses_bad_input(tmp_path, sae_dirs, capsys, flags, message):
    dirs, _ = sae_dirs
    np.save(tmp_path / "acts.npy", np.zeros((64, D), dtype=np.float32))
    np.save(tmp_path / "wide.npy", np.zeros((64, 2 * D), dtype=np.float32))
    flags = [{"ACTS": str(tmp_path / "acts.npy"), "WIDE": str(tmp_path / "wide.npy")}.get(f, f)
             for f in flags]  # fmt: skip
    out = tmp_path / "forest"
    assert main(["posthoc", *map(str, dirs), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
