"""`hsae demo`: the embedded default run.

Builds a planted forest (design §7), trains three methods on the same stream with the
same budget: hsae (the default method), the paper's HSAE (`--model.method paper`) and the
paper's post-hoc baseline; evaluates each on held-out draws, prints them side by side with
the copy-aware measures and the recall of true parent-child pairs, and writes
`report.json` and the three model directories.

Four levels at a CPU-sized scale, a short run, with the training defaults of every run
(the controller scales itself to the run's length).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

from hsae import pipeline
from hsae.config import HSAEConfig, RunConfig, TrainConfig
from hsae.data.planted import PlantedConfig, PlantedForest, match_features
from hsae.evaluation.report_table import format_report
from hsae.io import atomic_write_json
from hsae.method.hierarchy import children_lists
from hsae.method.model import HSAE

DEMO_STEPS = 1500
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
    for name, cfg in methods(hsae_cfg).items():
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
    models = ", ".join(str(out / name / "model") for name in reports)
    print(f"\nwrote {out / 'report.json'}, models in {models} ({report['seconds']:.0f} s)")
    return report


def methods(cfg: RunConfig) -> dict[str, RunConfig]:
    """The demo's three runs: the default method, the paper's HSAE, the post-hoc baseline."""
    paper = dataclasses.replace(cfg.model, method="paper")
    return {
        "hsae": cfg,
        "paper": RunConfig(model=paper, train=cfg.train),
        "baseline": RunConfig(model=cfg.model.baseline(), train=cfg.train),
    }


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
    """The learned tree, rooted at level 0, with the most true links: a link whose parent
    matches a planted feature (cosine >= 0.9) and whose child matches one of its planted
    descendants. ``copies[l]`` are the level-(l+1) children whose link is a copy
    (hsae.evaluation.metrics). Each feature is named by its match, or '?' if none; true
    links and copies are marked. Says so when no link is true."""
    matches = [match_features(forest, w.detach()).tolist() for w in model.W_dec]
    children = [children_lists(p, n) for p, n in zip(parents, model.sizes)]

    def is_true(level: int, i: int, j: int) -> bool:
        """Whether the link from feature i of `level` to its child j is a true link."""
        p, c = matches[level][i], matches[level + 1][j]
        return j not in copies[level] and p >= 0 and c >= 0 and forest.is_ancestor(p, c)

    @functools.cache  # asked again for each subtree while sorting and printing
    def true_links(level: int, i: int) -> int:
        """True links in the subtree below feature i."""
        if level >= len(children):
            return 0
        return sum(is_true(level, i, j) + true_links(level + 1, j) for j in children[level][i])

    def lines(level: int, i: int, indent: str, mark: str) -> list[str]:
        m = matches[level][i]
        out = [f"{indent}level {level} #{i:<4} = {true_name(forest, m) if m >= 0 else '?'}{mark}"]
        if level < len(children):
            kids = sorted(
                children[level][i],
                key=lambda j: (-chain_through(level, i, j), -true_links(level + 1, j)),
            )
            for j in kids[:max_children]:
                mark = "  (true)" if is_true(level, i, j) else ""
                mark = "  (copy)" if j in copies[level] else mark
                out += lines(level + 1, j, indent + "    ", mark)
            if len(kids) > max_children:
                out.append(f"{indent}    ... {len(kids) - max_children} more")
        return out

    @functools.cache
    def true_chain(level: int, i: int) -> int:
        """The most true links in a row down from feature i (2: a planted root -> child ->
        grandchild, say)."""
        if level >= len(children):
            return 0
        return max((chain_through(level, i, j) for j in children[level][i]), default=0)

    def chain_through(level: int, i: int, j: int) -> int:
        """True links in a row from feature i down through its child j (0: not a true link)."""
        return 1 + true_chain(level + 1, j) if is_true(level, i, j) else 0

    def chain_below(level: int, i: int) -> int:
        """The longest true chain starting at feature i or anywhere below it."""
        if level >= len(children):
            return 0
        below = (chain_below(level + 1, j) for j in children[level][i])
        return max(true_chain(level, i), *below, 0)

    root = max(range(model.sizes[0]), key=lambda i: (chain_below(0, i), true_links(0, i)))
    if true_links(0, root) == 0:
        return "no learned link joins a planted feature to one of its planted descendants"
    header = (
        "the learned tree with the longest chain of true links, then the most, a true link "
        "joining a planted feature to one of its planted descendants (T3.1 = tree 3, its "
        "child 1):"
    )
    return "\n".join([header, *lines(0, root, "  ", "")])
