"""`hsae geometry`: is the hierarchy visible in the geometry of the activations? (paper
section 4.6, appendix G.1)

For a sample of parents, the held-out activations that trigger each child are compared
with those that trigger one unrelated feature of the children's level, as a number in the
original d-dimensional space and, for a few parents, as a UMAP picture (PNG).

Definitions (the only place they are stated)
--------------------------------------------
- **Inputs of a feature** in a group: held-out activations x on which the feature fires
  (a > 0) and no other feature of the group does, centred by the mean held-out
  activation (a residual stream shares a large common offset that would put every cosine
  near 1); at most M of them (``--per_feature``), drawn uniformly without replacement
  (the M smallest of seeded uniform priorities). Tokens that fire two features of the
  group are left out, so shared tokens (distance 0) do not count as closeness: the
  measure is about where the inputs lie, not about co-activation (which the paper's G.1
  separates from geometry).
- **Group of a parent P** (level l) with at least two live children (level l+1 features
  linked to P that fire on at least ``min_inputs`` held-out tokens): those children, and
  one **unrelated** feature u of level l+1 that is not a child of P, drawn (seeded) among
  the ten live features whose firing count is closest in log scale to the median of the
  children's. A group counts only if at least two children and u keep ``min_inputs``
  inputs each after leaving out shared tokens.
- d(a, b) = 1 - cos(a, b), the cosine distance of two centred inputs.
- D_sib(P) = mean over unordered pairs of children {i, j} of the mean of d(a, b) over
  a in X_i, b in X_j (inputs of different siblings; a child's own inputs are not paired).
- D_unrel(P) = mean over children i of the mean of d(a, b) over a in X_i, b in U.
- **ratio(P) = D_unrel(P) / D_sib(P)**: above 1 when sibling inputs lie closer to each
  other than to the unrelated feature's inputs; 1 when the siblings are no closer.
- Summary over the measured parents: the mean ratio with a 95 % percentile bootstrap
  interval (parents resampled, 2,000 draws), the mean difference D_unrel - D_sib with its
  interval, and the share of parents whose ratio exceeds 1; also per level pair.
- **Control** (the null): the same summary with each group's children replaced by other
  live features of their level, each drawn like the unrelated one (similar frequency to
  the child it replaces, not linked to P), the unrelated feature kept. Without sibling
  structure the ratio is about 1: the control shows what the measure gives for features
  the hierarchy did not group.

HSAE and a post-hoc baseline get the same measure on the same held-out tokens: the
baseline's children are also linked by encoder cosine, so only how well the links sort
the inputs differs.

Why one file of about 500 lines: the measure, its control groups, its bootstrap intervals
and its pictures are one section of the paper (4.6) and one command.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from hsae import pipeline
from hsae.flags import Command, model_dir_option, option
from hsae.io import atomic_write_json
from hsae.method.hierarchy import children_lists
from hsae.method.model import HSAE
from hsae.trained import TrainedHSAE

BATCH = 1024
N_BOOT = 2000
NEAREST_IN_FREQUENCY = 10
MAX_CHILDREN_SHOWN = 8
"""A UMAP picture shows at most this many children (those with the most inputs)."""


@dataclass
class Group:
    """A parent (level ``level``), its live children and an unrelated feature, all of
    level ``level + 1``; ``inputs[k]`` holds the inputs of ``members[k]``."""

    level: int
    parent: int
    children: list[int]
    unrelated: int
    inputs: list[Tensor] = field(default_factory=list)

    @property
    def members(self) -> list[int]:
        return [*self.children, self.unrelated]


@dataclass(kw_only=True)
class Options:
    """`hsae geometry`'s flags; `measure` reads the sampling settings."""

    model_dir: str = model_dir_option()
    baseline: str | None = option(None, "a second forest (e.g. the post-hoc baseline) to compare")
    out: str = option(help="output directory (geometry.json, PNGs)", output="dir")
    parents: int = option(100, "parents to measure", low=1)
    per_feature: int = option(100, "inputs per feature", low=2)
    min_inputs: int = option(5, "fewest inputs a feature needs", low=2)
    eval_tokens: int = option(65536, "held-out tokens to read", low=1)
    pngs: int = option(6, "UMAP pictures per model", low=0)
    umap_epochs: int | None = option(None, "UMAP epochs (default: UMAP's)", low=1)
    seed: int = option(0, "sampling and UMAP seed")
    data: str | None = option(None, "a .npy file or cache (default: the training data)")
    eval_frac: float = option(0.05, "held-out share of a .npy file", low=0.0, high=0.5)
    quiet: bool = option(False, "no progress bars")

    def validate(self) -> None:
        if self.min_inputs > self.per_feature:
            raise ValueError("--min_inputs cannot exceed --per_feature")


# ---------------------------------------------------------------- the number


def cosine_distances(a: Tensor, b: Tensor) -> Tensor:
    """[len(a), len(b)] matrix of 1 - cos between rows (float64)."""
    a = torch.nn.functional.normalize(a.double(), dim=1)
    b = torch.nn.functional.normalize(b.double(), dim=1)
    return 1.0 - a @ b.T


def closeness(children: list[Tensor], unrelated: Tensor) -> tuple[float, float]:
    """(D_sib, D_unrel) of one group, as defined in the module docstring."""
    if len(children) < 2:
        raise ValueError("closeness needs the inputs of at least two children")
    sib = [
        float(cosine_distances(children[i], children[j]).mean())
        for i in range(len(children))
        for j in range(i + 1, len(children))
    ]
    unrel = [float(cosine_distances(c, unrelated).mean()) for c in children]
    return sum(sib) / len(sib), sum(unrel) / len(unrel)


def bootstrap_ci(values: list[float], seed: int, n_boot: int = N_BOOT) -> list[float]:
    """95 % percentile bootstrap interval of the mean of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return [float("nan"), float("nan")]
    draws = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))
    means = v[draws].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def difference_ci(a: list[float], b: list[float], seed: int, n_boot: int = N_BOOT) -> list[float]:
    """95 % percentile bootstrap interval of mean(a) - mean(b), a and b resampled apart
    (two forests' parents are different parents: nothing pairs them)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 2 or y.size < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    diffs = (x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
             - y[rng.integers(0, y.size, size=(n_boot, y.size))].mean(1))  # fmt: skip
    return [float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))]


def compare(first: dict, second: dict, seed: int) -> dict:
    """Mean ratio of the first forest minus the second's, with its interval."""
    a, b = ([r["ratio"] for r in f["parents"] if math.isfinite(r["ratio"])]
            for f in (first, second))  # fmt: skip
    return {"ratio": first["summary"]["ratio"] - second["summary"]["ratio"],
            "ratio_ci95": difference_ci(a, b, seed)}  # fmt: skip


def summarize(records: list[dict], seed: int) -> dict:
    """Mean ratio and difference over parents with bootstrap intervals; per level pair.
    A parent whose sibling inputs all coincide (D_sib = 0, ratio NaN) is left out."""
    records = [r for r in records if math.isfinite(r["ratio"])]
    ratios = [r["ratio"] for r in records]
    diffs = [r["d_unrel"] - r["d_sib"] for r in records]
    out = {
        "n_parents": len(records),
        "ratio": float(np.mean(ratios)) if ratios else float("nan"),
        "ratio_ci95": bootstrap_ci(ratios, seed),
        "difference": float(np.mean(diffs)) if diffs else float("nan"),
        "difference_ci95": bootstrap_ci(diffs, seed + 1),
        "share_closer": float(np.mean([r > 1 for r in ratios])) if ratios else float("nan"),
    }
    by_pair: dict[str, list[float]] = {}
    for r in records:
        by_pair.setdefault(f"{r['level']}-{r['level'] + 1}", []).append(r["ratio"])
    out["by_level_pair"] = {
        k: {"n_parents": len(v), "ratio": float(np.mean(v)), "ratio_ci95": bootstrap_ci(v, seed)}
        for k, v in sorted(by_pair.items())
    }
    return out


# ---------------------------------------------------------------- collecting inputs


def _batches(model: HSAE, source: pipeline.Source, n_tokens: int, seed: int) -> Iterator:
    """(raw x, activations per level) over the first n_tokens held-out tokens."""
    seen = 0
    for x in source.heldout(n_tokens, BATCH, seed):
        x = x[: n_tokens - seen].float()
        seen += x.shape[0]
        with torch.no_grad():
            yield x, model.encode_raw(x)


def firing_counts(
    model: HSAE, source: pipeline.Source, opts: Options
) -> tuple[list[Tensor], Tensor]:
    """First pass: tokens each feature fires on, per level, and the mean held-out input."""
    counts = [torch.zeros(n, dtype=torch.long) for n in model.sizes]
    total, n = torch.zeros(model.d_in, dtype=torch.float64), 0
    batches = _batches(model, source, opts.eval_tokens, opts.seed)
    for x, acts in tqdm(batches, desc="geometry: counting", disable=opts.quiet):
        for level, a in enumerate(acts):
            counts[level] += (a > 0).sum(0)
        total += x.double().sum(0)
        n += x.shape[0]
    if n == 0:
        raise ValueError("no held-out activations to measure")
    return counts, (total / n).float()


def choose_groups(parents: list[Tensor], counts: list[Tensor], opts: Options) -> list[Group]:
    """Every parent with >= 2 live children, in a seeded random order, each with an
    unrelated feature of similar frequency (see the module docstring)."""
    rng = random.Random(opts.seed)
    groups = []
    for level, parent in enumerate(parents):
        live = counts[level + 1] >= opts.min_inputs
        log_count = counts[level + 1].double().clamp(min=1).log()
        for p, kids in enumerate(children_lists(parent, len(counts[level]))):
            kids = [c for c in kids if live[c]]
            if len(kids) < 2:
                continue
            others = live & (parent != p)  # any live feature of the level but P's children
            unrelated = similar(others, log_count, float(log_count[kids].median()), rng)
            if unrelated is not None:
                groups.append(Group(level, p, kids, unrelated))
    rng.shuffle(groups)
    return groups


def similar(allowed: Tensor, log_count: Tensor, target: float, rng: random.Random) -> int | None:
    """A random feature among the allowed ones closest to ``target`` in log frequency."""
    candidates = allowed.nonzero().flatten().tolist()
    candidates.sort(key=lambda j: abs(float(log_count[j]) - target))
    return rng.choice(candidates[:NEAREST_IN_FREQUENCY]) if candidates else None


def control_groups(
    groups: list[Group], parents: list[Tensor], counts: list[Tensor], opts: Options
) -> list[Group]:
    """The null: each group's children replaced by live features of the same level and
    similar frequency, no two of them siblings, none a child of the group's parent (the
    unrelated feature is kept)."""
    rng = random.Random(opts.seed + 1)
    out = []
    for g in groups:
        log_count = counts[g.level + 1].double().clamp(min=1).log()
        parent = parents[g.level]
        allowed = (counts[g.level + 1] >= opts.min_inputs) & (parent != g.parent)
        allowed[g.unrelated] = False
        stand_ins = []
        for child in g.children:
            pick = similar(allowed, log_count, float(log_count[child]), rng)
            if pick is None:
                break
            stand_ins.append(pick)
            allowed[pick] = False
            if parent[pick] >= 0:
                allowed[parent == parent[pick]] = False  # no two stand-ins are siblings
        if len(stand_ins) == len(g.children):
            out.append(Group(g.level, g.parent, stand_ins, g.unrelated))
    return out


class _Reservoir:
    """The ``size`` rows with the smallest priorities seen so far (a uniform sample)."""

    def __init__(self, size: int, d: int):
        self.size = size
        self.priority = torch.empty(0)
        self.rows = torch.empty(0, d)

    def add(self, priority: Tensor, rows: Tensor) -> None:
        self.priority = torch.cat([self.priority, priority])
        self.rows = torch.cat([self.rows, rows])
        if self.priority.numel() > self.size:
            keep = self.priority.topk(self.size, largest=False).indices
            self.priority, self.rows = self.priority[keep], self.rows[keep]


def collect_inputs(
    model: HSAE, source: pipeline.Source, groups: list[Group], mean: Tensor, opts: Options
) -> None:
    """Second pass: fill ``group.inputs`` with each member's exclusive, centred inputs."""
    gen = torch.Generator().manual_seed(opts.seed)
    pools = [[_Reservoir(opts.per_feature, model.d_in) for _ in g.members] for g in groups]
    index = [torch.tensor(g.members) for g in groups]
    batches = _batches(model, source, opts.eval_tokens, opts.seed)
    for x, acts in tqdm(batches, desc="geometry: collecting", disable=opts.quiet):
        centred = x - mean
        for group, members, pool in zip(groups, index, pools):
            fired = acts[group.level + 1][:, members] > 0
            alone = fired & (fired.sum(1, keepdim=True) == 1)
            priority = torch.rand(alone.shape, generator=gen)
            for k, reservoir in enumerate(pool):
                rows = alone[:, k].nonzero().flatten()
                if rows.numel():
                    reservoir.add(priority[rows, k], centred[rows])
    for group, pool in zip(groups, pools):
        group.inputs = [reservoir.rows for reservoir in pool]


def usable(group: Group, min_inputs: int) -> Group | None:
    """The group without children short of inputs; None if it cannot be measured."""
    if group.inputs[-1].shape[0] < min_inputs:
        return None
    kept = [(c, x) for c, x in zip(group.children, group.inputs) if x.shape[0] >= min_inputs]
    if len(kept) < 2:
        return None
    inputs = [x for _, x in kept] + [group.inputs[-1]]
    return Group(group.level, group.parent, [c for c, _ in kept], group.unrelated, inputs)


def measure(
    model: HSAE, parents: list[Tensor], source: pipeline.Source, opts: Options
) -> tuple[dict, list[Group]]:
    """The geometry report of one forest and its measured groups (inputs included)."""
    counts, mean = firing_counts(model, source, opts)
    candidates = choose_groups(parents, counts, opts)
    if not candidates:
        raise ValueError(
            f"no parent has two or more children firing on at least {opts.min_inputs} "
            "held-out tokens (and an unrelated feature to compare with); nothing to measure"
        )
    eligible = len(candidates)
    # Some groups lose children to shared tokens: collect for more than asked.
    candidates = candidates[: math.ceil(1.5 * opts.parents)]
    control = control_groups(candidates, parents, counts, opts)
    collect_inputs(model, source, candidates + control, mean, opts)
    groups, control = (
        [g for g in (usable(g, opts.min_inputs) for g in gs) if g is not None][: opts.parents]
        for gs in (candidates, control)
    )
    if not groups:
        raise ValueError(
            f"no parent keeps two children and an unrelated feature with {opts.min_inputs} "
            "inputs each once shared tokens are left out; use more --eval_tokens"
        )
    records = [record(g) for g in groups]
    report = {
        "summary": summarize(records, opts.seed),
        "control": summarize([record(g) for g in control], opts.seed),
        "eligible_parents": eligible,
    }
    return report | {"parents": records}, groups


def record(group: Group) -> dict:
    d_sib, d_unrel = closeness(group.inputs[:-1], group.inputs[-1])
    return {
        "level": group.level,
        "parent": group.parent,
        "children": group.children,
        "unrelated": group.unrelated,
        "n_inputs": [int(x.shape[0]) for x in group.inputs],
        "d_sib": d_sib,
        "d_unrel": d_unrel,
        "ratio": d_unrel / d_sib if d_sib > 0 else float("nan"),
    }


# ---------------------------------------------------------------- UMAP pictures


def project(inputs: list[Tensor], seed: int, n_epochs: int | None = None) -> np.ndarray:
    """2-D UMAP embedding (cosine metric) of all the given inputs, stacked in order."""
    import umap  # heavy (numba): imported only when a picture is drawn

    x = torch.cat(inputs).numpy()
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(15, len(x) - 1),
        metric="cosine",
        random_state=seed,
        n_epochs=n_epochs,
        n_jobs=1,
    )
    return reducer.fit_transform(x)


def picture(group: Group, title: str, seed: int, n_epochs: int | None = None):
    """A matplotlib Figure: the UMAP of up to MAX_CHILDREN_SHOWN children (one colour
    each) and the unrelated feature (grey), legend entries named level:index."""
    from hsae.evaluation.plots import new_figure

    shown = sorted(range(len(group.children)), key=lambda k: -group.inputs[k].shape[0])
    shown = sorted(shown[:MAX_CHILDREN_SHOWN])
    sets = [group.inputs[k] for k in shown] + [group.inputs[-1]]
    xy = project(sets, seed, n_epochs)
    fig, ax = new_figure(1, size=(6.0, 5.0))
    child_level, start = group.level + 1, 0
    for pos, x in enumerate(sets):
        pts = xy[start : start + x.shape[0]]
        start += x.shape[0]
        if pos < len(shown):
            label = f"{child_level}:{group.children[shown[pos]]} (child)"
            ax[0].scatter(pts[:, 0], pts[:, 1], s=10, alpha=0.8, label=label)
        else:
            label = f"{child_level}:{group.unrelated} (unrelated)"
            ax[0].scatter(pts[:, 0], pts[:, 1], s=10, c="0.6", marker="x", label=label)
    ax[0].set_title(title, fontsize=10)
    ax[0].set_xticks([])
    ax[0].set_yticks([])
    ax[0].legend(fontsize=7, loc="best", markerscale=1.5)
    return fig


def write_pictures(groups: list[Group], name: str, out: Path, opts: Options) -> list[Path]:
    """One PNG per group for the first ``opts.pngs`` groups: out/name/parent_L_P.png."""
    from hsae.evaluation.plots import save_png

    paths = []
    todo = groups[: opts.pngs]
    for group in tqdm(todo, desc=f"geometry: UMAP ({name})", disable=opts.quiet):
        rec = record(group)
        title = (
            f"{name}: children of {group.level}:{group.parent} vs unrelated "
            f"{group.level + 1}:{group.unrelated}\nD_unrel / D_sib = {rec['ratio']:.3f}"
        )
        path = out / name / f"parent_{group.level}_{group.parent}.png"
        save_png(picture(group, title, opts.seed, opts.umap_epochs), path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- command


def run(opts: Options) -> None:
    out = Path(opts.out)
    trained = TrainedHSAE.load(opts.model_dir)
    source = pipeline.measured_source(trained, opts.data, opts.eval_frac)
    forests = {"hsae": (opts.model_dir, trained.model, trained.parents)}
    if opts.baseline:
        base = TrainedHSAE.load(opts.baseline)
        if base.d_in != trained.d_in:
            raise ValueError(f"{opts.baseline}: d_in {base.d_in}, but {opts.model_dir} has "
                             f"{trained.d_in}; both must read the same activations")  # fmt: skip
        forests["baseline"] = (opts.baseline, base.model, base.parents)
    report = {"definition": "ratio = D_unrel / D_sib (see hsae/explore/geometry.py)",
              "tokens": opts.eval_tokens, "per_feature": opts.per_feature,
              "min_inputs": opts.min_inputs, "seed": opts.seed}  # fmt: skip
    measured = {}
    for name, (directory, m, p) in forests.items():  # every number before any file
        result, measured[name] = measure(m, p, source, opts)
        report[name] = {"model_dir": str(directory), **result}
    if opts.baseline:
        report["hsae_minus_baseline"] = compare(report["hsae"], report["baseline"], opts.seed)
    out.mkdir(parents=True, exist_ok=True)
    pictures = sum(len(write_pictures(g, name, out, opts)) for name, g in measured.items())
    atomic_write_json(out / "geometry.json", report)
    print(format_summary(report, list(forests)))
    print(f"wrote {out / 'geometry.json'} and {pictures} UMAP picture(s) under {out}")


def format_summary(report: dict, names: list[str]) -> str:
    lines = ["sibling inputs vs unrelated inputs, ratio = D_unrel / D_sib (> 1: siblings closer)"]
    for name in names:
        s = report[name]["summary"]
        lo, hi = s["ratio_ci95"]
        dlo, dhi = s["difference_ci95"]
        lines.append(
            f"{name:>9}: ratio {s['ratio']:.3f} [{lo:.3f}, {hi:.3f}]  difference "
            f"{s['difference']:.4f} [{dlo:.4f}, {dhi:.4f}]  closer in "
            f"{100 * s['share_closer']:.0f} % of {s['n_parents']} parents"
        )
        c = report[name]["control"]
        if c["n_parents"]:
            clo, chi = c["ratio_ci95"]
            lines.append(
                f"{'control':>9}: ratio {c['ratio']:.3f} [{clo:.3f}, {chi:.3f}] with "
                f"unlinked stand-ins for the children ({c['n_parents']} parents)"
            )
    if "hsae_minus_baseline" in report:
        d = report["hsae_minus_baseline"]
        lo, hi = d["ratio_ci95"]
        lines.append(f"hsae - baseline: ratio {d['ratio']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return "\n".join(lines)


COMMANDS = [
    Command(
        "geometry",
        "do sibling features' inputs lie closer together? "
        "(paper 4.6, G.1): a number and UMAP pictures",
        Options,
        run,
    )
]
