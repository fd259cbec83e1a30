"""The demo: the learned tree it prints (the longest chain of true links, then the most true
links) and the command."""

from __future__ import annotations

import dataclasses

import torch

from hsae.config import RunConfig
from hsae.data.planted import PlantedConfig, PlantedForest
from hsae.demo import describe_tree
from hsae.method.model import HSAE
from hsae.trained import TrainedHSAE

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


def test_the_tree_shown_has_true_links_and_marks_copies() -> None:
    forest = PlantedForest(FOREST)
    model, parents, copies = two_levels(forest)
    text = describe_tree(model, parents, forest, [copies])
    lines = text.splitlines()
    assert "the most, a true link" in lines[0]
    root = lines[1].split("= ")[1]
    assert root.startswith("T") and "." not in root  # a planted root
    children = [line.split("= ")[1] for line in lines[2:]]
    assert any(c == root + "  (copy)" for c in children)  # its copy, marked
    true = [c for c in children if c.endswith("  (true)")]
    assert len(true) == FOREST.branching and all(c.startswith(root + ".") for c in true)


def test_a_link_to_the_parents_sibling_is_not_true() -> None:
    """Level 0: the depth-1 nodes; level 1: the depth-2 nodes. Linked to their true parent,
    every link is true; linked to that parent's sibling (a planted node of the same tree
    and depth, not an ancestor), none is."""
    forest = PlantedForest(dataclasses.replace(FOREST, depth=3))
    mids = torch.nonzero(forest.depth == 1).flatten()
    leaves = torch.nonzero(forest.depth == 2).flatten()
    model = HSAE(forest.cfg.d, (mids.numel(), leaves.numel()), bandwidth=1.0)
    with torch.no_grad():
        model.W_dec[0].copy_(forest.directions[mids])
        model.W_dec[1].copy_(forest.directions[leaves])
    slot = {int(m): i for i, m in enumerate(mids)}
    true_parent = torch.tensor([slot[int(forest.parent[leaf])] for leaf in leaves])
    sibling = true_parent ^ 1  # mids are laid out in sibling pairs (branching 2)
    assert all(forest.parent[mids[true_parent]] == forest.parent[mids[sibling]])
    shown = describe_tree(model, [true_parent], forest, [set()])
    assert shown.count("(true)") == FOREST.branching
    assert describe_tree(model, [sibling], forest, [set()]).startswith("no learned link")


def test_a_chain_of_true_links_is_shown_before_more_links() -> None:
    """Tree A: root -> child -> grandchild, two true links in a row. Tree B: its root, a
    copy of it (a copy link) and four grandchildren below the copy, four true links but
    none in a row. The tree shown is A's, its chain first."""
    forest = PlantedForest(dataclasses.replace(FOREST, n_trees=2, depth=3))
    root_a, root_b = torch.nonzero(forest.depth == 0).flatten().tolist()
    child_a = int(torch.nonzero(forest.parent == root_a)[0])
    grand_a = int(torch.nonzero(forest.parent == child_a)[0])
    grand_b = torch.nonzero((forest.depth == 2) & (forest.tree == forest.tree[root_b]))
    unmatched = torch.nn.functional.normalize(torch.randn(forest.cfg.d), dim=0)
    levels = [
        forest.directions[[root_a, root_b]],
        torch.cat([forest.directions[[child_a, root_b]], unmatched[None]]),
        forest.directions[[grand_a, *grand_b.flatten().tolist()]],
    ]
    model = HSAE(forest.cfg.d, tuple(len(w) for w in levels), bandwidth=1.0)
    with torch.no_grad():
        for level, w in enumerate(levels):
            model.W_dec[level].copy_(w)
    parents = [torch.tensor([0, 1, -1]), torch.tensor([0] + [1] * grand_b.numel())]
    text = describe_tree(model, parents, forest, [{1}, set()])
    assert text.count("(true)") == 2, text
    names = [line.split("= ")[1] for line in text.splitlines()[1:]]
    assert names[0] == f"T{int(forest.tree[root_a])}"
    assert names[1].endswith("  (true)") and names[2].endswith("  (true)")
    assert names[2].startswith(names[1].removesuffix("  (true)") + ".")  # its grandchild


def test_says_so_when_no_link_is_true() -> None:
    forest = PlantedForest(FOREST)
    model, parents, _ = two_levels(forest)
    every = set(torch.nonzero(parents[0] >= 0).flatten().tolist())
    assert describe_tree(model, parents, forest, [every]).startswith("no learned link")


def test_the_demo_command_runs_end_to_end(tmp_path, capsys):
    """`hsae demo`, shortened: the three methods trained, evaluated, the table and a tree
    printed, report.json written with the same numbers and the paper's link rule kept by
    the paper's HSAE and its baseline."""
    import json

    from hsae.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--steps", "60", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"hsae", "paper", "baseline", "seconds"}
    fve = next(line for line in printed.splitlines() if line.startswith("FVE per level"))
    assert fve.split()[3:7] == [f"{v:.3f}" for v in report["hsae"]["fve"]]
    assert fve.split()[7:11] == [f"{v:.3f}" for v in report["paper"]["fve"]]
    assert "level 0 #" in printed or "no learned link" in printed
    rules = {"hsae": "conditional", "paper": "encoder", "baseline": "encoder"}
    for name, rule in rules.items():
        assert {"recall", "copy_share"} <= set(report[name])
        config = TrainedHSAE.load(out / name / "model").config
        assert RunConfig.from_dict(config).model.link_rule == rule
