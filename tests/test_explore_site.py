"""`hsae explore`: the static site, checked in real headless Chromium (Debian's, via
Playwright) opened from disk, against a small forest whose every answer is planted: root
order, children, highlight intensities, the features a token search must find, and token
text that tries to run script. A 30,000-feature site checks build and browser speed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from hsae.cli import main
from hsae.explore.contexts import ContextStore, empty_level
from hsae.explore.site import build_site, js_payload, make_server, shard_of, token_index
from hsae.trained import TrainedHSAE
from hsae.trained_dir import LevelWeights, save_trained

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE = 100  # app.js renders a list this many rows at a time

# Token text that must show as text and never run: each would set window.__xss or alert.
XSS = [
    "<script>window.__xss=1</script>",
    '"><img src=x onerror="window.__xss=2;alert(2)">',
    "</script><script>window.__xss=3</script>",
    "<svg onload=alert(4)>\u2028",
]
# The planted forest: sizes 3, 5, 7. Roots by frequency: 0:1 (0.30), 1:4 (an orphan, 0.25),
# 0:2 (0.20), 0:0 (0.10), 2:6 (an orphan, 0.01). Children of 0:1 by frequency: 1:1 (0.12),
# 1:0 (0.08). 2:3 lies under 0:0 -> 1:2.
SIZES = [3, 5, 7]
PARENTS = [[1, 1, 0, 2, -1], [0, 0, 1, 2, 3, 4, -1]]
FREQ = [[0.10, 0.30, 0.20], [0.08, 0.12, 0.05, 0.15, 0.25], [0.01] * 7]
ROOT_ORDER = ["0:1", "1:4", "0:2", "0:0", "2:6"]
VOCAB = [" the", " cat", " sat", " on", " mat", " Zebra", " zebra", *XSS]
WINDOW, TOP_K, N_SAMPLED, BINS = 6, 3, 2, 4
LABELS = {
    "1:0": {"label": "cats and mats", "score": 0.9},
    "0:2": {"label": '<img src=x onerror="window.__xss=5">', "score": None},
}


def write_model(path: Path, sizes: list[int], parents: list[list[int]], d: int = 4) -> None:
    g = torch.Generator().manual_seed(0)
    levels = [
        LevelWeights(
            torch.randn(d, n, generator=g),
            torch.zeros(n),
            torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1),
            torch.zeros(d),
            torch.zeros(n),
        )
        for n in sizes
    ]
    save_trained(path, levels, [torch.tensor(p) for p in parents], 1.0, {}, {})


def put(lv, kind: str, feature: int, row: int, tokens: list[int], acts: list[float]) -> None:
    ids, values = getattr(lv, f"{kind}_ids"), getattr(lv, f"{kind}_acts")
    ids[feature, row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
    values[feature, row, : len(acts)] = torch.tensor(acts, dtype=torch.float16)


def planted_store() -> ContextStore:
    levels = [empty_level(n, TOP_K, N_SAMPLED, WINDOW, BINS) for n in SIZES]
    for lv, freq in zip(levels, FREQ):
        lv.frequency = torch.tensor(freq)
        lv.max_act = torch.full((lv.n_features,), 4.0)
        lv.histogram_max = torch.full((lv.n_features,), 4.0)
        lv.histogram[:] = torch.tensor([5, 3, 0, 1])
    # 1:0: " the cat sat on the mat", " cat" at the maximum (alpha 1), " mat" at half (0.5).
    put(levels[1], "top", 0, 0, [0, 1, 2, 3, 0, 4], [0, 4, 0, 0, 0, 2])
    put(levels[1], "sample", 0, 0, [1, 3], [1, 0])
    # 2:3 fires on " Zebra"; 2:5 has " zebra" in a context only where it does not fire.
    put(levels[2], "top", 3, 0, [0, 5, 2], [0, 4, 0])
    put(levels[2], "top", 5, 0, [6, 2], [0, 3])
    # 0:2: every payload at an activating position, and once more as a sampled context.
    put(levels[0], "top", 2, 0, [7, 8, 9, 10], [4, 3, 2, 1])
    put(levels[0], "sample", 2, 1, [0, 8], [0, 2])
    meta = {"model": "<b>tiny</b>", "layer": 1, "text": "planted", "n_tokens": 1000}
    return ContextStore(meta, list(VOCAB), levels)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("planted")
    paths = {"model": root / "model", "contexts": root / "contexts", "labels": root / "l.json"}
    write_model(paths["model"], SIZES, PARENTS)
    planted_store().save(paths["contexts"])
    paths["labels"].write_text(json.dumps({"labels": LABELS}))
    paths["site"] = build_site(
        paths["model"], paths["contexts"], root / "site", paths["labels"], progress=False
    )
    return paths


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), "no /usr/bin/chromium: `make test` installs Debian's chromium"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, planted):
    """A fresh page on the planted site from disk; fails the test on any script error.

    The page's Content-Security-Policy is bypassed: it would block inline handlers by
    itself, and the payload tests must show that the page never turns data into HTML."""
    context = browser.new_context(bypass_csp=True)
    tab = context.new_page()
    errors, dialogs = [], []
    tab.on("pageerror", lambda err: errors.append(str(err)))
    tab.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    tab.goto((planted["site"] / "index.html").as_uri())
    tab.wait_for_selector("body[data-ready]", timeout=10_000)
    yield tab
    assert not errors, errors
    assert not dialogs, f"a payload opened a dialog: {dialogs}"
    context.close()


def roots(tab) -> list[str]:
    return tab.eval_on_selector_all("#forest > li.node", "els => els.map(e => e.dataset.id)")


def child_ids(tab, feature: str) -> list[str]:
    return tab.eval_on_selector_all(
        f'li.node[data-id="{feature}"] > ul > li.node', "els => els.map(e => e.dataset.id)"
    )


def search(tab, text: str, kind: str = "tokens") -> list[str]:
    """Submit a search; the ids of its hits of one kind ("tokens" or "features")."""
    tab.fill("#search", text)
    tab.press("#search", "Enter")
    tab.wait_for_function("q => document.getElementById('results').dataset.query === q", arg=text)
    return tab.eval_on_selector_all(
        f"#results .hits.{kind} a.feat", "els => els.map(e => e.dataset.id)"
    )


def open_feature(tab, feature: str) -> None:
    tab.click(f'#forest a.feat[data-id="{feature}"]')
    wait_for_panel(tab, feature)


def wait_for_panel(tab, feature: str) -> None:
    """Until the panel shows ``feature`` (its data file loads asynchronously)."""
    tab.wait_for_function(
        "id => document.getElementById('feature-title')?.textContent === 'Feature ' + id",
        arg=feature,
    )


# ---------------------------------------------------------------- in the browser


def test_forest_roots_by_frequency_and_children_rendered_on_demand(page):
    assert roots(page) == ROOT_ORDER
    assert page.locator("li.node").count() == len(ROOT_ORDER)  # no DOM for closed subtrees
    page.click('li.node[data-id="0:1"] > .row > .toggle')
    assert child_ids(page, "0:1") == ["1:1", "1:0"]
    page.click('li.node[data-id="1:0"] > .row > .toggle')
    assert child_ids(page, "1:0") == ["2:0", "2:1"]  # grandchildren
    page.click('li.node[data-id="0:1"] > .row > .toggle')
    assert page.locator('li.node[data-id="0:1"] > ul').is_hidden()


def test_child_panel_highlights_tokens_in_proportion(page):
    page.click('li.node[data-id="0:1"] > .row > .toggle')
    open_feature(page, "1:0")
    panel = page.locator("#panel")
    assert panel.locator(".judge .label").text_content() == "cats and mats"
    assert panel.locator("dd a.feat").get_attribute("data-id") == "0:1"
    assert "8.00% of tokens" in panel.text_content()
    assert panel.locator("svg.hist rect").count() == BINS
    hot = panel.locator(".top .tok.hot")
    assert hot.all_text_contents() == [" cat", " mat"]
    colours = hot.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
    assert colours == ["rgb(255, 136, 0)", "rgba(255, 136, 0, 0.5)"]  # act / max: 1, 0.5
    cold = panel.locator(".top .tok:not(.hot)").first
    assert cold.evaluate("e => getComputedStyle(e).backgroundColor") == "rgba(0, 0, 0, 0)"
    assert panel.locator(".top .ctx .text").text_content() == " the cat sat on the mat"
    assert panel.locator(".sample .tok.hot").all_text_contents() == [" cat"]
    # The parent link opens the parent.
    panel.locator("dd a.feat").click()
    wait_for_panel(page, "0:1")


def test_search_by_index_opens_and_reveals_the_feature(page):
    search(page, "2:3")
    page.click('#results a.feat[data-id="2:3"]')
    wait_for_panel(page, "2:3")
    # Revealed in the forest: its ancestors 0:0 and 1:2 were expanded to render it.
    assert page.locator("#forest li.node.selected").get_attribute("data-id") == "2:3"
    assert child_ids(page, "0:0") == ["1:2"] and child_ids(page, "1:2") == ["2:3"]
    assert search(page, "level 1 #4", "features") == ["1:4"]
    assert search(page, "4", "features") == ["1:4", "2:4"]  # an index alone: every level
    assert search(page, "9:0", "features") == []


def test_search_by_token_finds_features_that_fire_on_it(page):
    # " Zebra" fires 2:3; " zebra" sits in 2:5's context where 2:5 does not fire.
    assert search(page, "ZEBRA") == ["2:3"]
    assert search(page, "mat") == ["1:0"]
    assert search(page, "  Cat ") == ["1:0"]
    assert search(page, "no such token") == []


def test_token_text_is_shown_as_text_and_never_runs(page):
    open_feature(page, "0:2")
    shown = page.locator("#panel .top .tok").all_text_contents()
    assert shown == XSS
    assert page.locator("#panel img, #panel script, #panel svg:not(.hist)").count() == 0
    assert page.locator("#panel .judge .label").text_content() == LABELS["0:2"]["label"]
    assert page.locator("#source").text_content().startswith("model <b>tiny</b>")
    assert search(page, XSS[0]) == ["0:2"]
    assert page.locator("#results img").count() == 0
    assert page.evaluate("window.__xss") is None


def _inline_handler_runs(browser, site: Path) -> bool:
    tab = browser.new_page()  # the policy in force this time
    tab.goto((site / "index.html").as_uri())
    tab.wait_for_selector("body[data-ready]", timeout=10_000)
    tab.evaluate(
        "document.body.insertAdjacentHTML('beforeend', '<img src=x onerror=\"window.__csp=1\">')"
    )
    tab.wait_for_timeout(200)
    ran = tab.evaluate("window.__csp") == 1
    tab.close()
    return ran


def test_content_security_policy_blocks_inline_script_as_a_second_guard(browser, planted, tmp_path):
    assert not _inline_handler_runs(browser, planted["site"])
    # positive control: the same site without the policy runs the payload, so the check
    # above can fail
    bare = tmp_path / "bare"
    shutil.copytree(planted["site"], bare)
    page = (bare / "index.html").read_text()
    without = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page, flags=re.S)
    assert without != page
    (bare / "index.html").write_text(without)
    assert _inline_handler_runs(browser, bare)


def test_shard_hash_agrees_with_the_page(page):
    keys = ["zebra", "café", "日本語", "<script>", "x" * 40, ""]
    for n in (1, 7, 64, 256):
        got = page.evaluate("([keys, n]) => keys.map(k => shardOf(k, n))", [keys, n])
        assert got == [shard_of(k, n) for k in keys]


def test_served_on_localhost_by_the_command(browser, planted, subprocess_env):
    """`hsae explore --serve --port 0` serves the site on 127.0.0.1 until interrupted."""
    out = planted["site"].parent / "served"
    cmd = [
        sys.executable,
        "-m",
        "hsae",
        "explore",
        str(planted["model"]),
        "--contexts",
        str(planted["contexts"]),
        "--out",
        str(out),
        "--serve",
        "--port",
        "0",
        "--quiet",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env,
        # a test run started in the background inherits SIGINT ignored; Ctrl-C is the point
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        url = None
        for line in proc.stdout:
            if m := re.search(r"http://127\.0\.0\.1:\d+/", line):
                url = m.group(0)
                break
        assert url, proc.stderr.read()
        with urllib.request.urlopen(url + "data/forest.js", timeout=10) as reply:
            assert reply.read().startswith(b'HSAE_LOAD("forest",')
        tab = browser.new_page(bypass_csp=True)
        tab.goto(url)
        tab.wait_for_selector("body[data-ready]", timeout=10_000)
        assert roots(tab) == ROOT_ORDER
        tab.close()
    finally:
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "stopped" in rest


# ---------------------------------------------------------------- 30,000 features


def synthetic_store(sizes: list[int], window: int, n_vocab: int, seed: int = 1) -> ContextStore:
    """Random contexts, about 10 % of tokens firing: a worst case for size, not a model."""
    g = torch.Generator().manual_seed(seed)
    levels = []
    for n in sizes:
        lv = empty_level(n, 10, 5, window, 16)
        for kind in ("top", "sample"):
            shape = getattr(lv, f"{kind}_ids").shape
            ids = torch.randint(0, n_vocab, shape, generator=g, dtype=torch.int32)
            acts = torch.rand(shape, generator=g) * 5 * (torch.rand(shape, generator=g) < 0.1)
            setattr(lv, f"{kind}_ids", ids)
            setattr(lv, f"{kind}_acts", acts.half())
        lv.max_act = torch.maximum(lv.top_acts.amax((1, 2)), lv.sample_acts.amax((1, 2))).float()
        lv.histogram_max = lv.max_act.clone()
        lv.frequency = torch.rand(n, generator=g) ** 3 * 0.05
        lv.histogram = torch.randint(0, 100, (n, 16), generator=g)
        levels.append(lv)
    return ContextStore({"model": "synthetic"}, [f" w{i}" for i in range(n_vocab)], levels)


def test_thirty_thousand_features_build_open_and_search_fast(browser, tmp_path):
    sizes = [2000, 4000, 8000, 16000]
    g = torch.Generator().manual_seed(2)
    parents = []
    for above, n in zip(sizes, sizes[1:]):
        p = torch.randint(0, above, (n,), generator=g)
        p[torch.rand(n, generator=g) < 0.1] = -1  # orphans: roots at deeper levels
        parents.append(p.tolist())
    write_model(tmp_path / "model", sizes, parents)
    store = synthetic_store(sizes, window=8, n_vocab=3000)
    store.save(tmp_path / "contexts")
    start = time.perf_counter()
    site = build_site(tmp_path / "model", tmp_path / "contexts", tmp_path / "site", progress=False)
    build_s = time.perf_counter() - start

    tab = browser.new_page(bypass_csp=True)
    start = time.perf_counter()
    tab.goto((site / "index.html").as_uri())
    tab.wait_for_selector("body[data-ready]", timeout=20_000)
    open_ms = (time.perf_counter() - start) * 1000
    n_roots = sizes[0] + sum(p.count(-1) for p in parents)
    assert tab.locator("#forest-info").text_content().startswith(f"{n_roots} roots")
    assert tab.locator("li.node").count() == PAGE  # one page of roots, nothing more

    start = time.perf_counter()
    assert search(tab, "3:15999", "features") == ["3:15999"]
    index_ms = (time.perf_counter() - start) * 1000
    # The most strongly firing features for " w17", as the index says.
    expected = token_index(store)["w17"]
    start = time.perf_counter()
    hits = search(tab, "w17")
    token_ms = (time.perf_counter() - start) * 1000
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    as_ids = [
        f"{lv}:{f - offsets[lv]}"
        for f in expected[:50]
        for lv in range(4)
        if offsets[lv] <= f < offsets[lv + 1]
    ]
    assert hits == as_ids and len(expected) > 10

    start = time.perf_counter()
    tab.click('#results a.feat[data-id="' + as_ids[0] + '"]')
    tab.wait_for_selector("#panel .top .tok.hot")
    panel_ms = (time.perf_counter() - start) * 1000
    tab.close()
    print(
        f"\n30,000 features: build {build_s:.2f} s, open {open_ms:.0f} ms, search by index "
        f"{index_ms:.0f} ms, by token {token_ms:.0f} ms, open a feature {panel_ms:.0f} ms"
    )
    assert build_s < 60 and open_ms < 5000 and max(index_ms, token_ms, panel_ms) < 3000


# ---------------------------------------------------------------- builder and command


def test_data_files_cannot_close_a_script_and_round_trip():
    value = {"t": XSS + ["a\u2029b", "&amp;", "\\<"]}
    payload = js_payload("k", value).decode("ascii")
    assert re.search(r"[<>&\u2028\u2029]", payload) is None
    inner = payload.removeprefix("HSAE_LOAD(").removesuffix(");\n")
    assert json.loads(f"[{inner}]") == ["k", value]


def test_token_index_by_hand():
    index = token_index(planted_store())
    assert index["zebra"] == [3 + 5 + 3]  # level 2 offset 8, feature 3
    assert index["mat"] == [3 + 0] and index["cat"] == [3 + 0] and "the" not in index
    assert index[XSS[0].lower()] == [2]


def test_rebuild_replaces_the_site_and_leaves_nothing_behind(planted, tmp_path, leftovers):
    out = tmp_path / "site"
    build_site(planted["model"], planted["contexts"], out, progress=False)
    (out / "stale.txt").write_text("from an earlier build")
    build_site(planted["model"], planted["contexts"], out, planted["labels"], progress=False)
    assert not (out / "stale.txt").exists() and (out / "data" / "f" / "2_0.js").is_file()
    assert leftovers(tmp_path) == []


def test_bad_input_is_one_line_and_exit_2(planted, tmp_path, capsys, leftovers):
    model, contexts = str(planted["model"]), str(planted["contexts"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{nope")
    far = tmp_path / "far.json"
    far.write_text(json.dumps({"labels": {"2:7": {"label": "x", "score": 1}}}))
    other = tmp_path / "other_contexts"
    store = planted_store()
    store.levels = store.levels[:2]
    store.save(other)
    # the probe: another model's store with the same sizes
    twin = tmp_path / "twin"
    write_model(twin, SIZES, PARENTS, d=5)
    stolen = tmp_path / "stolen_contexts"
    store = planted_store()
    store.meta |= {"model": str(twin), "model_sha256": TrainedHSAE.load(twin).fingerprint()}
    store.save(stolen)
    out = str(tmp_path / "out")
    cases = [
        ([str(tmp_path / "nope"), "--contexts", contexts], "nope"),
        ([model, "--contexts", str(tmp_path / "missing")], "contexts.json"),
        ([model, "--contexts", str(other)], "levels [3, 5]"),
        ([model, "--contexts", str(stolen)], "collected from another model"),
        ([model, "--contexts", contexts, "--labels", str(bad_json)], "invalid JSON"),
        ([model, "--contexts", contexts, "--labels", str(far)], "'2:7'"),
        ([model, "--contexts", contexts, "--out", str(foreign)], "refusing"),
        ([model], "--contexts"),
        ([model, "--contexts", contexts, "--port", "x"], "--port"),
        ([model, "--contexts", contexts, "--serve", "--port", "70000"], "--port must be <= 65535"),
    ]
    for argv, needle in cases:
        argv = ["explore", *argv] + ([] if "--out" in argv else ["--out", out])
        capsys.readouterr()
        try:
            rc = main(argv + ["--quiet"])
        except SystemExit as stop:  # argparse's own errors
            rc = stop.code
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (argv, err)
        assert re.match(r"hsae( explore)?: error: ", lines[0]) and needle in lines[0], lines
    assert not Path(out).exists()
    assert os.listdir(foreign) == ["notes.txt"]
    assert leftovers(tmp_path) == []
    server = make_server(planted["site"], 0)  # a taken port is one line too
    try:
        with pytest.raises(ValueError, match="cannot serve on 127.0.0.1"):
            make_server(planted["site"], server.server_address[1])
    finally:
        server.server_close()


def test_server_binds_to_localhost_only(planted):
    server = make_server(planted["site"], 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert server.server_address[0] == "127.0.0.1"
        url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert b'<script src="app.js">' in reply.read()
    finally:
        server.shutdown()
        server.server_close()
