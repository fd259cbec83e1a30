"""`hsae judge`: an LLM judges the forest's links (paper section 4.3, appendix C) and,
with --branching, the clarity of roots against their number of children (appendix G.2).

Links: N parent-child pairs are drawn per model among those whose two features both have
stored contexts. The judge sees each feature's top and sampled documents with the
activating tokens marked <<like this>>, is not told which one is the parent (which one is
shown first is a seeded coin flip), and answers whether one is a more specific case of
the other. The report gives the yes-rate with a 95 % Wilson interval per model, and the
HSAE minus baseline difference with Newcombe's interval.

Unreadable replies: each is asked again once with a reminder of the format; one still
unreadable is recorded as such and left out of the rates. If none can be read, or more
than --max_unreadable of them, the run stops with a one-line error and writes no report.
An endpoint that cannot be reached, or keeps failing after the retries, stops it too.
Every answer is cached, so a rerun sends only the requests that have no answer yet.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from hsae.explore.judge_clarity import Scorer, branching
from hsae.explore.judge_client import AnswerCache, ChatClient, JudgeSettings, map_bounded
from hsae.explore.judge_forest import Forest
from hsae.explore.judge_prompts import LINK_PROMPT, ask, check_readable, messages, parse_verdict
from hsae.explore.judge_stats import newcombe, wilson
from hsae.flags import Command, model_dir_option, option
from hsae.io import atomic_write_json

# ------------------------------------------------------------------ links


@dataclass(frozen=True)
class Pair:
    level: int
    """The child's level; the parent is in level - 1."""
    child: int
    parent: int
    parent_first: bool


def sample_pairs(forest: Forest, n: int, rng: random.Random) -> tuple[list[Pair], int]:
    """Up to ``n`` links drawn without replacement, and how many there were to draw from."""
    edges = forest.edges()
    if not edges:
        raise ValueError(f"{forest.name}: no parent-child link has contexts at both ends")
    chosen = rng.sample(edges, min(n, len(edges)))
    return [Pair(level, c, p, rng.random() < 0.5) for level, c, p in chosen], len(edges)


def judge_pair(client: ChatClient, forest: Forest, pair: Pair) -> dict:
    parent = forest.marked(pair.level - 1, pair.parent)
    child = forest.marked(pair.level, pair.child)
    a, b = (parent, child) if pair.parent_first else (child, parent)
    verdict, reply = ask(client, LINK_PROMPT, messages(LINK_PROMPT, a=a, b=b), parse_verdict)
    return {
        "parent": [pair.level - 1, pair.parent],
        "child": [pair.level, pair.child],
        "parent_shown_first": pair.parent_first,
        "verdict": None if verdict is None else ("yes" if verdict.related else "no"),
        "confidence": verdict.confidence if verdict else None,
        "reply": client.scrub(reply)[:500],
    }


def rate(records: list[dict]) -> dict:
    """Yes-rate of the readable verdicts with its 95 % Wilson interval."""
    yes = sum(r["verdict"] == "yes" for r in records)
    judged = sum(r["verdict"] is not None for r in records)
    out = {
        "pairs": len(records),
        "judged": judged,
        "yes": yes,
        "unreadable": len(records) - judged,
        "yes_rate": None,
        "ci95": None,
    }
    if judged:
        out["yes_rate"], out["ci95"] = yes / judged, list(wilson(yes, judged))
    return out


def link_report(records: list[dict], eligible: int) -> dict:
    by_pair: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: r["child"][0]):
        by_pair.setdefault(f"{r['child'][0] - 1}-{r['child'][0]}", []).append(r)
    confidences = ("high", "medium", "low")
    return {
        "eligible_pairs": eligible,
        **rate(records),
        "by_level_pair": {k: rate(v) for k, v in by_pair.items()},
        "by_confidence": {
            c: rate([r for r in records if r["confidence"] == c]) for c in confidences
        },
        "records": records,
    }


def difference(a: dict, b: dict) -> dict | None:
    if not a["judged"] or not b["judged"]:
        return None
    d, lo, hi = newcombe(a["yes"], a["judged"], b["yes"], b["judged"])
    return {"yes_rate": d, "ci95": [lo, hi], "method": "Newcombe hybrid score"}


def judge_links(client: ChatClient, forest: Forest, args: JudgeOptions) -> dict:
    pairs, eligible = sample_pairs(forest, args.pairs, random.Random(f"{args.seed}:pairs"))
    fn = partial(judge_pair, client, forest)
    records = map_bounded(
        client, fn, pairs, args.concurrency, f"{forest.name} links", not args.quiet
    )
    check_readable(records, lambda r: r["verdict"] is None, args.max_unreadable, "links")
    return link_report(records, eligible)


# ------------------------------------------------------------------ the command


def _interval(block: dict, key: str) -> str:
    value, ci = block[key], block["ci95"]
    text = "n/a" if value is None else f"{value:.3f}"
    return text + ("" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]")


def summary_lines(report: dict) -> list[str]:
    lines = []
    for name, block in report["models"].items():
        if "links" in block:
            links = block["links"]
            lines.append(
                f"links      {name:>9}: yes-rate {_interval(links, 'yes_rate')}  "
                f"({links['yes']} yes of {links['judged']} judged, "
                f"{links['unreadable']} unreadable)"
            )
    if report.get("difference"):
        diff = report["difference"]
        lines.append(
            f"links  hsae-baseline: {diff['yes_rate']:+.3f} "
            f"[{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]"
        )
    for name, block in report["models"].items():
        if "branching" in block:
            b = block["branching"]
            multi, single = b["multi_child"], b["single_child"]
            lines.append(
                f"branching  {name:>9}: multi-child roots {_interval(multi, 'mean')} "
                f"(n={multi['scored']}), single-child {_interval(single, 'mean')} "
                f"(n={single['scored']})"
            )
    counts = report["requests"]
    lines.append(
        f"requests: {counts['sent']} sent ({counts['retried']} retries), "
        f"{counts['cached']} answered from the cache"
    )
    return lines


def open_client(args: JudgeOptions) -> ChatClient:
    settings = JudgeSettings.resolve(
        args.base_url,
        args.judge_model,
        args.api_key,
        temperature=args.temperature,
        timeout=args.timeout,
        retries=args.retries,
        backoff=args.backoff,
    )
    cache = Path(args.cache) if args.cache else Path(args.out).resolve().parent / "judge_cache"
    return ChatClient(settings, AnswerCache(cache))


def judge_forests(client: ChatClient, forests: list[Forest], args: JudgeOptions) -> dict:
    """Links (and branching) of every model, then labels of the HSAE's judged features."""
    report: dict = {"judge": client.settings.describe(), "models": {}}
    report["settings"] = {k: getattr(args, k) for k in ("pairs", "seed", "top", "sampled", "roots")}
    progress = not args.quiet
    scorers = {
        f.name: Scorer(client, f, args.seed, args.concurrency, args.max_unreadable, progress)
        for f in forests
    }
    for forest in forests:
        block = report["models"][forest.name] = {}
        if args.pairs:
            block["links"] = judge_links(client, forest, args)
        if args.branching:
            rng = random.Random(f"{args.seed}:roots")
            block["branching"] = branching(scorers[forest.name], args.roots, rng)
    if args.pairs and len(forests) == 2:
        report["difference"] = difference(*(b["links"] for b in report["models"].values()))
    if args.labels:
        records = report["models"]["hsae"].get("links", {}).get("records", [])
        judged = {tuple(r[end]) for r in records for end in ("parent", "child")}
        scorers["hsae"].score(sorted(judged), "hsae labels")
        report["labels"] = scorers["hsae"].labels()
    report["requests"] = dict(client.counts)
    return report


def run(args: JudgeOptions) -> None:
    client = open_client(args)
    specs = [("hsae", args.model_dir, args.contexts)]
    if args.baseline:
        specs.append(("baseline", args.baseline, args.baseline_contexts))
    forests = [Forest.load(name, d, c, args.top, args.sampled) for name, d, c in specs]
    report = judge_forests(client, forests, args)
    for name, model_dir, contexts in specs:
        where = {"model_dir": str(model_dir), "contexts": str(contexts)}
        report["models"][name] = {**where, **report["models"][name]}
    labels = report.pop("labels", None)
    atomic_write_json(args.out, report)
    if labels is not None:
        atomic_write_json(args.labels, labels)
    for line in summary_lines(report):
        print(line)
    print(f"wrote {args.out}" + (f" and {args.labels}" if args.labels else ""))


@dataclass(kw_only=True)
class JudgeOptions:
    model_dir: str = model_dir_option()
    contexts: str = option(help="its context store directory")
    baseline: str | None = option(None, "a second trained directory to compare (the baseline)")
    baseline_contexts: str | None = option(None, "the baseline's context store directory")
    pairs: int = option(100, "links judged per model", low=0)
    seed: int = option(0, "sampling seed")
    out: str = option(help="report JSON file", output="file")
    labels: str | None = option(None, "also write a label and clarity score per judged "
                                "feature to this JSON file", output="file")  # fmt: skip
    branching: bool = option(False, "clarity of roots with several children vs one child "
                             "(appendix G.2)")  # fmt: skip
    roots: int = option(100, "roots scored per group with --branching", low=1)
    top: int = option(10, "top documents shown per feature", low=1)
    sampled: int = option(5, "sampled documents per feature", low=0)
    base_url: str | None = option(
        None,
        "chat endpoint (default: $HSAE_JUDGE_BASE_URL, "
        "$OPENAI_BASE_URL, else https://api.openai.com/v1)",
    )
    judge_model: str | None = option(None, "model name (default: $HSAE_JUDGE_MODEL)")
    api_key: str | None = option(
        None,
        "default: $HSAE_JUDGE_API_KEY, else $OPENAI_API_KEY "
        "(prefer the environment: a flag shows in the process list)",
    )
    temperature: float = option(0.0, "sampling temperature", low=0.0)
    concurrency: int = option(4, "requests in flight", low=1)
    timeout: float = option(60.0, "seconds per request", low=0.0)
    retries: int = option(4, "retries per request", low=0)
    backoff: float = option(1.0, "first retry pause in seconds, doubled each time", low=0.0)
    cache: str | None = option(None, "answer cache directory (default: judge_cache beside --out)")
    max_unreadable: float = option(0.2, "largest share of unreadable replies before the run "
                                   "fails", low=0.0, high=1.0)  # fmt: skip
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> None:
        if (self.baseline is None) != (self.baseline_contexts is None):
            raise ValueError("--baseline and --baseline_contexts go together")
        if not (self.pairs or self.branching):
            raise ValueError("nothing to judge: --pairs 0 and no --branching")


COMMANDS = [
    Command(
        "judge",
        "an LLM judges parent-child links (and root clarity) through a chat endpoint",
        JudgeOptions,
        run,
        description="Ask an OpenAI-compatible chat-completions endpoint whether sampled "
        "parent-child links are real (paper section 4.3) and, with --branching, how clear "
        "roots with several children are against roots with one (appendix G.2).",
    )
]
