"""`hsae judge` against a real local HTTP server that speaks /v1/chat/completions.

The server answers from the prompt it receives, with a rule the test knows: two features
are related when one's marked word extends the other's ("c3" and "c3.k1"); a feature's
label is its most common marked word; a label "fires" on a document containing that
word. The planted forests below therefore have yes-rates and clarity scores computed by
hand, and the server can also be told to be slow, rate-limited, broken or incoherent.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from hsae import cli, trained_dir
from hsae.explore.contexts import ContextStore, empty_level
from hsae.explore.judge_prompts import (
    DETECT_PROMPT,
    EXPLAIN_PROMPT,
    LINK_PROMPT,
    parse_active,
    parse_label,
    parse_verdict,
)
from hsae.explore.judge_stats import newcombe, t_quantile, wilson
from hsae.explore.site import load_labels

KEY = "sk-test-9f8e7d6c5b4a39281706"


# ------------------------------------------------------------------ the scripted server


class JudgeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.hits = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth: set[str] = set()
        self.script: list[str] = []  # behaviours of the next requests, then `always`
        self.always = "normal"
        self.delay = 0.0
        self.slow_seconds = 1.5

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    server: JudgeServer

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, code: int, body: bytes, headers: dict | None = None) -> None:
        try:
            self.send_response(code)
            for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        with srv.lock:
            srv.hits += 1
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            srv.auth.add(self.headers.get("Authorization", ""))
            behaviour = srv.script.pop(0) if srv.script else srv.always
        try:
            time.sleep(srv.delay)
            self._behave(behaviour, body)
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def _behave(self, behaviour: str, body: dict) -> None:
        if self.path != "/v1/chat/completions":
            return self._send(404, b'{"error": {"message": "no such route"}}')
        if behaviour == "slow":
            time.sleep(self.server.slow_seconds)
        if behaviour == "429":
            return self._send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "1"})
        if behaviour == "500":
            return self._send(500, b'{"error": {"message": "boom"}}')
        if behaviour == "401":  # like OpenAI: the error message quotes the key it got
            msg = {"error": {"message": f"Incorrect API key provided: {KEY}"}}
            return self._send(401, json.dumps(msg).encode())
        if behaviour == "not_json":
            return self._send(200, b"<html>502 bad gateway</html>", {"Content-Type": "text/html"})
        if behaviour == "no_choices":
            return self._send(200, b'{"object": "chat.completion", "choices": []}')
        content = "I cannot tell." if behaviour == "gibberish" else answer(body["messages"])
        reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
        self._send(200, json.dumps(reply).encode())


def marked_words(text: str) -> list[str]:
    return re.findall(r"<<(.*?)>>", text)


def answer(messages: list[dict]) -> str:
    """The deterministic judge: verdicts and labels follow from the planted words."""
    system, user = messages[0]["content"], messages[1]["content"]
    if system == LINK_PROMPT.system:
        a, b = user.split("And for Neuron B:")
        words_a, words_b = marked_words(a), marked_words(b)
        if any(w.startswith("ambig") for w in words_a + words_b):
            return "Hard to say."
        related = any(x.startswith(y + ".") for x in words_a for y in words_b) or any(
            y.startswith(x + ".") for x in words_a for y in words_b
        )
        word = "Yes" if related else "No"
        # Several reply styles, chosen by the prompt, so the lenient reader is exercised.
        style = int(hashlib.sha256(user.encode()).hexdigest(), 16) % 4
        return [
            json.dumps({"relationship": word.lower(), "confidence": "high"}),
            f'```json\n{{"relationship": "{word}", "confidence": 0.5}}\n```',
            f"HaveRelationship: {word}\nConfidence: Low",
            f"<think>Neuron A is about x... maybe no?</think>{word}",
        ][style]
    if system == EXPLAIN_PROMPT.system:
        counts = Counter(marked_words(user))
        label = sorted(counts, key=lambda w: (-counts[w], w))[0]
        return json.dumps({"label": label})
    if system == DETECT_PROMPT.system:
        label = re.search(r"Explanation: (\S+)", user).group(1)
        docs = re.findall(r"^(\d+)\. (.*)$", user, re.M)
        return json.dumps({"active": [int(i) for i, text in docs if label in text.split()]})
    return "?"


@pytest.fixture
def server():
    srv = JudgeServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def judge_env(monkeypatch):
    """A key in the environment, no proxy for 127.0.0.1, nothing from the real world."""
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "HSAE_JUDGE_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HSAE_JUDGE_API_KEY", KEY)
    monkeypatch.setenv("HSAE_JUDGE_MODEL", "scripted-judge")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


# ------------------------------------------------------------------ planted forests

# Level 0: 12 roots. Roots 0-3 have three children each (level-1 features 0-11), roots 4-7
# one each (features 12-15), roots 8-11 none. Feature 15 has no contexts, so 15 links can
# be judged. A related child's word extends its parent's ("c0" -> "c0.k1").
PARENTS = [j // 3 if j < 12 else j - 8 for j in range(16)]
HSAE_RELATED = set(range(15)) - {2, 5}  # 13 of the 15 judgeable links
BASE_RELATED = {0, 1, 3, 4, 6, 12}  # 6 of 15
# How many of a root's 3 held-out documents use another word (the label misses them).
ROOT_NOISE = {3: 1, 4: 1, 5: 2, 7: 3}
TOP, SAMPLED = 4, 2


def feature_rows(word: str, alt: str, noise: int) -> tuple[list[list[str]], list[list[str]]]:
    """Top rows (highest first) and sampled rows; the held-out ones (top 3, top 2,
    sampled 1 in this order) use ``alt`` for the first ``noise`` of them."""
    top = [[f"row{r} ", word, " was here"] for r in range(TOP)]
    sampled = [[f"smp{r} ", word, " is there"] for r in range(SAMPLED)]
    for row in [top[3], top[2], sampled[1]][:noise]:
        row[1] = alt
    return top, sampled


def write_store(directory: Path, words: list[list[str | None]], noise: dict) -> None:
    vocab: dict[str, int] = {}
    levels = []
    for level, level_words in enumerate(words):
        lv = empty_level(len(level_words), TOP, SAMPLED, 3, 4)
        for f, word in enumerate(level_words):
            if word is None:
                continue
            top, sampled = feature_rows(word, f"alt{level}x{f}", noise.get((level, f), 0))
            for kind, rows in (("top", top), ("sample", sampled)):
                for r, tokens in enumerate(rows):
                    ids = [vocab.setdefault(t, len(vocab)) for t in tokens]
                    getattr(lv, f"{kind}_ids")[f, r] = torch.tensor(ids, dtype=torch.int32)
                    getattr(lv, f"{kind}_acts")[f, r, 1] = float(TOP - r)
            lv.frequency[f], lv.max_act[f] = 0.01, float(TOP)
        levels.append(lv)
    meta = {"model": "test", "window": 3, "top_k": TOP, "n_sampled": SAMPLED}
    ContextStore(meta, list(vocab), levels).save(directory)


def write_model(directory: Path, sizes: list[int], parents: list[int]) -> None:
    gen = torch.Generator().manual_seed(0)
    levels = []
    for n in sizes:
        w_dec = torch.randn(n, 4, generator=gen)
        levels.append(
            trained_dir.LevelWeights(
                torch.randn(4, n, generator=gen),
                torch.zeros(n),
                w_dec / w_dec.norm(dim=1, keepdim=True),
                torch.zeros(4),
                torch.full((n,), 0.1),
            )  # fmt: skip
        )
    trained_dir.save_trained(directory, levels, [torch.tensor(parents)], 1.0, {}, {})


def make_forest(
    root: Path, name: str, related: set[int], root_noise: dict, prefix: str = "c"
) -> tuple[str, str]:
    roots = [f"{prefix}{r}" for r in range(12)]
    children = [
        None if j == 15 else f"{prefix}{PARENTS[j]}.k{j}" if j in related else f"u{j}"
        for j in range(16)
    ]
    write_model(root / name / "model", [12, 16], PARENTS)
    write_store(root / f"{name}_ctx", [roots, children], {(0, r): k for r, k in root_noise.items()})
    return str(root / name), str(root / f"{name}_ctx")


@pytest.fixture
def forests(tmp_path):
    hsae = make_forest(tmp_path, "hsae", HSAE_RELATED, ROOT_NOISE)
    base = make_forest(tmp_path, "base", BASE_RELATED, {}, prefix="b")  # no prompt shared
    return hsae, base


def judge(server: JudgeServer, model: tuple[str, str], out: Path, *extra: str) -> int:
    argv = ["judge", model[0], "--contexts", model[1], "--out", str(out),
            "--base_url", server.base_url, "--backoff", "0.01", "--quiet", *extra]  # fmt: skip
    return cli.main(argv)


def read(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------ the statistics


def test_intervals_match_published_values():
    # Wilson 95 % for 8/10 and 0/10, worked by hand from the formula
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    # Student t table, 97.5 % point
    for df, t in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]:
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    # Newcombe 1998, table II example (56/70 vs 48/80): 0.2000, 95 % CI 0.0524 to 0.3339
    assert newcombe(56, 70, 48, 80) == pytest.approx((0.2, 0.0524, 0.3339), abs=1e-4)


def test_lenient_reading_of_replies():
    assert parse_verdict('```json\n{"relationship": "Yes", "confidence": "High"}\n```').related
    v = parse_verdict("HaveRelationship: No\nConfidence: Medium")
    assert (v.related, v.confidence) == (False, "medium")
    assert parse_verdict("<think>yes or no? no...</think>\nYes").related
    assert parse_verdict('{"relationship": true, "confidence": 85}').confidence == "high"
    for bad in ("I cannot tell.", "Yes and no.", "", '{"confidence": "high"}'):
        assert parse_verdict(bad) is None
    assert parse_label('{"label": "  dates and  years "}') == "dates and years"
    assert parse_label("Label: the word 'the'") == "the word 'the"
    assert parse_active('{"active": [3, 1]}', 5) == {1, 3}
    assert parse_active("2, 5", 5) == {2, 5} and parse_active("None", 5) == set()
    assert parse_active("[1, 9]", 5) is None and parse_active("documents two and five", 5) is None


# ------------------------------------------------------------------ the command


def test_yes_rates_and_cache(server, forests, tmp_path, capsys):
    (hsae, base), out = forests, tmp_path / "report.json"
    argv = ["--baseline", base[0], "--baseline_contexts", base[1], "--concurrency", "3"]
    server.delay = 0.03  # requests overlap, so the concurrency bound is really tested
    assert judge(server, hsae, out, *argv) == 0
    report = read(out)
    h, b = report["models"]["hsae"]["links"], report["models"]["baseline"]["links"]
    assert (h["eligible_pairs"], h["judged"], h["yes"], h["unreadable"]) == (15, 15, 13, 0)
    assert (b["judged"], b["yes"]) == (15, 6)
    assert h["yes_rate"] == pytest.approx(13 / 15)
    assert h["ci95"] == pytest.approx([0.62118, 0.96264], abs=1e-5)  # Wilson, by hand
    assert b["ci95"] == pytest.approx([0.19824, 0.64253], abs=1e-5)
    diff = report["difference"]
    assert diff["yes_rate"] == pytest.approx(7 / 15)
    assert diff["ci95"] == pytest.approx([0.12158, 0.69008], abs=1e-5)
    for r in h["records"]:  # every verdict is the planted truth, child 15 never drawn
        assert r["child"][1] != 15 and r["parent"] == [0, PARENTS[r["child"][1]]]
        assert r["verdict"] == ("yes" if r["child"][1] in HSAE_RELATED else "no")
    assert {r["parent_shown_first"] for r in h["records"]} == {True, False}
    assert 2 <= server.max_in_flight <= 3
    assert server.hits == 30 and report["requests"] == {"sent": 30, "cached": 0, "retried": 0}
    assert server.auth == {f"Bearer {KEY}"}
    printed = capsys.readouterr().out
    assert "0.867 [0.621, 0.963]" in printed and "+0.467" in printed

    # A rerun costs nothing and reports the same.
    assert judge(server, hsae, out, *argv) == 0
    again = read(out)
    assert server.hits == 30 and again["requests"] == {"sent": 0, "cached": 30, "retried": 0}
    assert again["models"] == report["models"]

    # The key was sent, but is nowhere on disk or in what was printed.
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("judge_cache" in str(p) for p in files)
    assert not [p for p in files if KEY.encode() in p.read_bytes()]


def test_sampled_pairs_and_progress(server, forests, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["judge", forests[0][0], "--contexts", forests[0][1], "--out", str(out),
            "--base_url", server.base_url, "--pairs", "5", "--seed", "3"]  # fmt: skip
    assert cli.main(argv) == 0
    records = read(out)["models"]["hsae"]["links"]["records"]
    assert len({tuple(r["child"]) for r in records}) == 5
    assert all(r["verdict"] == ("yes" if r["child"][1] in HSAE_RELATED else "no") for r in records)
    assert "hsae links" in capsys.readouterr().err  # the progress bar


def test_branching_and_labels(server, forests, tmp_path):
    out, labels = tmp_path / "r.json", tmp_path / "labels.json"
    assert judge(server, forests[0], out, "--branching", "--labels", str(labels)) == 0
    g2 = read(out)["models"]["hsae"]["branching"]
    multi, single = g2["multi_child"], g2["single_child"]
    # Each root is tested on 3 held-out documents and 10 other roots' documents; the
    # scripted label misses the held-out ones with another word (ROOT_NOISE).
    assert multi["scores"] == pytest.approx({"0:0": 1, "0:1": 1, "0:2": 1, "0:3": 12 / 13})
    assert single["scores"] == pytest.approx(
        {"0:4": 12 / 13, "0:5": 11 / 13, "0:6": 1, "0:7": 10 / 13}
    )
    assert (multi["roots"], single["roots"]) == (4, 4)
    assert multi["mean"] == pytest.approx(51 / 52)
    assert multi["ci95"] == pytest.approx([0.919568, 1.041970], abs=1e-5)  # t, 3 df, by hand
    assert single["ci95"] == pytest.approx([0.726595, 1.042635], abs=1e-5)
    assert g2["difference"]["multi_minus_single"] == pytest.approx(5 / 52)
    assert g2["difference"]["ci95"] == pytest.approx([-0.053503, 0.245811], abs=1e-5)  # Welch
    written = read(labels)["labels"]
    assert load_labels(labels, [12, 16])["0:5"] == ["c5", 11 / 13]  # explorer
    assert written["0:5"] == {"label": "c5", "score": pytest.approx(11 / 13)}
    assert written["1:0"] == {"label": "c0.k0", "score": 1.0}
    assert written["1:2"]["label"] == "u2"
    judged = {f"{lvl}:{f}" for r in read(out)["models"]["hsae"]["links"]["records"]
              for lvl, f in (r["parent"], r["child"])}  # fmt: skip
    assert set(written) == judged | set(multi["scores"]) | set(single["scores"])


def test_slow_429_500_and_malformed_are_retried(server, forests, tmp_path):
    out = tmp_path / "r.json"
    server.script = ["slow", "429", "500", "not_json", "no_choices", "gibberish"]
    start = time.monotonic()
    rc = judge(server, forests[0], out, "--concurrency", "1", "--timeout", "0.5", "--retries", "5")
    elapsed = time.monotonic() - start
    assert rc == 0
    report = read(out)
    links = report["models"]["hsae"]["links"]
    assert (links["judged"], links["yes"], links["unreadable"]) == (15, 13, 0)
    # 15 pairs + 5 retried failures + 1 repair turn after the gibberish
    assert server.hits == 21 and report["requests"]["retried"] == 5
    assert elapsed >= 1.0  # Retry-After: 1 was honoured (the back-off alone is 0.01 s)


def test_some_unreadable_answers_are_recorded(server, tmp_path):
    model = make_forest(tmp_path, "m", HSAE_RELATED, {})
    write_store(Path(model[1]), [[f"c{r}" for r in range(12)],
                                 ["ambig0"] + [f"c{PARENTS[j]}.k{j}" for j in range(1, 16)]],
                {})  # fmt: skip
    out = tmp_path / "r.json"
    assert judge(server, model, out) == 0
    links = read(out)["models"]["hsae"]["links"]
    assert (links["pairs"], links["judged"], links["unreadable"], links["yes"]) == (16, 15, 1, 15)
    bad = [r for r in links["records"] if r["verdict"] is None]
    assert bad[0]["child"] == [1, 0] and bad[0]["reply"] == "Hard to say."
    assert server.hits == 17  # the unreadable one was asked again once
    # With a stricter limit the same answers stop the run.
    assert judge(server, model, out, "--max_unreadable", "0.05") == 2


@pytest.mark.parametrize(
    ("always", "expected"),
    [
        ("not_json", "no answer after 3 attempts (the body is not JSON"),
        ("no_choices", "no answer after 3 attempts (the reply has no 'choices')"),
        ("gibberish", "15 of 15 judge replies about links could not be read"),
        ("500", "no answer after 3 attempts (HTTP 500)"),
        ("401", "refused the request (HTTP 401; check the API key)"),
    ],
)
def test_an_endpoint_that_never_answers_properly(server, forests, tmp_path, capsys, always,
                                                 expected):  # fmt: skip
    server.always = always
    out = tmp_path / "r.json"
    assert judge(server, forests[0], out, "--retries", "2") == 2
    err = capsys.readouterr().err
    assert err.startswith("hsae: error: ") and err.count("\n") == 1 and expected in err
    assert KEY not in err and not out.exists()


def test_unreachable_endpoint(forests, tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["judge", forests[0][0], "--contexts", forests[0][1], "--out", str(tmp_path / "r"),
            "--base_url", f"http://127.0.0.1:{port}/v1", "--retries", "2", "--backoff", "0.01",
            "--quiet"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"judge at http://127.0.0.1:{port}/v1/chat/completions: no answer after 3" in err
    assert "cannot connect" in err


def test_bad_arguments(forests, tmp_path, capsys, monkeypatch):
    hsae, base = forests
    common = ["judge", hsae[0], "--contexts", hsae[1], "--out", str(tmp_path / "r.json")]
    assert cli.main([*common, "--baseline", base[0]]) == 2
    assert cli.main([*common, "--contexts", base[1] + "-missing"]) == 2
    monkeypatch.delenv("HSAE_JUDGE_MODEL")
    assert cli.main(common) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("hsae: error: ") for line in err)
    assert "--baseline_contexts" in err[0] and "HSAE_JUDGE_MODEL" in err[2]
