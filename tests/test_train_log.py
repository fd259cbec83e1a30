"""train_log.jsonl: what a run writes, how a resume continues it, and W&B offline."""

from __future__ import annotations

import json

import pytest
from test_train import make_trainer, tiny_cfg

from hsae.method.train_log import LOG_FILE, TrainLog, read_log

FIELDS = {"step", "tokens", "lr", "loss", "reconstruction", "sparsity", "pc", "ghost",
          "support", "l0", "fve", "lambda", "dead_frac", "tokens_per_s"}  # fmt: skip


def test_a_run_logs_every_term_and_level(tmp_path):
    # a fixed L0 target and unit rows: with the annealed target, or free norms from 0.1,
    # no latent goes quiet within 40 steps and the ghost term is never logged nonzero
    cfg = tiny_cfg(
        40, train=dict(log_every=10, dead_after=5), rho=0.5, l0_start=1.0, decoder_init_norm=0.0
    )
    make_trainer(cfg, tmp_path).fit()
    records = read_log(tmp_path / LOG_FILE)
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    for r in records:
        assert set(r) == FIELDS
        assert r["tokens"] == r["step"] * cfg.train.batch_size
        assert len(r["l0"]) == len(r["fve"]) == len(r["lambda"]) == len(r["dead_frac"]) == 3
        # the named terms are the loss (section 3.1), term by term
        terms = r["reconstruction"] + r["sparsity"] + r["pc"] + r["ghost"] + r["support"]
        assert terms == pytest.approx(r["loss"], rel=1e-5)
        assert r["sparsity"] == pytest.approx(
            sum(lam * l0 for lam, l0 in zip(r["lambda"], r["l0"], strict=True)), rel=1e-4
        )
    assert records[-1]["pc"] > 0  # links exist after the first update (step 10)
    assert any(r["ghost"] > 0 for r in records)  # dead_after 5: some latent went quiet


def test_the_support_term_is_logged_once_links_exist(tmp_path):
    cfg = tiny_cfg(30, train=dict(log_every=10), support=1.0)
    make_trainer(cfg, tmp_path).fit()
    records = read_log(tmp_path / LOG_FILE)
    assert records[0]["support"] == 0 < records[-1]["support"]  # L_S acts on links only
    for r in records:
        terms = r["reconstruction"] + r["sparsity"] + r["pc"] + r["ghost"] + r["support"]
        assert terms == pytest.approx(r["loss"], rel=1e-5)


def test_a_resumed_log_keeps_its_steps_and_drops_a_torn_line(tmp_path):
    path = tmp_path / LOG_FILE
    lines = [json.dumps({"step": s, "loss": float(s)}) for s in (5, 10, 15, 20)]
    path.write_text("\n".join(lines) + '\n{"step": 25, "lo')  # killed mid-line
    log = TrainLog(tmp_path, resume_step=10)
    log.write({"step": 15, "loss": 1.5})
    log.close()
    assert read_log(path) == [{"step": 5, "loss": 5.0}, {"step": 10, "loss": 10.0},
                              {"step": 15, "loss": 1.5}]  # fmt: skip
    TrainLog(tmp_path, resume_step=None).close()  # a fresh run starts empty
    assert path.read_text() == ""


def test_wandb_offline_gets_the_same_curve(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg(20, train=dict(log_every=10, log="wandb"))
    make_trainer(cfg, tmp_path).fit()
    assert [r["step"] for r in read_log(tmp_path / LOG_FILE)] == [10, 20]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "no W&B run file written"
