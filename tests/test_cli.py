"""The `hsae` command line: bad input gives one clear line and a non-zero exit and writes
nothing; good input trains, evaluates and applies config files and flags."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_FOREST_FLAGS

from hsae.cli import main
from hsae.io import load_json, load_safetensors
from hsae.method.train import CHECKPOINT

pytestmark = pytest.mark.usefixtures("one_thread")

# A run that takes well under a second: three small levels on a small planted forest.
SMALL = [
    "--model.sizes", "8,16,32",
    "--model.target_l0", "3",
    "--model.update_every", "10",
    "--train.steps", "30",
    "--train.batch_size", "256",
    "--train.checkpoint_every", "10",
    "--train.lr", "3e-3",
    "--train.lambda_init", "0.1",
    "--train.scale_tokens", "1024",
    "--eval_tokens", "0",
    "--quiet",
]  # fmt: skip
NPY_ROWS, NPY_D = 4096, 16
EVAL_FRAC = 0.05


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) in-process: (exit code, stdout, stderr); argparse's exits count too."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as stop:
        rc = stop.code if isinstance(stop.code, int) else 1
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert "error" in line, line
    assert "<lambda>" not in line, f"unclear message: {line!r}"
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"


def assert_nothing_written(out: Path, leftovers) -> None:
    assert not (out / "model").exists(), "a failed run must not write model/"
    if out.exists():
        assert leftovers(out) == [], f"temp files left behind: {leftovers(out)}"


def train_argv(out: Path, *extra) -> list[str]:
    """A small run; on a file given by --data, without the planted forest's flags."""
    forest = [] if "--data" in extra else TINY_FOREST_FLAGS
    return ["train", "--out", out, *SMALL, *forest, *extra]


# ---------------------------------------------------------------- a trained .npy run


@pytest.fixture(scope="module")
def npy_run(tmp_path_factory) -> dict:
    """`hsae train --data file.npy` on random rows (N = 4096, d = 16), trained once."""
    root = tmp_path_factory.mktemp("npy_run")
    rows = np.random.default_rng(0).standard_normal((NPY_ROWS, NPY_D)).astype(np.float32)
    data = root / "acts.npy"
    np.save(data, rows)
    out = root / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main([str(a) for a in train_argv(out, "--data", data)])
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    return {"data": data, "rows": rows, "out": out}


def test_train_on_npy_then_eval_prints_the_table(npy_run, tmp_path, capsys):
    out, rows = npy_run["out"], npy_run["rows"]
    header = load_json(out / "model" / "hsae.json")
    assert header["d_in"] == NPY_D and header["sizes"] == [8, 16, 32]
    assert header["config"]["data"]["kind"] == "npy"

    report_path = tmp_path / "report.json"
    rc, stdout, err = run_cli(["eval", out, "--eval_tokens", 4096, "--out", report_path], capsys)
    assert rc == 0, err
    lines = stdout.splitlines()
    l0_line = next(line for line in lines if line.startswith("L0 per level"))
    fve_line = next(line for line in lines if line.startswith("FVE per level"))
    assert len(l0_line.split()[3:]) == 3 and len(fve_line.split()[3:]) == 3
    assert any(line.startswith("Hamming") for line in lines)
    assert not any(line.startswith("recovered") for line in lines), "no ground truth on .npy"
    report = json.loads(report_path.read_text())

    # Independent expectation: the held-out rows are the last 5 % of the file; apply the
    # exported (scale-folded, SAE Lens convention) weights to the raw rows by hand.
    n_eval = round(NPY_ROWS * EVAL_FRAC)
    x = torch.from_numpy(rows[-n_eval:]).double()
    assert report["n_tokens"] == n_eval
    for level in range(3):
        w = {
            k: v.double()
            for k, v in load_safetensors(
                out / "model" / f"level_{level}" / "sae_weights.safetensors"
            ).items()
        }
        pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        acts = torch.relu(pre) * (pre > w["threshold"])
        recon = acts @ w["W_dec"] + w["b_dec"]
        l0 = (acts > 0).sum(1).double().mean().item()
        fve = 1 - (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert report["l0"][level] == pytest.approx(l0, abs=0.02)
        assert report["fve"][level] == pytest.approx(fve.item(), abs=1e-3)
        assert f"{report['l0'][level]:.1f}" in l0_line
        assert f"{report['fve'][level]:.3f}" in fve_line


def test_config_file_values_are_applied_and_flags_override_them(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(
        json.dumps(
            {
                "model": {"sizes": [8, 16, 24], "target_l0": 2.5, "rho": 0.05, "update_every": 7},
                "train": {"steps": 40, "batch_size": 128, "seed": 7, "scale_tokens": 512},
            }
        )
    )
    out = tmp_path / "run"
    argv = [
        "train", "--out", out, "--config", config,
        "--train.steps", "12",  # overrides 40
        "--model.rho", "0.02",  # overrides 0.05
        "--planted.d", "16", "--planted.n_trees", "3", "--planted.n_independent", "4",
        "--eval_tokens", "0", "--quiet",
    ]  # fmt: skip
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert "trained 12 steps" in stdout
    header = load_json(out / "model" / "hsae.json")
    model, train = header["config"]["model"], header["config"]["train"]
    assert header["sizes"] == model["sizes"] == [8, 16, 24]  # from the file
    assert model["target_l0"] == 2.5 and model["update_every"] == 7  # from the file
    assert model["rho"] == 0.02  # flag
    assert train["steps"] == 12 and header["summary"]["steps"] == 12  # flag
    assert train["batch_size"] == 128 and train["seed"] == 7  # from the file
    assert train["lr"] == 5e-4  # neither: the default
    assert header["d_in"] == 16


@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["eval"]])
def test_help_exits_zero(command, capsys):
    rc, stdout, _ = run_cli([*command, "--help"], capsys)
    assert rc == 0
    assert stdout.startswith("usage: hsae" + (f" {command[0]}" if command else ""))


# ---------------------------------------------------------------- bad training input


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--model.sizes", "16,8,32"], ["sizes", "increasing"]),
        (["--model.sizes", "8,8,32"], ["sizes", "increasing"]),
        (["--model.target_l0", "0"], ["target_l0"]),
        (["--model.target_l0", "-2"], ["target_l0"]),
        (["--model.perturb_rate", "1.5"], ["perturb_rate", "[0, 1]"]),
        (["--model.perturb_rate", "-0.1"], ["perturb_rate", "[0, 1]"]),
        (["--model.unassigned_quantile", "1.01"], ["unassigned_quantile", "[0, 1]"]),
        (["--model.unassigned_quantile", "-0.5"], ["unassigned_quantile", "[0, 1]"]),
        (["--model.tree", "bogus"], ["--model.tree", "bogus"]),
        (["--model.method", "bogus"], ["--model.method", "bogus"]),
        (["--model.l0_start", "0.5"], ["l0_start", ">= 1"]),
        (["--model.support", "-1"], ["support", ">= 0"]),
        (["--model.sizes", "8,x,32"], ["--model.sizes", "8,x,32"]),
        (["--train.steps", "ten"], ["--train.steps", "ten"]),
    ],
    ids=[
        "sizes-decreasing",
        "sizes-equal",
        "target_l0-zero",
        "target_l0-negative",
        "perturb_rate-above-1",
        "perturb_rate-below-0",
        "quantile-above-1",
        "quantile-below-0",
        "unknown-tree",
        "unknown-method",
        "l0_start-below-1",
        "support-negative",
        "sizes-not-integers",
        "steps-not-integer",
    ],
)
def test_bad_flag_is_one_line_error(flags, needles, tmp_path, capsys, leftovers):
    out = tmp_path / "run"
    rc, _, err = run_cli(train_argv(out, *flags), capsys)
    assert rc == 2  # the README: bad input exits with 2
    assert_one_line_error(err, *needles)
    assert_nothing_written(out, leftovers)
    assert not out.exists() or not any(out.iterdir()), "nothing may be written on bad config"


@pytest.mark.parametrize(
    "bad_row, bad_value",
    [(10, float("nan")), (3000, float("inf")), (2000, float("-inf"))],
    ids=["nan-early", "inf-late", "minus-inf"],
)
def test_non_finite_training_rows_are_refused(bad_row, bad_value, tmp_path, capsys, leftovers,
                                               write_npy):  # fmt: skip
    # Rows 10, 2000 and 3000 lie in the training part (the last 5 % are held out), and 30
    # steps of 256 rows visit every training row.
    data = write_npy("bad.npy", NPY_ROWS, NPY_D, bad_row=bad_row, bad_value=bad_value)
    out = tmp_path / "run"
    rc, _, err = run_cli(train_argv(out, "--data", data), capsys)
    assert rc == 2  # the README: bad input exits with 2
    assert_one_line_error(err, str(data), "non-finite")
    assert_nothing_written(out, leftovers)


def test_missing_checkpoint_with_resume(tmp_path, capsys, leftovers):
    out = tmp_path / "run"
    rc, _, err = run_cli(train_argv(out, "--resume"), capsys)
    assert rc == 2  # the README: bad input exits with 2
    assert_one_line_error(err, str(out / CHECKPOINT))
    assert_nothing_written(out, leftovers)


def test_truncated_checkpoint_with_resume(npy_run, tmp_path, capsys, leftovers):
    out = tmp_path / "run"
    out.mkdir()
    data = (npy_run["out"] / CHECKPOINT).read_bytes()
    (out / CHECKPOINT).write_bytes(data[: len(data) // 2])
    rc, _, err = run_cli(train_argv(out, "--data", npy_run["data"], "--resume"), capsys)
    assert rc == 2  # the README: bad input exits with 2
    assert_one_line_error(err, str(out / CHECKPOINT))
    assert_nothing_written(out, leftovers)
    assert (out / CHECKPOINT).stat().st_size == len(data) // 2, "the bad file is left as it was"


def test_resume_of_a_complete_checkpoint_with_another_config(npy_run, tmp_path, capsys, leftovers):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(npy_run["out"] / CHECKPOINT, out / CHECKPOINT)
    argv = train_argv(out, "--data", npy_run["data"], "--resume", "--model.rho", "0.5")
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2  # the README: bad input exits with 2
    assert_one_line_error(err, str(out / CHECKPOINT), "different configuration")
    assert_nothing_written(out, leftovers)


# The same small run as SMALL, as a config file; flags then only describe the data.
BASE_CONFIG = {
    "model": {"sizes": [8, 16, 32], "target_l0": 3, "update_every": 10},
    "train": {"steps": 30, "batch_size": 256, "lr": 3e-3, "lambda_init": 0.1,
              "scale_tokens": 1024},
}  # fmt: skip
DATA_FLAGS = [*TINY_FOREST_FLAGS, "--eval_tokens", "0", "--quiet"]


@pytest.mark.parametrize(
    "section, patch, needles",
    [
        ("model", {"bogus": 1}, ["bogus"]),
        ("train", {"stepz": 10}, ["stepz"]),
        ("extra", {}, ["extra"]),
        # wrong types must be named too, not surface as a bare Python type error
        ("train", {"steps": "ten"}, ["steps"]),
        ("model", {"sizes": 5}, ["sizes"]),
        ("train", {"steps": 12.5}, ["steps"]),
        ("model", {"method": "tree"}, ["method", "hsae, paper"]),
        ("model", {"similarity": 3}, ["similarity", "or null"]),
    ],
    ids=[
        "unknown-model-key",
        "unknown-train-key",
        "unknown-section",
        "steps-string",
        "sizes-int",
        "steps-fraction",
        "unknown-method",
        "similarity-number",
    ],
)
def test_bad_config_file_is_one_line_error(section, patch, needles, tmp_path, capsys,
                                           leftovers):  # fmt: skip
    config = json.loads(json.dumps(BASE_CONFIG))
    config[section] = config.get(section, {}) | patch
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "run"
    rc, _, err = run_cli(["train", "--out", out, "--config", path, *DATA_FLAGS], capsys)
    assert rc == 2  # the README: bad input exits with 2
    assert_one_line_error(err, *needles)
    assert_nothing_written(out, leftovers)


def test_base_config_file_alone_trains(tmp_path, capsys):
    """Guard for the test above: without a patch the same file and flags do train."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps(BASE_CONFIG))
    out = tmp_path / "run"
    rc, stdout, err = run_cli(["train", "--out", out, "--config", path, *DATA_FLAGS], capsys)
    assert rc == 0, err
    assert "trained 30 steps" in stdout


def test_missing_config_file(tmp_path, capsys, leftovers):
    out = tmp_path / "run"
    rc, _, err = run_cli(train_argv(out, "--config", tmp_path / "nope.json"), capsys)
    assert rc == 2  # the README: bad input exits with 2
    assert_one_line_error(err, str(tmp_path / "nope.json"))
    assert_nothing_written(out, leftovers)


# ---------------------------------------------------------------- bad eval input


def test_eval_npy_of_another_width(npy_run, tmp_path, capsys, write_npy):
    data = write_npy("narrow.npy", 512, NPY_D // 2)
    report = tmp_path / "report.json"
    argv = ["eval", npy_run["out"], "--data", data, "--eval_tokens", 256, "--out", report]
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 2  # the README: bad input exits with 2
    assert_one_line_error(err, str(data), str(NPY_D // 2), str(NPY_D))
    assert not report.exists()
    assert "L0 per level" not in stdout


def test_eval_missing_model_dir(tmp_path, capsys):
    rc, _, err = run_cli(["eval", tmp_path / "nowhere"], capsys)
    assert rc == 2  # the README: bad input exits with 2
    assert_one_line_error(err, str(tmp_path / "nowhere"))


def test_eval_run_dir_without_model(npy_run, tmp_path, capsys):
    """A run directory holding only a checkpoint (training never finished) is not a model."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(npy_run["out"] / CHECKPOINT, run / CHECKPOINT)
    rc, _, err = run_cli(["eval", run], capsys)
    assert rc == 2  # the README: bad input exits with 2
    assert_one_line_error(err, str(run))


# ---------------------------------------------------------------- real processes


def test_subprocess_bad_sizes_exit_code_and_stderr(tmp_path, subprocess_env, python_exe,
                                                   leftovers):  # fmt: skip
    out = tmp_path / "run"
    argv = [str(a) for a in train_argv(out, "--model.sizes", "32,16,64")]
    proc = subprocess.run(
        [python_exe, "-m", "hsae", *argv], env=subprocess_env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_one_line_error(proc.stderr, "sizes", "increasing")
    assert_nothing_written(out, leftovers)


def test_subprocess_console_script_missing_model(tmp_path, subprocess_env, python_exe):
    script = Path(python_exe).parent / "hsae"
    if not script.exists():
        pytest.skip("the hsae console script is not installed next to this python")
    proc = subprocess.run(
        [str(script), "eval", str(tmp_path / "nowhere")], env=subprocess_env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_one_line_error(proc.stderr, str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- outputs checked first


def _unwritable_outputs(tmp_path: Path) -> list[tuple[list, str]]:
    """(argv, the path the error must name): each output is bad before any work is done."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    missing_model = tmp_path / "no_model"
    return [
        (train_argv(a_file), "exists and is not a directory"),
        (train_argv(a_file / "run"), "is a file, not a directory"),
        (["eval", missing_model, "--out", a_dir], "is a directory"),
        (["eval", missing_model, "--plots", a_file], "exists and is not a directory"),
        (["posthoc", missing_model, "--out", a_file], "exists and is not a directory"),
        (
            ["cache", "--model", "gpt2", "--layer", "1", "--out", a_file / "c"],
            "is a file, not a directory",
        ),  # fmt: skip
        (["demo", "--out", a_file], "exists and is not a directory"),
        (["contexts", missing_model, "--out", a_file], "exists and is not a directory"),
        (["plots", "compare", a_file, "--out", a_file], "exists and is not a directory"),
    ]


def test_bad_outputs_fail_before_any_work(tmp_path, capsys):
    """The issue's probes: --out an existing file (a traceback after training before), --out
    a directory, --plots a file; the model named does not even exist, so only a check made
    before any work can give this error."""
    for argv, words in _unwritable_outputs(tmp_path):
        started = time.perf_counter()
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2, (argv, err)
        assert_one_line_error(err, words)
        assert time.perf_counter() - started < 5, argv


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_output_folder_fails_first(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        rc, _, err = run_cli(train_argv(folder / "run"), capsys)
    finally:
        folder.chmod(0o755)
    assert rc == 2
    assert_one_line_error(err, "no write permission")


# ---------------------------------------------------------------- who owns a run


def test_a_fresh_run_does_not_replace_an_existing_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(train_argv(out), capsys)[0] == 0
    before = (out / "model" / "hsae.json").read_bytes()
    rc, _, err = run_cli(train_argv(out), capsys)
    assert rc == 2
    assert_one_line_error(err, str(out), "--resume", "--overwrite")
    assert (out / "model" / "hsae.json").read_bytes() == before
    rc, _, err = run_cli(train_argv(out, "--overwrite", "--train.seed", "1"), capsys)
    assert rc == 0, err
    assert (out / "model" / "hsae.json").read_bytes() != before


def test_a_run_being_written_is_locked(tmp_path, capsys):
    from hsae.io import locked_directory

    out = tmp_path / "run"
    with locked_directory(out):
        rc, _, err = run_cli(train_argv(out), capsys)
    assert rc == 2
    assert_one_line_error(err, "another hsae process", f"pid {os.getpid()}")
    assert not (out / "model").exists()
    assert run_cli(train_argv(out), capsys)[0] == 0  # released when the holder is done


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path, python_exe, subprocess_env):
    from hsae.io import locked_directory

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [python_exe, "-c", "import sys, time; from hsae.io import locked_directory\n"
         f"with locked_directory({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=subprocess_env,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match="another hsae process"), locked_directory(out):
            pass
    finally:
        holder.kill()
        holder.wait()
    with locked_directory(out):  # SIGKILL released it
        pass


# ---------------------------------------------------------------- resume reads the same data


def test_resume_on_other_data_is_refused(tmp_path, capsys):
    """The issue's probes: another .npy of the same width, other planted settings."""
    rng = np.random.default_rng(0)
    first, second = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(first, rng.standard_normal((4096, 16)).astype(np.float32))
    np.save(second, rng.standard_normal((4096, 16)).astype(np.float32))
    out = tmp_path / "run"
    flags = ["--train.checkpoint_every", "10", "--eval_tokens", "0"]
    assert run_cli(train_argv(out, "--data", first, *flags), capsys)[0] == 0
    before = (out / CHECKPOINT).read_bytes()
    rc, _, err = run_cli(train_argv(out, "--data", second, "--resume", *flags), capsys)
    assert rc == 2
    assert_one_line_error(err, "other data", "path", "sha256")
    assert (out / CHECKPOINT).read_bytes() == before

    planted = tmp_path / "planted"
    assert run_cli(train_argv(planted, *flags), capsys)[0] == 0
    rc, _, err = run_cli(train_argv(planted, "--resume", "--planted.seed", "7", *flags), capsys)
    assert rc == 2
    assert_one_line_error(err, "other data", "planted.seed")
    rc, _, err = run_cli(train_argv(planted, "--resume", *flags), capsys)
    assert rc == 0, err  # the same data resumes


def test_planted_flags_with_a_file_are_refused(tmp_path, capsys):
    data = tmp_path / "a.npy"
    np.save(data, np.zeros((64, 16), dtype=np.float32))
    rc, _, err = run_cli(train_argv(tmp_path / "run", "--data", data, "--planted.d", "8"), capsys)
    assert rc == 2
    assert_one_line_error(err, "--planted.d", "a.npy")


# ---------------------------------------------------------------- numbers and settings


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--model.target_l0", "nan"),
        ("--model.rho", "nan"),
        ("--train.lr", "inf"),
        ("--planted.noise_std", "-inf"),
    ],
)
def test_non_finite_numbers_are_refused_up_front(tmp_path, capsys, flag, value):
    """The issue's probes: a traceback after 30 s, a model saved with rho null, a
    checkpoint of NaNs. Now argparse refuses the flag (exit 2) before anything runs."""
    out = tmp_path / "run"
    rc, _, err = run_cli(train_argv(out, f"{flag}={value}"), capsys)
    assert rc == 2
    assert_one_line_error(err, flag, "finite")
    assert not out.exists()


def test_non_finite_config_file_values_are_refused(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text('{"model": {"rho": NaN}}')  # Python's json reads NaN
    rc, _, err = run_cli(train_argv(tmp_path / "run", "--config", path), capsys)
    assert rc == 2
    assert_one_line_error(err, "rho", "finite")


@pytest.mark.parametrize("flag", ["--context_len", "--max_tokens"])
def test_bad_cache_settings_leave_nothing_behind(tmp_path, capsys, flag):
    """A refused `hsae cache` writes no manifest, so the corrected rerun is not blocked."""
    out = tmp_path / "cache"
    argv = ["cache", "--model", "gpt2", "--layer", "1", "--out", out]
    rc, _, err = run_cli([*argv, flag, "0"], capsys)
    assert rc == 2
    assert_one_line_error(err, flag, ">= 1")
    assert not (out / "manifest.json").exists()


def test_a_run_without_links_says_so(tmp_path, capsys):
    """The issue's probe: shorter than update_every, every parent is -1; Hamming printed
    0.000 (perfect) and P(p|c) nan. Now the run warns and the table says "no links"."""
    argv = train_argv(tmp_path / "run", "--model.update_every", "1000", "--eval_tokens", "1024")
    with pytest.warns(UserWarning, match="no hierarchy update"):
        rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert "links per level pair" in out
    hamming = next(line for line in out.splitlines() if line.startswith("Hamming"))
    assert "no links" in hamming and "0.000" not in hamming


@pytest.mark.parametrize(
    "rows, words",
    [
        (np.zeros((2048, 16), dtype=np.float32), "all zero"),
        (np.full((2048, 16), np.inf, dtype=np.float32), "non-finite value"),
    ],
    ids=["zeros", "inf"],
)
def test_activations_without_a_scale_are_one_line(tmp_path, capsys, rows, words):
    data = tmp_path / "a.npy"
    np.save(data, rows)
    rc, _, err = run_cli(train_argv(tmp_path / "run", "--data", data), capsys)
    assert rc == 2
    assert_one_line_error(err, words)


def test_huge_but_finite_activations_train(tmp_path, capsys):
    """Rows near 1e30 were reported as "all zero" (their float32 norm overflowed)."""
    data = tmp_path / "a.npy"
    rows = np.random.default_rng(0).standard_normal((4096, 16)) * 1e30
    np.save(data, rows.astype(np.float32))
    rc, _, err = run_cli(train_argv(tmp_path / "run", "--data", data), capsys)
    assert rc == 0, err


def test_a_text_file_named_npy_gets_no_pickle_advice(tmp_path, capsys):
    data = tmp_path / "a.npy"
    data.write_text("1,2,3\n4,5,6\n")
    rc, _, err = run_cli(train_argv(tmp_path / "run", "--data", data), capsys)
    assert rc == 2
    assert_one_line_error(err, "not a .npy file")
    assert "pickle" not in err


def test_version(capsys):
    rc, out, _ = run_cli(["--version"], capsys)
    assert rc == 0 and out.startswith("hsae ")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["eval", "nowhere", "--eval_tokens", "0"], "--eval_tokens must be >= 1"),
        (["train", "--out", "nowhere", "--eval_tokens", "-1"], "--eval_tokens must be >= 0"),
        (
            ["explore", "m", "--contexts", "c", "--out", "o", "--port", "70000"],
            "--port must be <= 65535",
        ),
    ],
    ids=["eval-tokens-0", "train-eval-tokens", "port"],
)
def test_bad_numbers_fail_before_any_work(tmp_path, capsys, argv, words):
    rc, _, err = run_cli([a if a != "nowhere" else tmp_path / "x" for a in argv], capsys)
    assert rc == 2
    assert_one_line_error(err, words)


def test_unknown_device_is_refused_up_front(tmp_path, capsys):
    rc, _, err = run_cli(train_argv(tmp_path / "run", "--train.device", "tpu"), capsys)
    assert rc == 2
    assert_one_line_error(err, "device", "'tpu'")
    assert not (tmp_path / "run").exists()
