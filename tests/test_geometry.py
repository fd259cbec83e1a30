"""`hsae geometry`: the sibling-closeness number on hand-computed and planted cases, its
shuffled control, the groups it picks, the UMAP picture and the one-line errors."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
import torch
from test_cli import assert_one_line_error, run_cli

from hsae.explore.geometry import (
    Group,
    Options,
    bootstrap_ci,
    choose_groups,
    closeness,
    control_groups,
    difference_ci,
    record,
    summarize,
)
from hsae.trained_dir import LevelWeights, save_trained

pytestmark = pytest.mark.usefixtures("one_thread")

D = 10
OFFSET = 2.0
"""A common offset along axis 8 (residual streams have one): centring must remove it."""


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _centres() -> np.ndarray:
    """Five level-1 directions: 0, 1 share axis 0 (children of parent 0), 2, 3 share
    axis 1 (children of parent 1), 4 is unlinked."""
    axes = np.eye(D)
    pairs = [(0, 2), (0, 3), (1, 4), (1, 5), (6, 7)]
    return np.stack([_unit(axes[a] + axes[b]) for a, b in pairs])


@pytest.fixture(scope="module")
def hand_model(tmp_path_factory) -> dict:
    """A hand-built two-level forest and .npy data of five blobs, one per level-1 feature:
    each level-1 feature fires on its own blob only, each parent on its children's."""
    root = tmp_path_factory.mktemp("geometry")
    centres = _centres()
    rng = np.random.default_rng(0)
    which = rng.integers(0, len(centres), size=4000)
    x = 3 * centres[which] + 0.1 * rng.normal(size=(4000, D))
    x[:, 8] += OFFSET
    data = root / "acts.npy"
    np.save(data, x.astype(np.float32))

    def level(directions: np.ndarray, theta: float) -> LevelWeights:
        w = torch.tensor(directions, dtype=torch.float32)
        n = w.shape[0]
        return LevelWeights(w.T.contiguous(), torch.zeros(n), w, torch.zeros(D),
                            torch.full((n,), theta))  # fmt: skip

    levels = [level(np.eye(D)[:2], 1.0), level(centres, 2.2)]
    config = {"data": {"kind": "npy", "path": str(data), "eval_frac": 0.5}}
    save_trained(root / "model", levels, [torch.tensor([0, 0, 1, 1, -1])], 1.0, config, {})
    flat = root / "flat"  # the same levels without links: nothing to measure
    save_trained(flat, levels, [torch.tensor([-1, -1, -1, -1, -1])], 1.0, config, {})
    mixed = root / "mixed"  # wrong links: each parent's children lie in different blobs
    save_trained(mixed, levels, [torch.tensor([0, 1, 0, 1, -1])], 1.0, config, {})
    return {"root": root, "model": root / "model", "flat": flat, "mixed": mixed, "x": x,
            "which": which}  # fmt: skip


def _expected_ratio(hand: dict, children: list[int], unrelated: int) -> float:
    """D_unrel / D_sib from the blob centres alone (the noise is small), centred by the
    held-out mean as the module does."""
    heldout = hand["x"][len(hand["x"]) // 2 :]
    mean = heldout.mean(0)
    centre = {k: 3 * _centres()[k] + OFFSET * np.eye(D)[8] - mean for k in range(5)}

    def dist(i: int, j: int) -> float:
        return 1 - float(_unit(centre[i]) @ _unit(centre[j]))

    d_unrel = (dist(children[0], unrelated) + dist(children[1], unrelated)) / 2
    return d_unrel / dist(children[0], children[1])


# ---------------------------------------------------------------- the number


def test_closeness_hand_computed_single_points():
    a, b, u = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[-1.0, 0.0]])
    d_sib, d_unrel = closeness([a, b], u)
    assert d_sib == pytest.approx(1.0)  # orthogonal
    assert d_unrel == pytest.approx((2.0 + 1.0) / 2)  # opposite, orthogonal


def test_closeness_hand_computed_sets_and_scale_invariance():
    a = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    b = torch.tensor([[3.0, 0.0]])
    u = torch.tensor([[0.0, 2.0]])
    d_sib, d_unrel = closeness([a, b], u)
    assert d_sib == pytest.approx((0.0 + 1.0) / 2)
    assert d_unrel == pytest.approx(((1.0 + 0.0) / 2 + 1.0) / 2)
    rec = record(Group(0, 0, [1, 2], 3, [a, b, u]))
    assert rec["ratio"] == pytest.approx(0.75 / 0.5)
    assert rec["n_inputs"] == [2, 1, 1]


def test_closeness_three_children_averages_pairs():
    e = torch.eye(3)
    d_sib, d_unrel = closeness([e[:1], e[1:2], -e[:1]], e[2:])
    assert d_sib == pytest.approx((1.0 + 2.0 + 1.0) / 3)
    assert d_unrel == pytest.approx(1.0)


def test_closeness_needs_two_children():
    with pytest.raises(ValueError, match="two children"):
        closeness([torch.ones(2, 3)], torch.ones(2, 3))


def _planted_groups(n_groups: int, seed: int) -> list[Group]:
    """Siblings' inputs around a shared direction, the unrelated feature's elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(n_groups):
        shared = torch.randn(32, generator=gen)
        kids = [shared + 0.7 * torch.randn(32, generator=gen) for _ in range(3)]
        other = torch.randn(32, generator=gen)
        sets = [k + 0.5 * torch.randn(20, 32, generator=gen) for k in [*kids, other]]
        groups.append(Group(0, g, [0, 1, 2], 3, sets))
    return groups


def _shuffled(group: Group, gen: torch.Generator) -> Group:
    """The same inputs dealt out at random to the same set sizes: no sibling structure."""
    pool = torch.cat(group.inputs)
    pool = pool[torch.randperm(len(pool), generator=gen)]
    sets = list(pool.split([len(x) for x in group.inputs]))
    return Group(group.level, group.parent, group.children, group.unrelated, sets)


def test_planted_siblings_are_closer_and_shuffled_control_is_not():
    groups = _planted_groups(40, seed=1)
    planted = summarize([record(g) for g in groups], seed=0)
    assert planted["ratio"] > 1.5
    assert planted["ratio_ci95"][0] > 1.3
    assert planted["difference"] > 0
    assert planted["share_closer"] == 1.0

    gen = torch.Generator().manual_seed(2)
    control = summarize([record(_shuffled(g, gen)) for g in groups], seed=0)
    lo, hi = control["ratio_ci95"]
    assert lo < 1.0 < hi
    assert abs(control["ratio"] - 1.0) < 0.03
    assert 0.2 < control["share_closer"] < 0.8


def test_bootstrap_ci_brackets_the_mean_and_collapses_on_constants():
    assert bootstrap_ci([0.7] * 10, seed=0) == pytest.approx([0.7, 0.7])
    values = list(np.random.default_rng(0).normal(1.0, 0.1, size=200))
    lo, hi = bootstrap_ci(values, seed=0)
    assert lo < float(np.mean(values)) < hi
    assert hi - lo == pytest.approx(2 * 1.96 * 0.1 / math.sqrt(200), rel=0.25)
    assert all(math.isnan(v) for v in bootstrap_ci([1.0], seed=0))


def test_difference_ci_between_two_forests():
    rng = np.random.default_rng(0)
    a, b = list(rng.normal(1.2, 0.1, 100)), list(rng.normal(1.0, 0.1, 150))
    lo, hi = difference_ci(a, b, seed=0)
    assert lo < float(np.mean(a) - np.mean(b)) < hi
    assert lo > 0.0 and hi < 0.4
    assert hi - lo == pytest.approx(2 * 1.96 * 0.1 * math.sqrt(1 / 100 + 1 / 150), rel=0.25)
    assert difference_ci([1.0] * 5, [1.0] * 7, seed=0) == pytest.approx([0.0, 0.0])


def test_summary_by_level_pair():
    recs = [{"level": lv, "ratio": r, "d_sib": 1.0, "d_unrel": r}
            for lv, r in ((0, 1.2), (0, 1.4), (1, 0.9))]  # fmt: skip
    s = summarize(recs, seed=0)
    assert s["n_parents"] == 3
    assert s["ratio"] == pytest.approx((1.2 + 1.4 + 0.9) / 3)
    assert s["share_closer"] == pytest.approx(2 / 3)
    assert s["by_level_pair"]["0-1"]["ratio"] == pytest.approx(1.3)
    assert s["by_level_pair"]["1-2"]["n_parents"] == 1


# ---------------------------------------------------------------- picking groups


def test_choose_groups_needs_two_live_children_and_matches_frequency():
    # level 1: features 0, 1, 2 are children of parent 0; 3 of parent 1; 4..9 unlinked.
    parents = [torch.tensor([0, 0, 0, 1, -1, -1, -1, -1, -1, -1])]
    counts = [torch.tensor([500, 500]),
              torch.tensor([100, 120, 0, 100, 110, 5000, 1, 90, 4000, 3000])]  # fmt: skip
    opts = Options(model_dir="m", out="o", min_inputs=5, seed=0)
    seen = set()
    for seed in range(20):
        opts.seed = seed
        groups = choose_groups(parents, counts, opts)
        assert len(groups) == 1  # parent 1 has one child; dead child 2 is left out
        g = groups[0]
        assert (g.level, g.parent, g.children) == (0, 0, [0, 1])
        assert g.unrelated not in (0, 1, 2) and counts[1][g.unrelated] >= 5
        seen.add(g.unrelated)
    assert seen <= {3, 4, 5, 7, 8, 9}
    assert {3, 4, 7} <= seen  # the closest in frequency are drawn


def test_control_stand_ins_are_live_and_unlinked():
    # level 1: parent 0 has 0, 1; parent 1 has 2, 3; parent 2 has 4, 5; 6..11 unlinked
    parents = [torch.tensor([0, 0, 1, 1, 2, 2, -1, -1, -1, -1, -1, -1])]
    counts = [torch.tensor([900, 900, 900]),
              torch.tensor([100, 400, 100, 400, 100, 400, 110, 390, 2, 100, 420, 95])]  # fmt: skip
    group = Group(0, 0, [0, 1], 9)
    for seed in range(20):
        opts = Options(model_dir="m", out="o", min_inputs=5, seed=seed)
        (control,) = control_groups([group], parents, counts, opts)
        a, b = control.children
        assert {a, b}.isdisjoint({0, 1, 9, 8})  # not P's children, the unrelated or dead
        p = parents[0]
        assert p[a] < 0 or p[a] != p[b]  # no two stand-ins are siblings
        assert control.unrelated == 9 and control.parent == 0
    # nothing unlinked left: the control has no group
    few = [torch.tensor([0, 0, 1, 1])]
    opts = Options(model_dir="m", out="o", min_inputs=5)
    assert control_groups([Group(0, 0, [0, 1], 2)], few, [torch.tensor([9, 9]),
                          torch.tensor([50, 50, 50, 50])], opts) == []  # fmt: skip


# ---------------------------------------------------------------- the command


def test_cli_number_on_a_hand_built_forest(hand_model, tmp_path, capsys):
    out = tmp_path / "geo"
    argv = ["geometry", hand_model["model"], "--baseline", hand_model["mixed"], "--out", out,
            "--parents", 10, "--per_feature", 50, "--pngs", 0, "--quiet"]  # fmt: skip
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 0, err
    report = json.loads((out / "geometry.json").read_text())
    for name in ("hsae", "baseline"):
        recs = report[name]["parents"]
        assert sorted((r["level"], r["parent"]) for r in recs) == [(0, 0), (0, 1)]
        for r in recs:
            assert r["n_inputs"] == [50, 50, 50]
            assert r["unrelated"] not in r["children"]
            expected = _expected_ratio(hand_model, r["children"], r["unrelated"])
            assert r["ratio"] == pytest.approx(expected, rel=0.05)
            # right links: siblings share a blob axis; wrong links: they do not
            assert r["ratio"] > 1.2 if name == "hsae" else r["ratio"] < 1.1
    hsae, base = (report[name]["summary"]["ratio"] for name in ("hsae", "baseline"))
    assert report["hsae_minus_baseline"]["ratio"] == pytest.approx(hsae - base)
    low, high = report["hsae_minus_baseline"]["ratio_ci95"]
    assert 0.1 < low <= hsae - base <= high
    assert "ratio" in stdout and "baseline" in stdout


def test_cli_pictures_in_a_real_process(hand_model, tmp_path, subprocess_env, python_exe):
    """The whole command with its UMAP picture. numba's JIT is switched off: compiling
    UMAP's kernels takes ~20 s, running them uncompiled on 100 points well under 1 s."""
    out = tmp_path / "geo"
    argv = ["geometry", hand_model["model"], "--out", out, "--parents", 2, "--per_feature",
            40, "--pngs", 1, "--umap_epochs", 20, "--quiet"]  # fmt: skip
    env = subprocess_env | {"NUMBA_DISABLE_JIT": "1"}
    proc = subprocess.run([python_exe, "-m", "hsae", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    pngs = sorted((out / "hsae").glob("parent_0_*.png"))
    assert len(pngs) == 1
    data = pngs[0].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    assert (out / "geometry.json").exists()
    assert not list(out.rglob(".*tmp"))


def test_picture_shows_each_child_and_the_unrelated_feature():
    from hsae.explore import geometry

    groups = _planted_groups(1, seed=3)
    calls = []

    def fake_project(inputs, seed, n_epochs=None):  # the layout is UMAP's business
        calls.append([len(x) for x in inputs])
        return torch.cat(inputs)[:, :2].numpy()

    original = geometry.project
    geometry.project = fake_project
    try:
        fig = geometry.picture(groups[0], "t", seed=0)
    finally:
        geometry.project = original
    ax = fig.axes[0]
    assert calls == [[20, 20, 20, 20]]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["1:0 (child)", "1:1 (child)", "1:2 (child)", "1:3 (unrelated)"]
    assert [len(c.get_offsets()) for c in ax.collections] == [20, 20, 20, 20]


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--parents", "0"], ["--parents", ">= 1"]),
        (["--per_feature", "1"], ["--per_feature"]),
        (["--min_inputs", "60", "--per_feature", "50"], ["--min_inputs"]),
        (["--umap_epochs", "0"], ["--umap_epochs"]),
    ],
)
def test_cli_bad_options(hand_model, tmp_path, capsys, extra, needles):
    rc, _, err = run_cli(["geometry", hand_model["model"], "--out", tmp_path / "o", *extra],
                         capsys)  # fmt: skip
    assert rc == 2
    assert_one_line_error(err, *needles)
    assert not (tmp_path / "o").exists()


def test_cli_missing_model_dir(tmp_path, capsys):
    rc, _, err = run_cli(["geometry", tmp_path / "nowhere", "--out", tmp_path / "o"], capsys)
    assert rc == 2
    assert_one_line_error(err, "nowhere")


def test_cli_no_parent_with_two_children(hand_model, tmp_path, capsys):
    rc, _, err = run_cli(["geometry", hand_model["flat"], "--out", tmp_path / "o", "--quiet"],
                         capsys)  # fmt: skip
    assert rc == 2
    assert_one_line_error(err, "two or more children")
    assert not (tmp_path / "o").exists()


def test_cli_baseline_of_another_width(hand_model, tmp_path, capsys):
    narrow = tmp_path / "narrow"
    w = torch.eye(4)[:2]
    level = LevelWeights(w.T.contiguous(), torch.zeros(2), w, torch.zeros(4), torch.ones(2))
    save_trained(narrow, [level, level], [torch.tensor([0, 0])], 1.0, {}, {})
    argv = ["geometry", hand_model["model"], "--baseline", narrow, "--out", tmp_path / "o"]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2
    assert_one_line_error(err, "d_in 4", "same activations")
