"""`hsae demo`: the embedded default run.

Builds a planted forest (design §7), trains HSAE and the post-hoc baseline on the
same stream with the same budget, evaluates both on held-out draws, prints a side-by-side
table and writes `report.json` and the two model directories.

The demo is the paper's method at a CPU-sized scale: four levels, a short run, with the
training defaults of every run (the controller scales itself to the run's length).
"""

from __future__ import annotations

import time
from pathlib import Path

from hsae import pipeline
from hsae.config import HSAEConfig, RunConfig, TrainConfig
from hsae.data.planted import PlantedConfig, PlantedForest, match_features
from hsae.evaluation.report_table import format_report
from hsae.io import atomic_write_json
from hsae.method.hierarchy import children_lists
from hsae.method.model import HSAE

DEMO_STEPS = 2500
EVAL_TOKENS = 65536


def demo_config(steps: int = DEMO_STEPS, progress: bool = True, seed: int = 0) -> RunConfig:
    model = HSAEConfig(sizes=(32, 64, 128, 256), target_l0=8, update_every=max(1, steps // 10))
    train = TrainConfig(steps=steps, checkpoint_every=0, progress=progress, seed=seed)
    return RunConfig(model=model, train=train)


def run_demo(out: Path, steps: int | None = None, progress: bool = True, seed: int = 0) -> dict:
    started = time.perf_counter()
    source = pipeline.planted_source(PlantedConfig())
    forest = source.forest
    print(
        f"planted forest: {forest.n_features} true features in d = {source.d} "
        f"({forest.n_tree_nodes} in {forest.cfg.n_trees} trees of depth "
        f"{forest.cfg.depth}, {forest.cfg.n_independent} independent)"
    )
    hsae_cfg = demo_config(steps or DEMO_STEPS, progress, seed)
    reports = {}
    for name, cfg in (("hsae", hsae_cfg), ("baseline", _baseline(hsae_cfg))):
        print(
            f"training {name}: levels {list(cfg.model.sizes)}, target L0 "
            f"{cfg.model.target_l0:g}, {cfg.train.steps} steps of {cfg.train.batch_size}"
        )
        result = pipeline.train(cfg, source, out / name)
        reports[name] = pipeline.evaluate_model(
            result.model, result.hierarchy.parents, source, EVAL_TOKENS
        )
        reports[name]["train"] = result.summary
        if name == "hsae":
            copies = [set(pair.get("copy_children", [])) for pair in reports[name]["pairs"]]
            tree = describe_tree(result.model, result.hierarchy.parents, forest, copies)
    report = {**reports, "seconds": round(time.perf_counter() - started, 1)}
    print()
    print(format_report(reports))
    print()
    print(tree)
    atomic_write_json(out / "report.json", report)
    print(
        f"\nwrote {out / 'report.json'}, models in {out / 'hsae' / 'model'} and "
        f"{out / 'baseline' / 'model'} ({report['seconds']:.0f} s)"
    )
    return report


def _baseline(cfg: RunConfig) -> RunConfig:
    return RunConfig(model=cfg.model.baseline(), train=cfg.train)


def true_name(forest: PlantedForest, index: int) -> str:
    """'T3.1.0': tree 3, its root's child 1, that child's child 0; 'I7': independent 7."""
    if int(forest.tree[index]) < 0:
        return f"I{index - forest.n_tree_nodes}"
    path = []
    while index >= 0:
        parent = int(forest.parent[index])
        siblings = (forest.parent == parent) & (forest.tree == forest.tree[index])
        path.append(int(siblings[:index].sum()) if parent >= 0 else int(forest.tree[index]))
        index = parent
    return "T" + ".".join(map(str, reversed(path)))


def describe_tree(
    model: HSAE,
    parents: list,
    forest: PlantedForest,
    copies: list[set[int]],
    max_children: int = 4,
) -> str:
    """The learned tree, rooted at level 0, with the most links that are not copies
    (``copies[l]``: the level-(l+1) children whose link is a copy, hsae.evaluation.metrics) between
    features that match a planted one (cosine >= 0.9); each feature named by its match, or
    '?' if none, and each copy marked. Says so when every link is a copy."""
    matches = [match_features(forest, w.detach()).tolist() for w in model.W_dec]
    children = [children_lists(p, n) for p, n in zip(parents, model.sizes)]

    def refinements(level: int, i: int) -> int:
        """Non-copy links below feature i whose two ends match planted features."""
        if level >= len(children):
            return 0
        return sum(
            (j not in copies[level] and matches[level][i] >= 0 and matches[level + 1][j] >= 0)
            + refinements(level + 1, j)
            for j in children[level][i]
        )

    def lines(level: int, i: int, indent: str, copy: bool) -> list[str]:
        m = matches[level][i]
        label = (true_name(forest, m) if m >= 0 else "?") + ("  (copy)" if copy else "")
        out = [f"{indent}level {level} #{i:<4} = {label}"]
        if level < len(children):
            kids = sorted(children[level][i], key=lambda j: -refinements(level + 1, j))
            for j in kids[:max_children]:
                out += lines(level + 1, j, indent + "    ", j in copies[level])
            if len(kids) > max_children:
                out.append(f"{indent}    ... {len(kids) - max_children} more")
        return out

    root = max(range(model.sizes[0]), key=lambda i: refinements(0, i))
    if refinements(0, root) == 0:
        return "no learned tree has a link that is not a copy between two planted features"
    header = (
        "the learned tree with the most non-copy links between planted features "
        "(T3.1 = tree 3, its child 1):"
    )
    return "\n".join([header, *lines(0, root, "  ", False)])
