"""Splice evaluation on tiny random GPT-2 / BERT models with local word-level tokenizers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

import hsae.evaluation.splice as splice  # noqa: E402
from hsae.evaluation.splice import find_blocks, locate_hidden_state, splice_eval  # noqa: E402
from hsae.method.model import HSAE  # noqa: E402

D = 32
TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat watched",
    "birds sing",
    "the quick brown fox jumps over the lazy dog",
    "we read a book in the park",
    "rain fell on the mat and the dog slept",
]
WORDS = sorted({w for t in TEXTS for w in t.split()})


def word_tokenizer(specials: list[str], template: str | None, **tokens) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template is not None:
        used = [s for s in specials if s in template]
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(s, vocab[s]) for s in used]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **tokens)


@pytest.fixture(scope="module")
def gpt2():
    """Causal LM; like GPT-2's own, the tokenizer has a BOS it does not add and no pad token."""
    tok = word_tokenizer(["[UNK]", "<bos>"], None, bos_token="<bos>")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=D, n_layer=2, n_head=2,
        bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).eval(), tok


def bert_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return word_tokenizer(
        specials,
        "[CLS] $A [SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def bert_config(tok) -> BertConfig:
    return BertConfig(
        vocab_size=len(tok),
        hidden_size=D,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )


@pytest.fixture(scope="module")
def bert_mlm():
    tok = bert_tokenizer()
    torch.manual_seed(1)
    return BertForMaskedLM(bert_config(tok)).eval(), tok


@pytest.fixture(scope="module")
def bert_encoder():
    tok = bert_tokenizer()
    torch.manual_seed(2)
    return BertModel(bert_config(tok)).eval(), tok


def exact_then_zero_hsae(scale: float = 0.25) -> HSAE:
    """Level 0 reconstructs exactly (ReLU pairs: relu(x) - relu(-x) = x); level 1 outputs 0."""
    model = HSAE(D, (2 * D, 4 * D), bandwidth=0.01)
    eye = torch.eye(D)
    with torch.no_grad():
        model.W_enc[0].copy_(torch.cat([eye, -eye], 1))
        model.W_dec[0].copy_(torch.cat([eye, -eye], 0))
        model.W_dec[1].zero_()
        for level in range(2):
            model.b_enc[level].zero_()
            model.b_dec[level].zero_()
            model.threshold[level].zero_()
        model.scale.fill_(scale)
    return model


def run(model_tok, kind: str, layer: int, texts=TEXTS, **kw):
    model, tok = model_tok
    kw.setdefault("batch_size", 4)
    return splice_eval(model, tok, kind, layer, exact_then_zero_hsae(), texts, progress=False, **kw)


# ---------------------------------------------------------------- (a), (b) exact and zero levels


@pytest.mark.parametrize(
    "fixture,kind,layer",
    [
        ("gpt2", "causal", 0),
        ("gpt2", "causal", 1),
        ("gpt2", "causal", 2),
        ("bert_mlm", "masked", 1),
        ("bert_encoder", "encoder", 2),
    ],
)
def test_exact_level_recovers_all_and_zero_level_none(request, fixture, kind, layer):
    result = run(request.getfixturevalue(fixture), kind, layer)
    assert result["kind"] == kind and result["metric"] == splice.KINDS[kind]
    assert result["n_tokens"] > 0 and result["n_texts"] == len(TEXTS)
    exact, zero = result["levels"]
    assert abs(result["zero"] - result["clean"]) > 1e-3  # random models: either sign
    assert exact["spliced"] == pytest.approx(result["clean"], abs=1e-4)
    assert exact["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert zero["spliced"] == pytest.approx(result["zero"], abs=1e-4)
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    if kind == "encoder":
        assert result["clean"] == 0.0
    for value in (result["clean"], result["zero"], exact["spliced"], exact["loss_recovered"]):
        assert isinstance(value, float)


def test_clean_loss_is_the_models_own_cross_entropy(gpt2):
    """The clean loss against Hugging Face's: the model's own loss with labels= (which
    shifts the targets itself), text by text, weighted by the targets each text has. An
    off-by-one in our target shift would not match."""
    model, tok = gpt2
    texts = TEXTS[:3]
    result = run(gpt2, "causal", 1, texts=texts)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[tok.bos_token_id, *tok(text)["input_ids"]]])
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert result["n_tokens"] == count
    assert result["clean"] == pytest.approx(total / count, rel=1e-5)


def test_max_texts_and_counts(gpt2):
    one = run(gpt2, "causal", 1, max_texts=1)
    n_words = len(TEXTS[0].split())
    assert one["n_texts"] == 1 and one["n_tokens"] == n_words  # <bos> w1..wn: n targets
    some = run(gpt2, "causal", 1, texts=["", "   ", TEXTS[0]])  # texts without tokens: dropped
    assert some["n_texts"] == 1 and some["n_tokens"] == n_words


# ---------------------------------------------------------------- (c) the right hidden state


@pytest.mark.parametrize("fixture", ["gpt2", "bert_mlm", "bert_encoder"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_hook_replaces_the_claimed_hidden_state(request, fixture, layer):
    model, tok = request.getfixturevalue(fixture)
    enc = splice._tokenize(tok, TEXTS[:3], 128, "cpu", add_bos=fixture == "gpt2")
    enc.pop("special_tokens_mask")
    with torch.no_grad():
        clean = model(**enc, output_hidden_states=True).hidden_states
        site = locate_hidden_state(model, layer, enc)
        raw = []
        with site.replace(lambda h: raw.append(h.clone())):
            model(**enc)
        with site.replace(lambda h: h + 1.0):
            hit = model(**enc, output_hidden_states=True).hidden_states
        for j in range(layer):
            torch.testing.assert_close(hit[j], clean[j], rtol=0, atol=0)
        if fixture == "gpt2" and layer == 2:
            # GPT-2 reports ln_f(last block) as hidden_states[2]; the hook is before ln_f,
            # on the raw residual stream that hsae.data.extract reads
            assert site.name == "output of block 1"
            torch.testing.assert_close(clean[2], model.transformer.ln_f(raw[0]))
            torch.testing.assert_close(hit[2], model.transformer.ln_f(raw[0] + 1.0))
        else:
            torch.testing.assert_close(raw[0], clean[layer], rtol=0, atol=0)
            torch.testing.assert_close(hit[layer], clean[layer] + 1.0)


@pytest.mark.parametrize("fixture,kind", [("gpt2", "causal"), ("bert_mlm", "masked")])
@pytest.mark.parametrize("layer", [0, 2])
def test_splice_reads_hidden_state_at_non_pad_non_special_positions(
    request, monkeypatch, fixture, kind, layer
):
    model, tok = request.getfixturevalue(fixture)
    seen = []

    def identity(hsae, x, level):
        seen.append(x.clone())
        return x

    monkeypatch.setattr(HSAE, "reconstruct_raw", identity)
    texts = TEXTS[:3]
    result = splice_eval(
        model, tok, kind, layer, exact_then_zero_hsae(), texts, batch_size=3, progress=False
    )
    assert result["levels"][0]["spliced"] == pytest.approx(result["clean"], abs=1e-5)
    enc = splice._tokenize(tok, texts, 128, "cpu", add_bos=kind == "causal")
    special = enc.pop("special_tokens_mask").bool()
    if kind == "masked":  # the same seeded mask splice_eval drew for its first batch
        draw = torch.rand(special.shape, generator=torch.Generator().manual_seed(0))
        live = enc["attention_mask"].bool()
        enc["input_ids"] = enc["input_ids"].masked_fill(
            live & ~special & (draw < 0.15), tok.mask_token_id
        )
    live = enc["attention_mask"].bool()
    positions = live & ~special  # <bos>, [CLS], [SEP] stay clean
    assert ((special & live).sum(1) == (1 if kind == "causal" else 2)).all()
    with torch.no_grad():
        if layer == 2 and kind == "causal":  # raw output of the last block (before ln_f)
            raw = []
            with splice.hidden_state_site(model, layer).replace(raw.append):
                model(**enc)
            want = raw[0][positions]
        else:
            want = model(**enc, output_hidden_states=True).hidden_states[layer][positions]
    assert len(seen) == 2  # one call per level
    for x in seen:
        torch.testing.assert_close(x, want)


def test_prepend_bos(gpt2, monkeypatch):
    counts = []
    monkeypatch.setattr(HSAE, "reconstruct_raw", lambda h, x, level: counts.append(len(x)) or x)
    model, tok = gpt2
    n_words = sum(len(t.split()) for t in TEXTS[:2])
    for prepend_bos, targets in ((None, n_words), (True, n_words), (False, n_words - 2)):
        counts.clear()
        result = splice_eval(
            model, tok, "causal", 1, exact_then_zero_hsae(), TEXTS[:2], progress=False,
            prepend_bos=prepend_bos,
        )  # fmt: skip
        assert counts == [n_words, n_words]  # every word is spliced, never the BOS
        assert result["n_tokens"] == targets


# ---------------------------------------------------------------- (d) one mask for all runs


def test_masked_lm_uses_one_seeded_mask_for_every_run(bert_mlm):
    model, tok = bert_mlm
    calls = []

    def record(module, args, kwargs):
        calls.append(kwargs["input_ids"].clone())

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        first = run(bert_mlm, "masked", 1, batch_size=3)
    finally:
        handle.remove()
    # batch 1: locating run + clean + zero + 2 levels; batch 2: clean + zero + 2 levels
    assert len(calls) == 5 + 4
    for group in (calls[:5], calls[5:]):
        for ids in group[1:]:
            assert torch.equal(ids, group[0])
        assert (group[0] == tok.mask_token_id).any()
        assert not (group[0][:, 0] == tok.mask_token_id).any()  # [CLS] is never masked
    again = run(bert_mlm, "masked", 1, batch_size=3)
    assert again == first
    other = run(bert_mlm, "masked", 1, batch_size=3, seed=1)
    assert other["clean"] != first["clean"]


# ---------------------------------------------------------------- (e) errors


@pytest.mark.parametrize("layer", [3, -1, 1.0])
def test_bad_layer_is_a_one_line_value_error(gpt2, layer):
    with pytest.raises(ValueError, match="out of range") as info:
        run(gpt2, "causal", layer)
    assert "\n" not in str(info.value) and "0..2" in str(info.value)


def test_other_errors_are_one_line(gpt2, bert_encoder):
    with pytest.raises(ValueError, match="transformer blocks") as info:
        find_blocks(torch.nn.Linear(2, 2))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="kind must be"):
        run(gpt2, "seq2seq", 1)
    with pytest.raises(ValueError, match="mask token"):
        run(gpt2, "masked", 1)
    with pytest.raises(ValueError, match="LM head"):
        run(bert_encoder, "causal", 1)
    model, tok = gpt2
    with pytest.raises(ValueError, match="hidden size"):
        splice_eval(model, tok, "causal", 1, HSAE(16, (32,), 0.01), TEXTS, progress=False)


def test_find_blocks_on_common_layouts(gpt2, bert_mlm, bert_encoder):
    assert find_blocks(gpt2[0]) is gpt2[0].transformer.h
    assert find_blocks(bert_mlm[0]) is bert_mlm[0].bert.encoder.layer
    assert find_blocks(bert_encoder[0]) is bert_encoder[0].encoder.layer
