"""Figures: the bars drawn hold the reports' values, PNGs are written, `hsae eval --plots`
compares two forests on the same tokens, and bad reports give one-line errors."""

from __future__ import annotations

import json
import math

import pytest
from test_cli import assert_one_line_error, run_cli, train_argv

from hsae.cli import main
from hsae.evaluation import plots
from hsae.io import FormatError

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"


def report(hamming: float, pgc: float, pcg: float, fve: list[float], l0: list[float]) -> dict:
    """A hand-made eval report; each level pair's values are offsets of the means."""
    pairs = [{"hamming": hamming + k, "p_parent_given_child": pgc - 0.1 * k,
              "p_child_given_parent": pcg + 0.01 * k} for k in range(len(fve) - 1)]  # fmt: skip
    return {"hamming": hamming, "p_parent_given_child": pgc, "p_child_given_parent": pcg,
            "fve": fve, "l0": l0, "pairs": pairs}  # fmt: skip


HSAE = report(11.8, 0.711, 0.351, [0.736, 0.780, 0.792], [17.0, 17.2, 18.1])
BASE = report(16.4, 0.583, 0.308, [0.729, 0.779, 0.806], [16.7, 16.8, 23.3])
JUDGE = {  # the layout `hsae judge --out` writes (README, "Judge the links")
    "judge": {"url": "http://127.0.0.1:1/v1", "model": "m", "temperature": 0},
    "models": {
        "hsae": {"model_dir": "a", "links": {
            "yes_rate": 0.62, "ci95": [0.55, 0.69],
            "by_level_pair": {"0-1": {"yes_rate": 0.1, "ci95": [0, 1]}}},
            "branching": {"multi_child": {"mean": 0.9}}},
        "baseline": {"links": {"yes_rate": 0.48, "ci95": [0.41, 0.55]}},
    },
    "difference": {"yes_rate": 0.14, "ci95": [0.04, 0.24]},
}  # fmt: skip


def heights(ax) -> list[float]:
    return [p.get_height() for p in ax.patches]


def write(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


# ---------------------------------------------------------------- chart data


def test_figure3_bars_hold_the_reports_values():
    rates = {"hsae": (0.62, 0.55, 0.69), "baseline": (0.48, 0.41, 0.55)}
    fig = plots.comparison_figure({"hsae": HSAE, "baseline": BASE}, rates)
    axes = fig.axes
    assert len(axes) == 4
    assert heights(axes[0]) == pytest.approx([11.8, 16.4])
    assert heights(axes[1]) == pytest.approx([0.711, 0.583])
    assert heights(axes[2]) == pytest.approx([0.351, 0.308])
    assert heights(axes[3]) == pytest.approx([0.62, 0.48])
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["hsae", "baseline"]
    assert "Hamming" in axes[0].get_title() and "judge" in axes[3].get_title()
    # the judge's intervals are the error bars: segments from ci_low to ci_high
    segments = axes[3].collections[0].get_segments()
    assert [(s[0][1], s[1][1]) for s in segments] == [
        pytest.approx((0.55, 0.69)), pytest.approx((0.41, 0.55))]  # fmt: skip


def test_figure3_without_judge_has_three_panels():
    fig = plots.comparison_figure({"hsae": HSAE, "baseline": BASE})
    assert len(fig.axes) == 3


def test_level_pair_bars():
    fig = plots.pairs_figure({"hsae": HSAE, "baseline": BASE})
    ham, pgc, _ = fig.axes
    # one bar per (model, pair), model by model
    assert heights(ham) == pytest.approx([11.8, 12.8, 16.4, 17.4])
    assert heights(pgc) == pytest.approx([0.711, 0.611, 0.583, 0.483])
    assert [t.get_text() for t in ham.get_xticklabels()] == ["0→1", "1→2"]


def test_ablation_bars_and_tradeoff_points():
    runs = {"w/o constraint": BASE, "full": HSAE}
    fig = plots.ablation_figure(runs)
    axes = fig.axes
    assert heights(axes[0]) == pytest.approx([16.4, 11.8])
    assert heights(axes[3]) == pytest.approx(BASE["fve"] + HSAE["fve"])
    assert heights(axes[4]) == pytest.approx(BASE["l0"] + HSAE["l0"])
    points = [tuple(c.get_offsets()[0]) for c in axes[5].collections]
    assert points == [pytest.approx((16.4, sum(BASE["fve"]) / 3)),
                      pytest.approx((11.8, sum(HSAE["fve"]) / 3))]  # fmt: skip


def test_nan_measure_is_no_bar_and_labelled():
    missing = dict(HSAE, p_parent_given_child=float("nan"))
    fig = plots.comparison_figure({"hsae": missing, "baseline": BASE})
    assert math.isnan(heights(fig.axes[1])[0])
    assert "n/a" in [t.get_text() for t in fig.axes[1].texts]


def test_judge_rates_read_defensively(tmp_path):
    rates = plots.judge_rates(write(tmp_path / "j.json", JUDGE), ["hsae", "baseline"])
    assert rates == {"hsae": (0.62, 0.55, 0.69), "baseline": (0.48, 0.41, 0.55)}
    flat = {"hsae": {"yes_rate": 0.5, "ci_low": 0.4, "ci_high": 0.6}}
    rates = plots.judge_rates(write(tmp_path / "f.json", flat), ["hsae", "baseline"])
    assert rates == {"hsae": (0.5, 0.4, 0.6)}
    with pytest.raises(FormatError, match="no yes-rate"):
        plots.judge_rates(write(tmp_path / "n.json", {"hsae": {"score": 1}}), ["hsae"])


# ---------------------------------------------------------------- files and commands


def test_plots_ablation_command_writes_a_png(tmp_path, capsys):
    files = [write(tmp_path / f"{n}.json", r) for n, r in (("a", BASE), ("b", HSAE))]
    both = write(tmp_path / "both.json", {"hsae": HSAE, "baseline": BASE, "seconds": 3})
    out = tmp_path / "figs"
    argv = ["plots", "ablation", *files, both, "--names", "base,full,h2,b2", "--out", out]
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 0, err
    data = (out / "ablation.png").read_bytes()
    assert data[:8] == PNG and len(data) > 20_000
    assert "ablation.png" in stdout


@pytest.mark.parametrize(
    "content, needles",
    [
        ("{not json", ["bad.json", "invalid JSON"]),
        ("[1, 2]", ["bad.json", "JSON object"]),
        (json.dumps({"fve": [0.5]}), ["bad.json", "not an eval report"]),
        (json.dumps(dict(HSAE, hamming="x")), ["bad.json", "'hamming'"]),
        (json.dumps(dict(HSAE, pairs=[{"hamming": 1}])), ["bad.json", "level pair"]),
        (json.dumps(dict(HSAE, fve=None)), ["bad.json", "'fve'"]),
    ],
)
def test_plots_bad_report_is_one_line(tmp_path, capsys, content, needles):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    rc, _, err = run_cli(["plots", "ablation", bad, "--out", tmp_path / "o"], capsys)
    assert rc == 2
    assert_one_line_error(err, *needles)
    assert not (tmp_path / "o").exists()


def test_plots_labels_must_match(tmp_path, capsys):
    a = write(tmp_path / "a.json", HSAE)
    rc, _, err = run_cli(["plots", "compare", a, a, "--names", "x", "--out", tmp_path], capsys)
    assert rc == 2
    assert_one_line_error(err, "--names", "2 distinct")
    rc, _, err = run_cli(["plots", "compare", a, a, "--out", tmp_path / "o"], capsys)
    assert rc == 2
    assert_one_line_error(err, "--names")


@pytest.fixture(scope="module")
def two_forests(tmp_path_factory) -> dict:
    """A tiny HSAE and a tiny post-hoc baseline on the same planted forest."""
    root = tmp_path_factory.mktemp("forests")
    baseline = ["--model.links", "posthoc", "--model.rho", "0", "--model.perturb_rate", "0"]
    assert main([str(a) for a in train_argv(root / "hsae")]) == 0
    assert main([str(a) for a in train_argv(root / "base", *baseline)]) == 0
    return {"hsae": root / "hsae", "baseline": root / "base"}


def test_eval_baseline_plots_and_judge(two_forests, tmp_path, capsys):
    judge = write(tmp_path / "judge.json", JUDGE)
    out, report = tmp_path / "figs", tmp_path / "eval.json"
    argv = ["eval", two_forests["hsae"], "--baseline", two_forests["baseline"], "--eval_tokens",
            2048, "--plots", out, "--judge", judge, "--out", report]  # fmt: skip
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 0, err
    reports = json.loads(report.read_text())
    assert set(reports) == {"hsae", "baseline"}
    assert reports["hsae"]["n_tokens"] == reports["baseline"]["n_tokens"] == 2048
    assert reports["hsae"]["hamming"] != reports["baseline"]["hamming"]
    for name in ("figure3.png", "level_pairs.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 20_000
    assert "baseline" in stdout.splitlines()[0]
    # the saved reports draw the same figure again
    rc, _, err = run_cli(["plots", "compare", report, "--out", tmp_path / "again"], capsys)
    assert rc == 0, err


def test_eval_judge_needs_plots_and_a_readable_report(two_forests, tmp_path, capsys):
    rc, _, err = run_cli(["eval", two_forests["hsae"], "--judge", tmp_path / "j.json"], capsys)
    assert rc == 2
    assert_one_line_error(err, "--judge needs --plots")
    bad = write(tmp_path / "bad.json", {"hsae": {"verdicts": []}})
    argv = ["eval", two_forests["hsae"], "--plots", tmp_path / "o", "--judge", bad]
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 2
    assert_one_line_error(err, "bad.json", "no yes-rate")
    assert stdout == "" and not (tmp_path / "o").exists()


def test_curves_plot_the_logged_values(tmp_path):
    """curves.png's lines hold the log's numbers: per level for lists, by name for terms."""
    records = [
        {"step": s, "reconstruction": 10.0 / s, "sparsity": 0.5, "pc": 0.0, "ghost": 0.0,
         "l0": [3.0 + s, 5.0], "fve": [0.5, 0.6], "lambda": [0.1, 0.2], "dead_frac": [0, 0.1],
         "lr": 1e-3}
        for s in (10, 20, 30)
    ]  # fmt: skip
    fig = plots.curves_figure(records)
    terms, l0 = fig.axes[0], fig.axes[1]
    lines = {line.get_label(): list(line.get_ydata()) for line in terms.get_lines()}
    assert lines == {"reconstruction": [1.0, 0.5, 10 / 30], "sparsity": [0.5] * 3}
    assert [list(line.get_ydata()) for line in l0.get_lines()] == [[13, 23, 33], [5, 5, 5]]
    assert list(l0.get_lines()[0].get_xdata()) == [10, 20, 30]


def test_plots_curves_command(tmp_path, capsys):
    from hsae.method.train_log import LOG_FILE

    run = tmp_path / "run"
    rc = main(["train", "--out", str(run), "--model.sizes", "8,16", "--model.target_l0", "3",
               "--train.steps", "20", "--train.batch_size", "128", "--train.log_every", "5",
               "--train.scale_tokens", "512", "--planted.d", "16", "--planted.n_trees", "2",
               "--eval_tokens", "0", "--quiet"])  # fmt: skip
    assert rc == 0 and (run / LOG_FILE).is_file()
    capsys.readouterr()
    assert main(["plots", "curves", str(run), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plots", "curves", str(tmp_path), "--out", str(tmp_path / "figs")]) == 2
    assert "no training log" in capsys.readouterr().err
