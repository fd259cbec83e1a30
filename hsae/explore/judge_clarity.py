"""How clear a feature is: SAEBench's explain-then-detect AutoInterp score, the score the
paper's appendix G.2 compares between roots with several children and roots with one.

1. Explain: the judge labels the feature from its documents, activating tokens marked,
   minus HELD_OUT top and HELD_OUT sampled documents kept back (at most half of each).
2. Detect: given only the label, the judge picks which of a shuffled mix of the held-out
   documents and other features' documents (unmarked) the feature fires on. The score is
   the share of documents classified right: 1 is a label that tells them apart exactly.

The label and the score are also the optional per-feature labels (`hsae judge --labels`).
"""

from __future__ import annotations

import random
from functools import partial

import torch

from hsae.explore.judge_client import ChatClient, map_bounded
from hsae.explore.judge_forest import Forest
from hsae.explore.judge_prompts import (
    DETECT_PROMPT,
    EXPLAIN_PROMPT,
    ask,
    check_readable,
    messages,
    numbered,
    parse_active,
    parse_label,
)
from hsae.explore.judge_stats import mean_interval, welch

HELD_OUT = 2
"""Top and sampled documents (each) kept back from the label to test it (SAEBench: 2 + 2)."""
NEGATIVES = 10
"""Other features' documents mixed in when testing a label (SAEBench: 10 random texts)."""

Feature = tuple[int, int]


def split_documents(forest: Forest, feature: Feature) -> tuple[list[str], list[str]]:
    """(marked documents shown to label the feature, plain held-out documents to test it)."""
    top, sampled = forest.documents(*feature)
    shown, held = [], []
    for docs in (top, sampled):
        keep = len(docs) - min(HELD_OUT, len(docs) // 2)
        shown += [ex.marked() for ex in docs[:keep]]
        held += ["".join(ex.tokens) for ex in docs[keep:]]
    return shown, held


def negatives(forest: Forest, feature: Feature, n: int, rng: random.Random) -> list[str]:
    """One document each of ``n`` other random features of the level. The store keeps no
    random text, so negatives come from other features; should this feature fire on one of
    them too, that can only lower its score."""
    level, index = feature
    top, sampled = forest.documents(level, index)
    avoid = {"".join(ex.tokens) for ex in top + sampled}
    others = [f for f in forest.live[level].nonzero().flatten().tolist() if f != index]
    out: list[str] = []
    for other in rng.sample(others, min(len(others), 4 * n)):
        other_top, other_sampled = forest.documents(level, other)
        text = "".join(rng.choice(other_top + other_sampled).tokens)
        if text not in avoid:
            out.append(text)
            avoid.add(text)
        if len(out) == n:
            break
    return out


def score_feature(client: ChatClient, forest: Forest, seed: int, feature: Feature) -> dict:
    """{"label", "score", "status", "reply"} of one feature (score None when unscored)."""
    shown, held = split_documents(forest, feature)
    sent = messages(EXPLAIN_PROMPT, documents=numbered(shown))
    label, reply = ask(client, EXPLAIN_PROMPT, sent, parse_label)
    out = {"label": label, "score": None, "reply": client.scrub(reply)[:500]}
    if label is None:
        return {**out, "status": "unreadable"}
    if not held:
        return {**out, "status": "too few contexts to test the label"}
    # Seeded by feature, so a rerun sends the same prompt and reads it from the cache.
    rng = random.Random(f"{seed}:{feature[0]}:{feature[1]}")
    docs = [(t, True) for t in held] + [
        (t, False) for t in negatives(forest, feature, NEGATIVES, rng)
    ]
    rng.shuffle(docs)
    sent = messages(DETECT_PROMPT, label=label, documents=numbered([t for t, _ in docs]))
    picked, reply = ask(client, DETECT_PROMPT, sent, partial(parse_active, n=len(docs)))
    out["reply"] = client.scrub(reply)[:500]
    if picked is None:
        return {**out, "status": "unreadable"}
    right = sum((i in picked) == positive for i, (_, positive) in enumerate(docs, start=1))
    return {**out, "score": right / len(docs), "documents": len(docs), "status": "scored"}


class Scorer:
    """Clarity scores of one forest's features, each asked for once per run."""

    def __init__(
        self,
        client: ChatClient,
        forest: Forest,
        seed: int,
        concurrency: int,
        max_unreadable: float,
        progress: bool,
    ):
        self.client, self.forest, self.seed = client, forest, seed
        self.concurrency, self.max_unreadable, self.progress = concurrency, max_unreadable, progress
        self.results: dict[Feature, dict] = {}

    def score(self, features: list[Feature], desc: str) -> list[dict]:
        todo = sorted(set(features) - set(self.results))
        fn = partial(score_feature, self.client, self.forest, self.seed)
        done = map_bounded(self.client, fn, todo, self.concurrency, desc, self.progress)
        self.results.update(zip(todo, done))
        check_readable(
            list(self.results.values()),
            lambda r: r["status"] == "unreadable",
            self.max_unreadable,
            "feature labels",
        )
        return [self.results[f] for f in features]

    def labels(self) -> dict:
        """The explorer's labels file: {"labels": {"<level>:<feature>": {label, score}}}."""
        return {
            "labels": {
                f"{level}:{index}": {"label": r["label"], "score": r["score"]}
                for (level, index), r in sorted(self.results.items())
                if r["label"] is not None
            }
        }


def summary(scores: dict[str, float | None], available: int) -> dict:
    values = [s for s in scores.values() if s is not None]
    out = {
        "roots": available,
        "scored": len(values),
        "unscored": len(scores) - len(values),
        "mean": None,
        "ci95": None,
        "scores": scores,
    }
    if values:
        mean, lo, hi = mean_interval(values)
        out["mean"], out["ci95"] = mean, None if lo is None else [lo, hi]
    return out


def branching(scorer: Scorer, n_roots: int, rng: random.Random) -> dict:
    """G.2: clarity of up to ``n_roots`` roots (level 0) with several children, and as
    many with exactly one, and the difference of the means with Welch's interval."""
    forest = scorer.forest
    if not forest.parents:
        raise ValueError(f"{forest.name}: --branching needs a model with at least two levels")
    links = forest.parents[0]
    children = torch.bincount(links[links >= 0], minlength=forest.store.sizes[0])
    groups = {
        "multi_child": ((children >= 2) & forest.live[0]).nonzero().flatten().tolist(),
        "single_child": ((children == 1) & forest.live[0]).nonzero().flatten().tolist(),
    }
    out: dict = {}
    values = {}
    for name, roots in groups.items():
        chosen = sorted(rng.sample(roots, min(n_roots, len(roots))))
        results = scorer.score([(0, r) for r in chosen], f"{forest.name} {name.replace('_', '-')}")
        out[name] = summary({f"0:{r}": res["score"] for r, res in zip(chosen, results)}, len(roots))
        values[name] = [s for s in out[name]["scores"].values() if s is not None]
    out["difference"] = None
    if values["multi_child"] and values["single_child"]:
        d, lo, hi = welch(values["multi_child"], values["single_child"])
        out["difference"] = {
            "multi_minus_single": d,
            "ci95": None if lo is None else [lo, hi],
            "method": "Welch t",
        }
    return out
