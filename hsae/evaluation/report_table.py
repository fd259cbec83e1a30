"""The side-by-side table `hsae eval`, `hsae train` and the demo print from eval reports."""

from __future__ import annotations

ROWS = [
    ("L0 per level", "l0", "{:.1f}"),
    ("FVE per level", "fve", "{:.3f}"),
    ("links per level pair", "n_links", "{:d}"),
    ("Hamming (lower better)", "hamming", "{:.3f}"),
    ("P(p|c)", "p_parent_given_child", "{:.3f}"),
    ("P(c|p)", "p_child_given_parent", "{:.3f}"),
    ("copy share of links", "copy_share", "{:.3f}"),
    ("Hamming, non-copy links", "noncopy.hamming", "{:.3f}"),
    ("P(p|c), non-copy links", "noncopy.p_parent_given_child", "{:.3f}"),
    ("P(c|p), non-copy links", "noncopy.p_child_given_parent", "{:.3f}"),
    ("recovered per level", "recovered", "{:d}"),
    ("recovered by firing (F1)", "f1_recovered", "{:d}"),
    ("edge precision", "edge_precision", "{:.3f}"),
    ("recall of true edges", "recall", "{:.3f}"),
    ("recall ceiling", "recall_ceiling", "{:.3f}"),
    ("recall / ceiling", "recall_of_ceiling", "{:.3f}"),
    ("loss recovered per level", "loss_recovered", "{:.3f}"),
]


def _lookup(report: dict, dotted: str):
    """report["a"]["b"] for "a.b"; None where a part is missing."""
    for part in dotted.split("."):
        if not isinstance(report, dict) or part not in report:
            return None
        report = report[part]
    return report


def format_report(reports: dict[str, dict]) -> str:
    names = list(reports)
    width = max(24, *(len(label) for label, _, _ in ROWS))
    lines = [f"{'':{width}}  " + "  ".join(f"{n:>26}" for n in names)]
    for label, key, fmt in ROWS:
        values = [_lookup(r, key) for r in reports.values()]
        if any(v is None for v in values):
            continue
        cells = []
        for report, value in zip(reports.values(), values, strict=True):
            if isinstance(value, list):
                text = " ".join(fmt.format(v) for v in value)
            elif value != value and not any(report.get("n_links") or [1]):  # NaN, no link
                text = "no links"
            else:
                text = fmt.format(value)
            cells.append(f"{text:>26}")
        lines.append(f"{label:{width}}  " + "  ".join(cells))
    return "\n".join(lines)
