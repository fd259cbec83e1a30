"""Files on disk: trained-model directory, SAE Lens export, checkpoints, atomicity, activations."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import flip_signs

import hsae.io as hio
from hsae import trained_dir
from hsae.config import RunConfig
from hsae.data.activations import NpyActivations
from hsae.io import FormatError
from hsae.method import checkpoint
from hsae.trained_dir import LevelWeights

D_IN = 12
SIZES = (8, 16, 32)


# --------------------------------------------------------------------------- helpers


def random_levels(seed: int = 0, d: int = D_IN, sizes: tuple[int, ...] = SIZES) -> list:
    """Random parameters shaped like the model's: unit decoder rows, positive thresholds."""
    g = torch.Generator().manual_seed(seed)
    levels = []
    for n in sizes:
        w_dec = torch.randn(n, d, generator=g)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        levels.append(
            LevelWeights(
                W_enc=torch.randn(d, n, generator=g) / d**0.5,
                b_enc=0.1 * torch.randn(n, generator=g),
                W_dec=w_dec,
                b_dec=0.1 * torch.randn(d, generator=g),
                threshold=0.3 * torch.rand(n, generator=g),
            )
        )
    return levels


def random_parents(seed: int = 0, sizes: tuple[int, ...] = SIZES) -> list[torch.Tensor]:
    """One parent array per level pair, with some -1 (unassigned) entries."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n_parent, n_child in zip(sizes, sizes[1:], strict=False):
        p = torch.randint(0, n_parent, (n_child,), generator=g)
        p[torch.rand(n_child, generator=g) < 0.3] = -1
        out.append(p)
    return out


def save_example(directory: Path, scale: float = 2.0, seed: int = 0) -> tuple[list, list]:
    levels, parents = random_levels(seed), random_parents(seed)
    config = RunConfig().to_dict()
    trained_dir.save_trained(directory, levels, parents, scale, config, {"steps": 10, "loss": 0.5})
    return levels, parents


def our_forward(level: LevelWeights, x_scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's encode/decode on scaled inputs (design §1)."""
    pi = (x_scaled - level.b_dec) @ level.W_enc + level.b_enc
    a = pi * (pi > level.threshold)
    return a, a @ level.W_dec + level.b_dec


def sae_lens_forward(folder: Path, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAE Lens 6.x JumpReLUSAE.encode/decode, written out, run on the exported files."""
    w = hio.load_safetensors(folder / "sae_weights.safetensors")
    h = (x_raw - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    f = torch.relu(h) * (h > w["threshold"])
    return f, f @ w["W_dec"] + w["b_dec"]


def siblings(path: Path) -> list[str]:
    """Everything in ``path``'s directory except ``path`` itself (leftover temp files)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


# --------------------------------------------------------------------------- trained directory


def test_trained_round_trip_is_exact(tmp_path: Path) -> None:
    out = tmp_path / "model"
    levels, parents = save_example(out, scale=2.0)  # a power of two: folding is exact
    loaded, loaded_parents, scale, header = trained_dir.load_trained(out)
    assert scale == 2.0
    for a, b in zip(levels, loaded, strict=True):
        for key in trained_dir.LEVEL_KEYS:
            assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert len(loaded_parents) == len(parents)
    for a, b in zip(parents, loaded_parents, strict=True):
        assert b.dtype == torch.long and torch.equal(a, b)
    assert header["format"] == "hsae/1"
    assert header["d_in"] == D_IN and header["sizes"] == list(SIZES)
    assert RunConfig.from_dict(header["config"]) == RunConfig()
    assert header["summary"] == {"steps": 10, "loss": 0.5}


def test_round_trip_any_scale_within_float32_rounding(tmp_path: Path) -> None:
    levels, _ = save_example(tmp_path / "m", scale=1.37)
    loaded, _, scale, _ = trained_dir.load_trained(tmp_path / "m")
    assert scale == 1.37
    for a, b in zip(levels, loaded, strict=True):
        assert torch.equal(a.b_enc, b.b_enc) and torch.equal(a.threshold, b.threshold)
        for key in ("W_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=2e-7, atol=0)


def test_folded_export_equals_our_model_on_raw_inputs(tmp_path: Path) -> None:
    scale = 0.37
    levels, _ = save_example(tmp_path / "m", scale=scale)
    x_raw = torch.randn(256, D_IN, generator=torch.Generator().manual_seed(1)) * 3.0
    for index, level in enumerate(levels):
        a_ours, rec_ours = our_forward(level, scale * x_raw)
        a_lens, rec_lens = sae_lens_forward(tmp_path / "m" / f"level_{index}", x_raw)
        assert (a_ours > 0).any(), "test data should activate some features"
        torch.testing.assert_close(a_lens, a_ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec_lens, rec_ours / scale, rtol=1e-5, atol=1e-5)


def test_level_files_follow_sae_lens_layout(tmp_path: Path) -> None:
    save_example(tmp_path / "m", scale=1.5)
    for index, n in enumerate(SIZES):
        folder = tmp_path / "m" / f"level_{index}"
        assert sorted(os.listdir(folder)) == ["cfg.json", "sae_weights.safetensors"]
        weights = hio.load_safetensors(folder / "sae_weights.safetensors")
        shapes = {k: list(v.shape) for k, v in weights.items()}
        assert shapes == {
            "W_enc": [D_IN, n],
            "W_dec": [n, D_IN],
            "b_enc": [n],
            "b_dec": [D_IN],
            "threshold": [n],
        }
        assert all(v.dtype == torch.float32 for v in weights.values())
        cfg = json.loads((folder / "cfg.json").read_text())
        expected = {
            "architecture": "jumprelu",
            "d_in": D_IN,
            "d_sae": n,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
        }
        assert {k: cfg[k] for k in expected} == expected
        meta = cfg["metadata"]
        assert meta["hsae_level"] == index and meta["hsae_scale"] == 1.5
        assert meta["model_name"] is None and meta["hook_name"] is None
        assert meta["sae_lens_version"].startswith("6.")


def test_hierarchy_json_layout(tmp_path: Path) -> None:
    _, parents = save_example(tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "hierarchy.json").read_text())
    assert list(doc) == ["parents"]
    assert doc["parents"][0] is None
    assert len(doc["parents"]) == len(SIZES)
    for level in range(1, len(SIZES)):
        assert doc["parents"][level] == parents[level - 1].tolist()
        assert -1 in doc["parents"][level]
    hsae_json = json.loads((tmp_path / "m" / "hsae.json").read_text())
    assert list(hsae_json) == ["format", "d_in", "sizes", "scale", "config", "summary"]


def test_parents_with_leading_none_accepted(tmp_path: Path) -> None:
    levels, parents = random_levels(), random_parents()
    trained_dir.save_trained(tmp_path / "m", levels, [None, *parents], 1.0, {}, {})
    loaded = trained_dir.load_trained(tmp_path / "m")[1]
    assert all(torch.equal(a, b) for a, b in zip(parents, loaded, strict=True))


def test_non_finite_summary_written_as_null(tmp_path: Path) -> None:
    trained_dir.save_trained(
        tmp_path / "m", random_levels(), random_parents(), 1.0, {}, {"loss": float("nan")}
    )
    assert json.loads((tmp_path / "m" / "hsae.json").read_text())["summary"] == {"loss": None}


def test_save_rejects_bad_parents(tmp_path: Path) -> None:
    parents = random_parents()
    parents[0][0] = SIZES[0]  # out of range
    with pytest.raises(ValueError, match=r"level 1 parents.*\[-1, 8\)"):
        trained_dir.save_trained(tmp_path / "m", random_levels(), parents, 1.0, {}, {})
    assert not (tmp_path / "m").exists()


def test_load_rejects_tampered_directory(tmp_path: Path) -> None:
    out = tmp_path / "m"
    save_example(out)
    header_path = out / "hsae.json"
    header = json.loads(header_path.read_text())

    header_path.write_text(json.dumps({**header, "format": "other/9"}))
    with pytest.raises(FormatError, match=r"hsae\.json: format is 'other/9'"):
        trained_dir.load_trained(out)

    header_path.write_text(json.dumps({**header, "sizes": [8, 16, 33]}))
    with pytest.raises(FormatError, match=r"level_2/sae_weights\.safetensors: W_enc has shape"):
        trained_dir.load_trained(out)

    header_path.write_text(json.dumps(header))
    doc = json.loads((out / "hierarchy.json").read_text())
    doc["parents"][2][0] = 99
    (out / "hierarchy.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=r"hierarchy\.json: level 2 parents.*\[-1, 16\)"):
        trained_dir.load_trained(out)

    doc["parents"] = doc["parents"][:2]
    (out / "hierarchy.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=r"hierarchy\.json: 'parents' must be a list of 3"):
        trained_dir.load_trained(out)


def test_load_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="nowhere: not found"):
        trained_dir.load_trained(tmp_path / "nowhere")


def test_overwrite_replaces_whole_directory(tmp_path: Path) -> None:
    out = tmp_path / "m"
    save_example(out, seed=0)
    (out / "stale.txt").write_text("from the old export")
    levels, _ = save_example(out, seed=1)
    assert not (out / "stale.txt").exists()
    assert torch.equal(trained_dir.load_trained(out)[0][0].W_enc, levels[0].W_enc)
    assert siblings(out) == []


def test_refuses_to_replace_foreign_directory(tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FormatError, match="precious: exists and is not an HSAE directory"):
        save_example(out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert siblings(out) == []


# --------------------------------------------------------------------------- atomicity


def test_failed_directory_write_keeps_previous(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "m"
    old_levels, _ = save_example(out, seed=0)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = {"n": 0}
    real_save_bytes = hio.save_bytes

    def failing_save_bytes(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_save_bytes(*args, **kwargs)

    monkeypatch.setattr(hio, "save_bytes", failing_save_bytes)
    with pytest.raises(OSError, match="disk full"):
        save_example(out, seed=1)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert siblings(out) == []


def test_failed_swap_restores_previous(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "m"
    old_levels, _ = save_example(out, seed=0)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst) == out and ".tmp" in Path(src).name:
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(hio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_example(out, seed=1)
    monkeypatch.undo()
    assert torch.equal(trained_dir.load_trained(out)[0][0].W_enc, old_levels[0].W_enc)
    assert siblings(out) == []


def test_failed_file_writes_keep_previous(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "state.json"
    hio.atomic_write_json(path, {"step": 1})
    with pytest.raises(TypeError):  # json.dumps fails before anything is written
        hio.atomic_write_json(path, {"step": object()})

    def refuse(src, dst):
        raise OSError("replace failed")

    monkeypatch.setattr(hio.os, "replace", refuse)
    with pytest.raises(OSError, match="replace failed"):
        hio.atomic_write_json(path, {"step": 2})
    with pytest.raises(OSError, match="replace failed"):
        checkpoint.save_checkpoint(tmp_path / "ckpt.safetensors", {"w": torch.ones(3)}, {"step": 2})
    monkeypatch.undo()
    assert hio.load_json(path) == {"step": 1}
    assert path.read_text() == '{\n  "step": 1\n}\n'
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_written_files_are_readable_by_others(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        hio.atomic_write_json(tmp_path / "a.json", {})
        save_example(tmp_path / "m")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "m" / "level_0" / "cfg.json").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- bad files


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    hio.atomic_save_safetensors(path, {"w": torch.randn(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"w\.safetensors: not a readable safetensors") as info:
        hio.load_safetensors(path)
    assert "\n" not in str(info.value)
    path.write_bytes(b"garbage, not a header")
    with pytest.raises(FormatError, match=r"w\.safetensors"):
        checkpoint.load_checkpoint(path)


def test_missing_files(tmp_path: Path) -> None:
    for load in (hio.load_safetensors, hio.load_json, checkpoint.load_checkpoint):
        with pytest.raises(FormatError, match=r"absent\.x: file not found"):
            load(tmp_path / "absent.x")


def test_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"a": 1,')
    with pytest.raises(FormatError, match=r"bad\.json: invalid JSON at line 1"):
        hio.load_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(FormatError, match=r"bad\.json: expected a JSON object, found list"):
        hio.load_json(path)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    weight = torch.randn(5, 3)
    tensors = {
        "w": weight,
        "w_t": weight.t(),  # non-contiguous view sharing storage
        "lam": torch.tensor([1e-3, 2e-3], dtype=torch.float64),
    }
    state = {"step": 42, "config": RunConfig().to_dict(), "lambda": [0.1, 0.2]}
    checkpoint.save_checkpoint(path, tensors, state)

    loaded, loaded_state = checkpoint.load_checkpoint(path)
    assert loaded_state == {
        **json.loads(json.dumps(state)),
        "format": "hsae-checkpoint/1",
        "sha256": checkpoint.checkpoint_digest(tensors, state | {"format": "hsae-checkpoint/1"}),
    }
    assert torch.equal(loaded["w"], weight) and torch.equal(loaded["w_t"], weight.t())
    assert loaded["lam"].dtype == torch.float64


def test_checkpoint_without_state(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    hio.atomic_save_safetensors(path, {"w": torch.ones(2)})
    with pytest.raises(FormatError, match=r"plain\.safetensors: not an HSAE checkpoint"):
        checkpoint.load_checkpoint(path)
    hio.atomic_save_safetensors(path, {"w": torch.ones(2)}, {"hsae_state": '{"step": 1}'})
    with pytest.raises(FormatError, match=r"checkpoint format is None"):
        checkpoint.load_checkpoint(path)


def test_checkpoint_with_changed_bytes_is_refused(tmp_path: Path) -> None:
    """The issue's probe: 64 floats of W_enc sign-flipped, a file safetensors still reads."""
    path = tmp_path / "ckpt.safetensors"
    tensors = {"W_enc": torch.randn(16, 8), "b": torch.zeros(3)}
    checkpoint.save_checkpoint(path, tensors, {"step": 5})
    flip_signs(path, "W_enc", 64)
    assert hio.load_safetensors(path)["W_enc"].shape == (16, 8)  # still a valid file
    with pytest.raises(FormatError) as err:
        checkpoint.load_checkpoint(path)
    assert "checksum mismatch" in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_with_changed_state_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    checkpoint.save_checkpoint(path, {"w": torch.ones(4)}, {"step": 5})
    tensors, metadata = hio.read_safetensors(path)
    metadata["hsae_state"] = metadata["hsae_state"].replace('"step": 5', '"step": 6')
    hio.atomic_save_safetensors(path, tensors, metadata)
    with pytest.raises(FormatError, match="checksum mismatch"):
        checkpoint.load_checkpoint(path)


# --------------------------------------------------------------------------- activations


def write_npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def test_activation_file_errors(tmp_path: Path) -> None:
    ok = write_npy(tmp_path / "ok.npy", np.zeros((10, 4), np.float32))
    with pytest.raises(FormatError, match=r"ok\.npy have width 4, the model expects 6"):
        NpyActivations(ok, expected_d=6)
    cube = write_npy(tmp_path / "cube.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(FormatError, match=r"cube\.npy have shape \[2, 3, 4\], expected 2-D"):
        NpyActivations(cube)
    objects = np.empty((2, 2), dtype=object)
    objects[:] = [[{"a": 1}, None], [1, "x"]]
    pickled = tmp_path / "objects.npy"
    np.save(pickled, objects, allow_pickle=True)
    with pytest.raises(FormatError, match=r"objects\.npy is not a readable \.npy array: it "
                       "holds pickled Python objects, which hsae never loads"):  # fmt: skip
        NpyActivations(pickled)
    ints = write_npy(tmp_path / "ints.npy", np.zeros((3, 4), np.int64))
    with pytest.raises(FormatError, match=r"ints\.npy have dtype int64, expected a float"):
        NpyActivations(ints)
    empty = write_npy(tmp_path / "empty.npy", np.zeros((0, 4), np.float32))
    with pytest.raises(FormatError, match=r"empty\.npy are empty"):
        NpyActivations(empty)
    (tmp_path / "text.npy").write_text("not numpy at all")
    with pytest.raises(FormatError, match=r"text\.npy is not a \.npy file \(no \.npy header\)"):
        NpyActivations(tmp_path / "text.npy")
    with pytest.raises(FormatError, match=r"absent\.npy not found"):
        NpyActivations(tmp_path / "absent.npy")


def test_nan_row_reported(tmp_path: Path) -> None:
    data = np.ones((20, 3), np.float16)
    data[13, 1] = np.nan
    acts = NpyActivations(write_npy(tmp_path / "nan.npy", data), expected_d=3)
    with pytest.raises(FormatError, match=r"non-finite value .*nan\.npy near row 13"):
        for _ in acts.batches(batch_size=4, seed=0):
            pass
    with pytest.raises(FormatError, match="near row 13"):
        acts.read()


def test_batch_stream_deterministic_and_covers_each_row_per_epoch(tmp_path: Path) -> None:
    n, batch = 30, 7
    data = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
    acts = NpyActivations(write_npy(tmp_path / "a.npy", data), expected_d=2)
    assert (acts.n, acts.d) == (n, 2)
    stream = acts.batches(batch, seed=3)
    batches = [next(stream) for _ in range(3 * n // batch + 1)]
    assert all(b.dtype == torch.float32 and b.shape == (batch, 2) for b in batches)
    rows = torch.cat(batches)[:, 0].long().div(2, rounding_mode="floor").tolist()
    for epoch in range(3):
        assert sorted(rows[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert rows[:n] != rows[n : 2 * n], "each epoch should have its own order"
    again = acts.batches(batch, seed=3)
    assert all(torch.equal(b, next(again)) for b in batches)
    other = next(acts.batches(batch, seed=4))
    assert not torch.equal(other, batches[0])


def test_start_step_resumes_exactly(tmp_path: Path) -> None:
    data = np.random.default_rng(0).standard_normal((23, 5)).astype(np.float32)
    acts = NpyActivations(write_npy(tmp_path / "a.npy", data))
    stream = acts.batches(batch_size=6, seed=11)
    fresh = [next(stream) for _ in range(12)]
    for k in (0, 1, 3, 4, 11):
        assert torch.equal(next(acts.batches(6, seed=11, start_step=k)), fresh[k])


def test_split_holds_out_last_rows(tmp_path: Path) -> None:
    n = 40
    data = np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1)
    train, held = NpyActivations(write_npy(tmp_path / "a.npy", data)).split(0.25)
    assert (train.n, held.n) == (30, 10)
    held_rows = torch.cat(list(held.sequential(batch_size=4)))[:, 0].long().tolist()
    assert held_rows == list(range(30, 40))
    stream = train.batches(batch_size=8, seed=0)
    seen = torch.cat([next(stream) for _ in range(20)])[:, 0].long()
    assert set(seen.tolist()) == set(range(30))
    with pytest.raises(FormatError, match="cannot hold out"):
        train.split_rows(30)


def test_atomic_json_creates_missing_folders_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "new" / "deeper" / "report.json"
    hio.atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]
