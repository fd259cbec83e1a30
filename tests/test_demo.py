"""The demo's printed tree: the learned tree with the most links that are not copies."""

from __future__ import annotations

import torch

from hsae.data.planted import PlantedConfig, PlantedForest
from hsae.demo import describe_tree
from hsae.method.model import HSAE

FOREST = PlantedConfig(d=32, n_trees=3, branching=2, depth=2, n_independent=2, seed=1)


def two_levels(forest: PlantedForest) -> tuple[HSAE, list[torch.Tensor], set[int]]:
    """Level 0: the roots; level 1: every true feature, linked to its true parent, a root
    to its own copy in level 0. Returns the model, the parents and the copy children."""
    roots = torch.nonzero(forest.depth == 0).flatten()
    model = HSAE(forest.cfg.d, (roots.numel(), forest.n_features), bandwidth=1.0)
    with torch.no_grad():
        model.W_dec[0].copy_(forest.directions[roots])
        model.W_dec[1].copy_(forest.directions)
    slot = {int(r): i for i, r in enumerate(roots)}
    parent = torch.full((forest.n_features,), -1)
    copies = set()
    for f in range(forest.n_features):
        p = int(forest.parent[f])
        if p >= 0 and int(forest.depth[p]) == 0:
            parent[f] = slot[p]
        elif f in slot:  # a root, below its own copy
            parent[f] = slot[f]
            copies.add(f)
    return model, [parent], copies


def test_the_tree_shown_has_refinements_and_marks_copies() -> None:
    forest = PlantedForest(FOREST)
    model, parents, copies = two_levels(forest)
    text = describe_tree(model, parents, forest, [copies])
    lines = text.splitlines()
    assert "non-copy links" in lines[0]
    root = lines[1].split("= ")[1]
    assert root.startswith("T") and "." not in root  # a planted root
    children = [line.split("= ")[1] for line in lines[2:]]
    assert any(c == root + "  (copy)" for c in children)  # its copy, marked
    assert sum(c.startswith(root + ".") for c in children) == FOREST.branching


def test_says_so_when_every_link_is_a_copy() -> None:
    forest = PlantedForest(FOREST)
    model, parents, _ = two_levels(forest)
    every = set(torch.nonzero(parents[0] >= 0).flatten().tolist())
    assert describe_tree(model, parents, forest, [every]).startswith("no learned tree")


def test_the_demo_command_runs_end_to_end(tmp_path, capsys):
    """`hsae demo`, shortened: both models trained, evaluated, the table and a tree printed,
    report.json written with the same numbers."""
    import json

    from hsae.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--steps", "60", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"hsae", "baseline", "seconds"}
    fve = next(line for line in printed.splitlines() if line.startswith("FVE per level"))
    assert fve.split()[3:7] == [f"{v:.3f}" for v in report["hsae"]["fve"]]
    assert "level 0 #" in printed or "no learned tree" in printed
    for name in ("hsae", "baseline"):
        assert (out / name / "model" / "hsae.json").is_file()
