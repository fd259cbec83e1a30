"""Top-activating and sampled contexts: the streaming pass against brute force, on tiny
random GPT-2 and BERT models built offline, the sampler's statistics, the store, the CLI."""

from __future__ import annotations

import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from hsae import pipeline  # noqa: E402
from hsae.cli import main  # noqa: E402
from hsae.data import extract as ex  # noqa: E402
from hsae.explore.collect import Batch, LevelCollector, collect_contexts, token_strings  # noqa: E402
from hsae.explore.contexts import ContextStore  # noqa: E402
from hsae.io import FormatError  # noqa: E402
from hsae.method.model import HSAE  # noqa: E402
from hsae.trained import TrainedHSAE  # noqa: E402

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "a",
    "dog",
    "ran",
    "in",
    "park",
    "and",
    "too",
    "hierarchical",
    "sparse",
    "autoencoders",
    "find",
    "forest",
    "of",
    "features",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "again",
    "tree",
    "leaf",
    "root",
]
LAYER, WINDOW, TOP_K, N_SAMPLED, BINS, CONTEXT_LEN = 2, 8, 3, 2, 8, 48
SETTINGS = dict(top_k=TOP_K, n_sampled=N_SAMPLED, window=WINDOW, bins=BINS, context_len=CONTEXT_LEN)
SPECIALS = ("<bos>", "<pad>", "<eos>", "[CLS]", "[SEP]", "[PAD]")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _texts(n: int, seed: int) -> list[str]:
    """Random texts with distinct first words: a causal model gives equal prefixes equal
    activations, and such exact ties would be broken by float noise of the batching."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 30, size=n)
    firsts = rng.permutation(WORDS)[:n]
    return [" ".join([w, *rng.choice(WORDS, size=k - 1)]) for w, k in zip(firsts, lengths)]


TEXTS = _texts(24, 0)
TEXTS[5] = "   "  # empty texts are read and skipped
TEXTS[11] = ""


def _gpt2(root: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    cfg = transformers.GPT2Config(
        n_layer=3, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer)
    )
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    return root / "gpt2"


def _bert(root: Path) -> Path:
    vocab = root / "bert_vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]))
    tokenizer = transformers.BertTokenizer(str(vocab))
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        vocab_size=len(tokenizer),
    )
    transformers.BertForMaskedLM(cfg).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    return root / "bert"


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("lms")
    return {"gpt2": _gpt2(root), "bert": _bert(root)}


def _per_text_hidden(lm: ex.LoadedLM, texts: list[str]) -> list[torch.Tensor]:
    """The layer's kept-token activations of each text alone (empty texts: [0, d])."""
    return [
        next(ex.extract(lm, [t], LAYER, CONTEXT_LEN, batch_size=1, progress=False)).acts
        for t in texts
    ]


def _hsae(hidden: list[torch.Tensor], sizes=(5, 9), seed=0) -> HSAE:
    """Random encoder; thresholds at the 70 % quantile of the pre-activations on these
    texts (features fire on about 30 % of tokens), and one feature that never fires."""
    x = torch.cat(hidden)
    model = HSAE(x.shape[1], sizes, bandwidth=0.05, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.scale.fill_(0.7)
        for level, n in enumerate(sizes):
            model.W_enc[level].copy_(torch.randn(x.shape[1], n, generator=gen))
            model.b_dec[level].copy_(torch.randn(x.shape[1], generator=gen) * 0.1)
            pre = model.pre_acts(x * model.scale, level)
            model.threshold[level].copy_(torch.quantile(pre, 0.7, dim=0).clamp(min=1e-3))
        model.threshold[1][3] = 1e9
    return model


@pytest.fixture(scope="module")
def setups(lm_dirs) -> dict:
    """Per LM: the LM, the model, the streamed store and the brute-force activations."""
    out = {}
    for name, path in lm_dirs.items():
        lm = ex.load_lm(path)
        hidden = _per_text_hidden(lm, TEXTS)
        model = _hsae(hidden)
        with torch.no_grad():
            acts = [model.encode(h * model.scale) if len(h) else None for h in hidden]
        store = collect_contexts(
            model,
            lm,
            iter(TEXTS),
            LAYER,
            **SETTINGS,
            batch_size=3,
            chunk_elements=64,
            progress=False,
        )
        out[name] = dict(lm=lm, model=model, acts=acts, store=store, n_tokens=sum(map(len, hidden)))
    return out


# ---------------------------------------------------------------- brute force


def _window_words(text: str, pos: int) -> tuple[list[str], int]:
    words = text.split()
    start = max(0, min(pos - WINDOW // 2, len(words) - WINDOW))
    return [" " + w for w in words[start : start + WINDOW]], start


def _brute_top(acts, level: int, feature: int) -> list[tuple[float, int, int]]:
    """(max activation, text, first position of it) of the top texts, best first."""
    rows = []
    for t, per_level in enumerate(acts):
        if per_level is None:
            continue
        col = per_level[level][:, feature]
        if col.max() > 0:
            rows.append((float(col.max()), t, int(torch.argmax(col))))
    rows.sort(key=lambda r: (-r[0], r[1]))
    return rows[:TOP_K]


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_top_contexts_equal_brute_force(setups, name):
    s = setups[name]
    store, acts = s["store"], s["acts"]
    assert store.sizes == [5, 9] and store.meta["n_tokens"] == s["n_tokens"]
    checked = 0
    for level, n in enumerate(store.sizes):
        for f in range(n):
            expected = _brute_top(acts, level, f)
            got = store.examples(level, f, "top")
            assert len(got) == len(expected)
            for example, (value, t, pos) in zip(got, expected):
                words, start = _window_words(TEXTS[t], pos)
                assert example.tokens == words
                want = acts[t][level][start : start + WINDOW, f]
                assert torch.allclose(torch.tensor(example.acts), want, rtol=2e-3, atol=1e-3)
                assert example.max_act == pytest.approx(value, rel=2e-3)
                checked += 1
    assert checked >= 20
    assert store.examples(1, 3, "top") == []  # the feature that never fires


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_frequency_max_and_histogram_equal_brute_force(setups, name):
    s = setups[name]
    store, acts = s["store"], s["acts"]
    for level, lv in enumerate(store.levels):
        values = torch.cat([a[level] for a in acts if a is not None])
        for f in range(lv.n_features):
            v = values[:, f][values[:, f] > 0].double()
            assert lv.frequency[f].item() == pytest.approx(len(v) / s["n_tokens"], abs=1e-7)
            want = float(v.max()) if len(v) else 0.0
            assert lv.max_act[f].item() == pytest.approx(want, rel=1e-4, abs=1e-6)
            h = lv.histogram_max[f].double()
            if len(v) == 0:
                assert lv.histogram[f].sum() == 0 and h == 0
                continue
            assert h == 2.0 ** math.ceil(math.log2(v.max())), "the power of two >= max"
            _check_histogram(lv.histogram[f], v * BINS / h)
            edges = lv.histogram_edges(f)
            assert len(edges) == BINS + 1 and edges[-1] == pytest.approx(float(h))


def _check_histogram(counts: torch.Tensor, x: torch.Tensor) -> None:
    """Bin i holds the x in (i, i + 1]. An x within float noise of an edge (the streamed
    and the one-text-at-a-time activations differ in the last bits) may fall either side."""
    near = (x - x.round()).abs() < 1e-4
    sure = torch.bincount((torch.ceil(x[~near]).long() - 1).clamp(0, BINS - 1), minlength=BINS)
    extra = counts - sure
    edges = x[near].round().long()
    allowed = torch.zeros(BINS, dtype=torch.bool)
    allowed[(edges - 1).clamp(0, BINS - 1)] = True
    allowed[edges.clamp(0, BINS - 1)] = True
    assert (extra >= 0).all() and extra.sum() == near.sum() and allowed[extra > 0].all()


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_sampled_contexts_are_real_firing_windows_of_distinct_texts(setups, name):
    s = setups[name]
    store, acts = s["store"], s["acts"]
    for level, n in enumerate(store.sizes):
        for f in range(n):
            firing = [t for t, a in enumerate(acts) if a is not None and a[level][:, f].max() > 0]
            got = store.examples(level, f, "sample")
            assert len(got) == min(N_SAMPLED, len(firing))
            texts = []
            for example in got:
                assert example.max_act > 0
                matches = [
                    (t, p)
                    for t in firing
                    for p in torch.nonzero(acts[t][level][:, f] > 0).flatten().tolist()
                    if _window_words(TEXTS[t], p)[0] == example.tokens
                ]
                assert matches, example.tokens
                t, p = matches[0]
                start = _window_words(TEXTS[t], p)[1]
                want = acts[t][level][start : start + WINDOW, f]
                assert torch.allclose(torch.tensor(example.acts), want, rtol=2e-3, atol=1e-3)
                texts.append(t)
            assert len(set(texts)) == len(texts)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_no_special_or_padding_token_is_ever_stored(setups, name):
    store = setups[name]["store"]
    assert store.vocab and not any(sp in tok for tok in store.vocab for sp in SPECIALS)
    assert {tok.strip() for tok in store.vocab} <= set(WORDS)
    for lv in store.levels:
        for ids in (lv.top_ids, lv.sample_ids):
            live = ids >= 0  # windows are contiguous: -1 only pads the end of a row
            assert torch.equal(live, live.cummin(dim=-1).values)


def test_store_does_not_depend_on_batching_and_the_seed_changes_only_samples(setups):
    s = setups["gpt2"]
    kwargs = dict(**SETTINGS, progress=False)
    again = collect_contexts(s["model"], s["lm"], iter(TEXTS), LAYER, batch_size=7, **kwargs)
    other = collect_contexts(s["model"], s["lm"], iter(TEXTS), LAYER, seed=1, **kwargs)
    for a, b, c in zip(s["store"].levels, again.levels, other.levels):
        for field in ("top_ids", "sample_ids", "histogram", "histogram_max"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert torch.allclose(a.top_acts.float(), b.top_acts.float(), rtol=2e-3, atol=1e-3)
        assert torch.equal(a.top_ids, c.top_ids) and torch.equal(a.histogram, c.histogram)
    assert s["store"].vocab == again.vocab
    assert any(
        not torch.equal(a.sample_ids, c.sample_ids) for a, c in zip(s["store"].levels, other.levels)
    )


# ---------------------------------------------------------------- the sampler's law


def _feed(collector: LevelCollector, texts: list[list[float]], number: int) -> None:
    """One batch of texts (one feature's activation per token) numbered from ``number``;
    a token's id is 10 * number + its place in the batch."""
    lengths = torch.tensor([len(t) for t in texts])
    acts = torch.tensor([a for t in texts for a in t]).unsqueeze(1)
    batch = Batch(
        torch.arange(len(acts)) + 10 * number,
        torch.repeat_interleave(torch.arange(len(texts)), lengths),
        torch.cumsum(lengths, 0) - lengths,
        lengths,
        torch.arange(len(texts)) + number,
    )
    collector.update(acts, 0, batch)


def _draw(seed: int) -> tuple[int, int, int]:
    """One feature over two batches of two texts; window 1, so a sampled context is its
    drawn token. Returns (first token, first text, second text)."""
    collector = LevelCollector(1, top_k=1, n_sampled=2, window=1, bins=2, seed=seed, level=0)
    _feed(collector, [[1.0], [2.0, 0.0]], 0)
    _feed(collector, [[0.5, 2.5], [4.0]], 2)
    return (int(collector.sample.ids[0, 0, 0]), *collector.sample.text[0].tolist())


def _chi2(counts: dict, probs: dict, n: int) -> float:
    assert set(counts) <= set(probs)
    return sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in probs.items())


def test_sampling_follows_activation_proportion():
    """First draw: token i with probability a_i / sum a; then without replacement over
    texts weighted by their summed activation. Fixed seeds: a deterministic check."""
    n = 3000
    draws = [_draw(seed) for seed in range(n)]
    token_weight = {0: 1.0, 1: 2.0, 20: 0.5, 21: 2.5, 22: 4.0}  # token id -> activation
    firsts: dict = {}
    for token, _, _ in draws:
        firsts[token] = firsts.get(token, 0) + 1
    assert _chi2(firsts, {k: w / 10 for k, w in token_weight.items()}, n) < 18.47  # df 4, p .001
    text_weight = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    pairs: dict = {}
    for _, a, b in draws:
        pairs[(a, b)] = pairs.get((a, b), 0) + 1
    pair_probs = {
        (a, b): wa / 10 * wb / (10 - wa)
        for a, wa in text_weight.items()
        for b, wb in text_weight.items()
        if a != b
    }
    assert _chi2(pairs, pair_probs, n) < 31.26  # df 11, p .001
    # the check has power: the same draws are far from a uniform choice of text
    first_texts = {k: sum(1 for _, a, _ in draws if a == k) for k in range(4)}
    assert _chi2(first_texts, {k: 0.25 for k in range(4)}, n) > 100


def test_histogram_bound_doubles_and_counts_stay_exact():
    """h = 1 after 0.75; 3.0 doubles it twice (bins merged pairwise); right-closed bins."""
    collector = LevelCollector(1, top_k=1, n_sampled=0, window=1, bins=4, seed=0, level=0)
    _feed(collector, [[0.75]], 0)
    assert collector.hist_max.tolist() == [1.0] and collector.hist[0].tolist() == [0, 0, 1, 0]
    _feed(collector, [[3.0, 0.25], [1.0]], 1)
    # width 1 over (0, 4]: 0.75, 0.25 and 1.0 (the edge, right-closed) in bin 0; 3.0 in bin 2
    assert collector.hist_max.tolist() == [4.0] and collector.hist[0].tolist() == [3, 0, 1, 0]
    assert collector.count.tolist() == [4] and collector.max_act.tolist() == [3.0]


def test_top_contexts_one_per_text_and_ties_to_the_earlier_text():
    collector = LevelCollector(1, top_k=2, n_sampled=0, window=2, bins=2, seed=0, level=0)
    _feed(collector, [[0.0, 3.0, 3.0, 1.0], [2.0]], 5)  # texts 5 and 6
    _feed(collector, [[2.0, 0.5]], 2)  # text 2 ties with text 6 and comes first
    assert collector.top.text[0].tolist() == [5, 2]
    assert collector.top.score[0].tolist() == [3.0, 2.0]
    # text 5: its first token of 3.0 (place 1 in the batch), window from place 0
    assert collector.top.ids[0].tolist() == [[50, 51], [20, 21]]
    assert collector.top.acts[0].tolist() == [[0.0, 3.0], [2.0, 0.5]]


# ---------------------------------------------------------------- token strings


def test_token_strings_read_as_the_text(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS)] * 3, vocab_size=300, show_progress=False)
    gpt2 = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    text = "the lazy fox, again: hierarchical forests"
    ids = gpt2(text)["input_ids"]
    strings = token_strings(gpt2, ids)
    assert "".join(strings) == text and len(strings) == len(ids) > len(text.split())
    (tmp_path / "v.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "run", "##ning", "dog"])
    )
    bert = transformers.BertTokenizer(str(tmp_path / "v.txt"))
    ids = bert("the dog running", add_special_tokens=False)["input_ids"]
    assert token_strings(bert, ids) == [" the", " dog", " run", "ning"]


# ---------------------------------------------------------------- the store on disk


def test_save_load_round_trip_is_exact(setups, tmp_path):
    store = setups["bert"]["store"]
    store.save(tmp_path / "ctx")
    back = ContextStore.load(tmp_path / "ctx")
    assert back.meta == store.meta and back.vocab == store.vocab
    for a, b in zip(store.levels, back.levels):
        for field in (
            "top_ids",
            "top_acts",
            "sample_ids",
            "sample_acts",
            "frequency",
            "max_act",
            "histogram",
            "histogram_max",
        ):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert back.examples(0, 0) == store.examples(0, 0)


def test_corrupt_or_truncated_store_names_the_file(setups, tmp_path):
    store = setups["gpt2"]["store"]
    store.save(tmp_path / "a")
    tensors = tmp_path / "a" / "contexts.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])
    with pytest.raises(FormatError, match="contexts.safetensors"):
        ContextStore.load(tmp_path / "a")
    store.save(tmp_path / "b")
    meta = tmp_path / "b" / "contexts.json"
    meta.write_text(meta.read_text()[:50])
    with pytest.raises(FormatError, match="contexts.json"):
        ContextStore.load(tmp_path / "b")
    meta.unlink()
    with pytest.raises(FormatError, match="contexts.json"):
        ContextStore.load(tmp_path / "b")


# ---------------------------------------------------------------- the command


def _save_model(model: HSAE, directory: Path, data: dict) -> Path:
    parents = [torch.arange(n) % model.sizes[i] for i, n in enumerate(model.sizes[1:])]
    TrainedHSAE(model, parents, {"data": data}).save(directory)
    return directory


def _texts_file(path: Path, texts: list[str]) -> Path:
    path.write_text("\n\n".join(t for t in texts if t.strip()) + "\n")
    return path


def test_cli_defaults_to_the_training_cache_and_its_unseen_texts(setups, lm_dirs, tmp_path):
    s = setups["gpt2"]
    texts = [t for t in TEXTS if t.strip()]
    source = _texts_file(tmp_path / "texts.txt", texts)
    req = pipeline.CacheRequest(
        model=str(lm_dirs["gpt2"]),
        layer=LAYER,
        text=str(source),
        out=str(tmp_path / "cache"),
        context_len=CONTEXT_LEN,
        batch_size=4,
        max_tokens=60,
        shard_tokens=64,
    )
    cache = pipeline.cache_activations(req, progress=False)
    done = cache.manifest["texts_done"]
    assert 0 < done < len(texts)
    model_dir = _save_model(s["model"], tmp_path / "model", {"kind": "cache", "path": req.out})
    args = [
        "contexts",
        str(model_dir),
        "--out",
        str(tmp_path / "ctx"),
        "--quiet",
        "--top_k",
        str(TOP_K),
        "--n_sampled",
        str(N_SAMPLED),
        "--window",
        str(WINDOW),
        "--bins",
        str(BINS),
    ]
    assert main(args) == 0
    store = ContextStore.load(tmp_path / "ctx")
    m = store.meta
    assert (m["lm"], m["layer"], m["text"]) == (str(lm_dirs["gpt2"]), LAYER, str(source))
    assert m["context_len"] == CONTEXT_LEN
    assert m["skipped_texts"] == done and m["n_texts"] == len(texts) - done
    direct = collect_contexts(
        s["model"],
        s["lm"],
        iter(texts[done:]),
        LAYER,
        **SETTINGS,
        progress=False,
    )
    assert store.vocab == direct.vocab
    for a, b in zip(store.levels, direct.levels):
        assert torch.equal(a.top_ids, b.top_ids) and torch.equal(a.sample_ids, b.sample_ids)
        assert torch.equal(a.histogram, b.histogram)


def _fails(capsys, args: list[str], message: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("hsae: error: ") and err.count("\n") == 1 and message in err, err


def test_cli_bad_input_is_one_line_and_exit_2(setups, lm_dirs, tmp_path, capsys):
    model = setups["gpt2"]["model"]
    planted = _save_model(model, tmp_path / "planted", {"kind": "planted"})
    texts = str(_texts_file(tmp_path / "t.txt", TEXTS))
    (tmp_path / "empty.txt").write_text("\n\n")
    out = ["--out", str(tmp_path / "ctx"), "--quiet"]
    lm = ["--model", str(lm_dirs["gpt2"]), "--layer", str(LAYER)]
    _fails(capsys, ["contexts", str(tmp_path / "nope"), *out], "nope")
    _fails(capsys, ["contexts", str(planted), *out], "pass --model, --layer, --text")
    _fails(
        capsys,
        ["contexts", str(planted), *out, *lm, "--text", str(tmp_path / "empty.txt")],
        "no texts",
    )
    _fails(capsys, ["contexts", str(planted), *out, *lm, "--text", "nowhere.txt"], "nowhere")
    narrow = HSAE(16, (4, 8), 0.05)
    narrow_dir = _save_model(narrow, tmp_path / "narrow", {"kind": "planted"})
    _fails(capsys, ["contexts", str(narrow_dir), *out, *lm, "--text", texts], "d_in = 16")
    _fails(
        capsys,
        [
            "contexts",
            str(planted),
            *out,
            "--model",
            str(lm_dirs["gpt2"]),
            "--layer",
            "9",
            "--text",
            texts,
        ],
        "layer 9",
    )
    _fails(capsys, ["contexts", str(planted), *out, *lm, "--text", texts, "--bins", "3"], "bins")
    _fails(capsys, ["contexts", str(planted), *out, *lm, "--text", texts, "--top_k", "0"], "top_k")
    assert not (tmp_path / "ctx").exists()
    gone = _save_model(model, tmp_path / "gone", {"kind": "cache", "path": str(tmp_path / "x")})
    _fails(capsys, ["contexts", str(gone), *out], str(tmp_path / "x"))
