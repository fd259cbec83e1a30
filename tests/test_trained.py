"""TrainedHSAE: one object for every reader of a trained directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hsae.io import FormatError
from hsae.method.model import HSAE
from hsae.trained import MODEL_DIR, TrainedHSAE, read_header, trained_directory


def saved(tmp_path: Path, scale: float = 0.25) -> tuple[TrainedHSAE, Path]:
    model = HSAE(6, (4, 8), bandwidth=0.5, seed=3)
    with torch.no_grad():
        model.scale.fill_(scale)
        for theta in model.threshold:
            theta.fill_(0.05)
    parents = [torch.tensor([0, 0, 1, 1, 2, 3, -1, 3])]
    config = {"model": {"bandwidth": 0.5}, "data": {"kind": "npy", "path": "/x.npy"}}
    run = tmp_path / "run"
    TrainedHSAE(model, parents, config, {"steps": 7}).save(run / MODEL_DIR)
    return TrainedHSAE(model, parents, config), run


def test_a_run_directory_and_its_model_directory_load_alike(tmp_path):
    original, run = saved(tmp_path)
    for path in (run, run / MODEL_DIR):
        trained = TrainedHSAE.load(path)
        assert trained.directory == run / MODEL_DIR
        assert trained.sizes == [4, 8] and trained.d_in == 6
        assert trained.data == {"kind": "npy", "path": "/x.npy"}
        assert trained.summary == {"steps": 7}
        assert trained.model.bandwidth == 0.5
        assert torch.equal(trained.parents[0], original.parents[0])
    assert read_header(run)["sizes"] == [4, 8]
    with pytest.raises(FormatError, match="not a trained HSAE directory"):
        trained_directory(tmp_path)


def test_raw_activations_are_scaled_inside(tmp_path):
    """encode_raw / reconstruct_raw against the formulas with s written out by hand."""
    _, run = saved(tmp_path, scale=0.25)
    model = TrainedHSAE.load(run).model
    x = torch.randn(32, 6, dtype=torch.float64) * 4  # raw rows, another dtype
    s = 0.25
    for level in range(2):
        xs = x.float() * s
        pre = (xs - model.b_dec[level]) @ model.W_enc[level] + model.b_enc[level]
        acts = pre * (pre > model.threshold[level])
        want = (acts @ model.W_dec[level] + model.b_dec[level]) / s
        torch.testing.assert_close(model.encode_raw(x)[level], acts)
        torch.testing.assert_close(model.reconstruct_raw(x, level), want)


def test_the_fingerprint_follows_the_model_not_its_path(tmp_path):
    _, run = saved(tmp_path)
    before = TrainedHSAE.load(run).fingerprint()
    moved = tmp_path / "elsewhere"
    shutil.move(run, moved)
    assert TrainedHSAE.load(moved).fingerprint() == before
    other, _ = saved(tmp_path / "second", scale=0.5)
    assert TrainedHSAE.load(tmp_path / "second" / "run").fingerprint() != before
