"""Figures from evaluation reports, as PNG: the paper's Figure 3 (forests side by side:
Hamming, P(p|c), P(c|p) and the judge's yes-rate), the same per level pair, and the
ablation charts (Figures 4, 7, 9: one bar per run; Figure 8: FVE against Hamming).

`hsae eval MODEL --baseline BASE --plots DIR` draws the first two from a fresh
evaluation; `hsae plots compare|ablation REPORT.json ...` draws them from saved reports
(`hsae eval --out`, or any JSON object whose values are such reports, as the demo's
report.json); `hsae plots curves RUN` draws a run's training log. matplotlib is imported
only when a figure is drawn, with the Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import io as _bytes_io
import math
from dataclasses import dataclass
from pathlib import Path

from hsae.flags import Command, option
from hsae.io import FormatError, atomic_write_bytes, load_json

MEASURES = [
    ("hamming", "(a) Parent-child alignment:\nHamming distance ↓"),
    ("p_parent_given_child", "(b) P(act_p | act_c) ↑"),
    ("p_child_given_parent", "(c) P(act_c | act_p) ↑"),
]
SHORT = {"hamming": "Hamming ↓", "p_parent_given_child": "P(p|c) ↑",
         "p_child_given_parent": "P(c|p) ↑"}  # fmt: skip
JUDGE_TITLE = "(d) AutoInterp:\njudge yes-rate ↑"
PER_LEVEL = [("fve", "FVE per level ↑"), ("l0", "L0 per level")]
SKIP_IN_JUDGE = {"by_level_pair", "by_confidence", "records", "difference", "clarity",
                 "branching", "labels"}  # fmt: skip
"""Parts of a judge report that hold yes-rates other than a model's overall one."""


# ---------------------------------------------------------------- reading reports


def _number(value: object) -> float | None:
    if value is None:
        return float("nan")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def check_report(report: dict, where: str, per_level: bool = False) -> dict:
    """One model's eval report (see hsae.evaluation.metrics.evaluate), checked for what we draw."""
    for key, _ in MEASURES:
        if key not in report or _number(report[key]) is None:
            raise FormatError(f"{where}: '{key}' must be a number, got {report.get(key)!r}")
    pairs = report.get("pairs")
    if not isinstance(pairs, list) or not all(isinstance(p, dict) for p in pairs):
        raise FormatError(f"{where}: 'pairs' must be a list of per-level-pair measures")
    for p in pairs:
        for key, _ in MEASURES:
            if key not in p or _number(p[key]) is None:
                raise FormatError(f"{where}: a level pair's '{key}' is missing or not a number")
    for key, _ in PER_LEVEL if per_level else []:
        values = report.get(key)
        if not isinstance(values, list) or any(_number(v) is None for v in values):
            raise FormatError(f"{where}: '{key}' must be a list of numbers, one per level")
    return report


def load_reports(path: str | Path, per_level: bool = False) -> dict[str, dict]:
    """{name: report}: a single report is named after its file; an object whose values
    are reports (eval --baseline --out, the demo's report.json) gives one per key."""
    obj = load_json(path)
    if "hamming" in obj:
        return {Path(path).stem: check_report(obj, str(path), per_level)}
    found = {k: v for k, v in obj.items() if isinstance(v, dict) and "hamming" in v}
    if not found:
        raise FormatError(
            f"{path}: not an eval report (no 'hamming'; write one with hsae eval --out)"
        )
    return {k: check_report(v, f"{path}: {k}", per_level) for k, v in found.items()}


def _interval(node: dict) -> tuple[float, float]:
    ci = node.get("ci95", node.get("ci"))
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_number(v) is not None for v in ci):
        return float(ci[0]), float(ci[1])
    lo, hi = node.get("ci_low", node.get("ci95_low")), node.get("ci_high", node.get("ci95_high"))
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        return float(lo), float(hi)
    return float("nan"), float("nan")


def _find_rate(obj: dict, name: str) -> dict | None:
    """The shallowest dict with a numeric 'yes_rate' under a key equal to ``name``."""
    frontier: list[tuple[dict, bool]] = [(obj, False)]
    while frontier:
        level = []
        for node, named in frontier:
            if named and isinstance(node.get("yes_rate"), (int, float)):
                return node
            for key, child in node.items():
                if isinstance(child, dict) and key not in SKIP_IN_JUDGE:
                    level.append((child, named or key == name))
        frontier = level
    return None


def judge_rates(path: str | Path, names: list[str]) -> dict[str, tuple[float, float, float]]:
    """{name: (yes_rate, ci_low, ci_high)} from an `hsae judge` report, for the names it
    has (read defensively: the rate under a key named like the model, CI as 'ci95')."""
    obj = load_json(path)
    rates = {}
    for name in names:
        node = _find_rate(obj, name)
        if node is not None:
            rates[name] = (float(node["yes_rate"]), *_interval(node))
    if not rates:
        raise FormatError(f"{path}: no yes-rate for {', '.join(names)} (an hsae judge report?)")
    return rates


# ---------------------------------------------------------------- drawing


def new_figure(n_panels: int, size: tuple[float, float] | None = None, columns: int = 4):
    """A Figure on the Agg canvas and its list of Axes (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(columns, n_panels)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=size or (3.6 * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, k + 1) for k in range(n_panels)]
    return fig, axes


def save_png(fig, path: str | Path) -> Path:
    """Render ``fig`` to PNG in memory, then write it atomically."""
    path = Path(path)
    buffer = _bytes_io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _bars(ax, names: list[str], values: list[float], title: str, errors=None) -> None:
    """One bar per model, its value written above it; NaN is drawn as no bar, 'n/a'."""
    bars = ax.bar(range(len(names)), values, color=[f"C{k}" for k in range(len(names))],
                  yerr=errors, capsize=4)  # fmt: skip
    ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=8)
    for k, v in enumerate(values):
        if math.isnan(v):  # bar_label leaves a NaN bar unlabelled
            ax.text(k, 0, "n/a", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 3 else 0, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.margins(y=0.15)


def _grouped(ax, names: list[str], table: list[list[float]], groups: list[str], title: str):
    """Bars grouped by ``groups`` (level or level pair), one colour per model; table[m][g]."""
    width = 0.8 / max(len(names), 1)
    for m, (name, row) in enumerate(zip(names, table)):
        xs = [g + (m - (len(names) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, row, width, label=name, color=f"C{m}")
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.margins(y=0.1)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False,
              ncol=min(len(names), 2))  # below the axes: never over a bar  # fmt: skip


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def _pad(rows: list[list], width: int) -> list[list[float]]:
    return [[_number(v) for v in row] + [math.nan] * (width - len(row)) for row in rows]


def comparison_figure(reports: dict[str, dict], judge: dict | None = None):
    """Figure 3: one panel per measure, one bar per model; the judge's panel if given."""
    names = list(reports)
    fig, axes = new_figure(len(MEASURES) + (judge is not None))
    for ax, (key, title) in zip(axes, MEASURES):
        _bars(ax, names, [_number(reports[n][key]) for n in names], title)
    if judge is not None:
        shown = [n for n in names if n in judge]
        rates = [judge[n][0] for n in shown]
        errors = [[max(r - judge[n][1], 0) for n, r in zip(shown, rates)],
                  [max(judge[n][2] - r, 0) for n, r in zip(shown, rates)]]  # fmt: skip
        if all(math.isnan(e) for row in errors for e in row):
            errors = None
        _bars(axes[-1], shown, rates, JUDGE_TITLE, errors)
    return fig


def pairs_figure(reports: dict[str, dict]):
    """Figure 3's three measures per level pair (0→1, 1→2, ...), one colour per model."""
    names = list(reports)
    n_pairs = max(len(r["pairs"]) for r in reports.values())
    groups = [f"{k}→{k + 1}" for k in range(n_pairs)]
    fig, axes = new_figure(len(MEASURES))
    for ax, (key, _) in zip(axes, MEASURES):
        table = _pad([[p[key] for p in reports[n]["pairs"]] for n in names], n_pairs)
        _grouped(ax, names, table, groups, f"{SHORT[key]} per level pair")
    return fig


def ablation_figure(reports: dict[str, dict]):
    """Runs side by side: the three measures, FVE and L0 per level, and mean FVE
    against Hamming (the paper's Figure 8 trade-off)."""
    names = list(reports)
    fig, axes = new_figure(len(MEASURES) + len(PER_LEVEL) + 1, columns=3)
    for ax, (key, title) in zip(axes, MEASURES):
        _bars(ax, names, [_number(reports[n][key]) for n in names], title)
    n_levels = max(len(r["fve"]) for r in reports.values())
    levels = [str(k) for k in range(n_levels)]
    for ax, (key, title) in zip(axes[len(MEASURES) :], PER_LEVEL):
        _grouped(ax, names, _pad([reports[n][key] for n in names], n_levels), levels, title)
    ax = axes[-1]
    for m, name in enumerate(names):
        fve = [v for v in map(_number, reports[name]["fve"]) if not math.isnan(v)]
        x, y = _number(reports[name]["hamming"]), sum(fve) / max(len(fve), 1)
        ax.scatter([x], [y], color=f"C{m}", label=name)
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.ticklabel_format(useOffset=False)
    ax.margins(0.2)
    ax.set_xlabel("Hamming ↓", fontsize=8)
    ax.set_ylabel("mean FVE over levels ↑", fontsize=8)
    ax.set_title("Hierarchy consistency vs reconstruction", fontsize=9)
    return fig


# ---------------------------------------------------------------- writing


def write_comparison(reports: dict[str, dict], out: str | Path, judge=None) -> list[Path]:
    out = Path(out)
    figures = {"figure3.png": comparison_figure(reports, judge), "level_pairs.png":
               pairs_figure(reports)}  # fmt: skip
    return [save_png(fig, out / name) for name, fig in figures.items()]


def write_ablation(reports: dict[str, dict], out: str | Path) -> list[Path]:
    return [save_png(ablation_figure(reports), Path(out) / "ablation.png")]


# ---------------------------------------------------------------- training curves

CURVES = [
    ("loss terms (section 3.1)", ["reconstruction", "sparsity", "pc", "ghost"], True),
    ("L0 per level", ["l0"], False),
    ("FVE per level", ["fve"], False),
    ("λ per level", ["lambda"], True),
    ("dead fraction per level", ["dead_frac"], False),
    ("learning rate", ["lr"], False),
]


def curves_figure(records: list[dict]):
    """One panel per CURVES entry against the step: scalars by name, lists by level."""
    fig, axes = new_figure(len(CURVES), columns=3)
    steps = [r["step"] for r in records]
    for ax, (title, keys, log_scale) in zip(axes, CURVES, strict=True):
        for key in keys:
            values = [r.get(key) for r in records]
            if values and isinstance(values[0], list):
                for level in range(len(values[0])):
                    ax.plot(steps, [v[level] for v in values], label=f"level {level}")
            elif any(v for v in values):
                ax.plot(steps, values, label=key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if log_scale:
            ax.set_yscale("symlog", linthresh=1e-4)
        ax.legend(fontsize=7)
    return fig


def write_curves(run_dir: str | Path, out: str | Path) -> list[Path]:
    from hsae.method.train_log import LOG_FILE, read_log

    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        raise FormatError(f"{path}: no training log (runs older than the log have none)")
    records = read_log(path)
    if not records:
        raise FormatError(f"{path}: the training log holds no line yet")
    return [save_png(curves_figure(records), Path(out) / "curves.png")]


def named_reports(paths: list[str], labels: str | None, per_level: bool) -> dict[str, dict]:
    """All reports of all files, renamed by --names (comma-separated) when given."""
    reports: dict[str, dict] = {}
    for path in paths:
        for name, report in load_reports(path, per_level).items():
            if name in reports and labels is None:
                raise ValueError(f"two reports are named {name!r}; name them with --names")
            reports[f"{name}#{len(reports)}" if name in reports else name] = report
    if labels is not None:
        names = [s.strip() for s in labels.split(",")]
        if len(names) != len(reports) or len(set(names)) != len(names) or "" in names:
            raise ValueError(f"--names needs {len(reports)} distinct names, got {labels!r}")
        reports = dict(zip(names, reports.values()))
    return reports


@dataclass(kw_only=True)
class AblationOptions:
    reports: list[str] = option(help="eval reports (hsae eval --out)", positional=True)
    names: str | None = option(None, "comma-separated names, one per report")
    out: str = option(help="output directory for the PNGs", output="dir")


@dataclass(kw_only=True)
class CompareOptions(AblationOptions):
    judge: str | None = option(None, "an hsae judge report: adds the yes-rate panel")


@dataclass(kw_only=True)
class CurvesOptions:
    run_dir: str = option(help="run directory (hsae train --out)", positional=True)
    out: str = option(help="output directory for curves.png", output="dir")


def compare(opts: CompareOptions) -> None:
    reports = named_reports(opts.reports, opts.names, per_level=False)
    judge = judge_rates(opts.judge, list(reports)) if opts.judge else None
    print("wrote " + ", ".join(map(str, write_comparison(reports, opts.out, judge))))


def ablation(opts: AblationOptions) -> None:
    reports = named_reports(opts.reports, opts.names, per_level=True)
    print("wrote " + ", ".join(map(str, write_ablation(reports, opts.out))))


def curves(opts: CurvesOptions) -> None:
    print("wrote " + ", ".join(map(str, write_curves(opts.run_dir, opts.out))))


COMMANDS = (
    "plots",
    "PNG figures from saved eval reports (hsae eval --out) or a run's training log",
    [
        Command(
            "compare",
            "Figure 3: the forests' hierarchy measures side by side",
            CompareOptions,
            compare,
        ),  # fmt: skip
        Command(
            "ablation", "runs side by side: hierarchy measures, FVE, L0", AblationOptions, ablation
        ),  # fmt: skip
        Command("curves", "a run's training curves (its train_log.jsonl)", CurvesOptions, curves),
    ],
)
