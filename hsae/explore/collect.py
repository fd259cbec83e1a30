"""One streaming pass of a language model over texts: every feature's contexts (appendix C).

For every feature of every level, :func:`collect_contexts` keeps

* **top contexts**: the ``top_k`` texts with the largest activation of the feature, at most
  one context per (text, feature), ordered by that activation (ties: the earlier text,
  and within a text the earlier token). The context is a window around the text's
  strongest token.
* **sampled contexts**: ``n_sampled`` texts drawn without replacement with probability
  proportional to activation (Efraimidis-Spirakis): every firing token ``i`` gets the key
  ``u_i ** (1 / a_i)`` and a text is represented by its token of largest key. ``u_i`` is
  uniform on (0, 1), a hash (splitmix64) of (seed, level, text number, token position,
  feature), so the draw does not depend on how texts are batched or features chunked.
  Since ``max_i u_i ** (1 / a_i)`` is distributed like ``u ** (1 / sum_i a_i)``, this is
  exact weighted sampling of texts with weight = the text's summed activation, the token
  inside the chosen text being drawn with probability ``a_i / sum_i a_i``; so the first
  sample is a token drawn with probability ``a_i / sum a`` over all tokens of all texts.
  Samples are ordered by key (the draw order); the window is centred on the drawn token.
* **frequency** (share of the kept tokens on which it fires), **max activation** and a
  **histogram** of its activations > 0 in ``bins`` bins over ``(0, h]``, ``h`` the smallest
  power of two >= max_act (so ``max_act <= h < 2 max_act``). The maximum is only known at
  the end, but a power of two is easy to track: ``h`` starts at the one above the first
  batch's largest activation and doubles whenever a larger one arrives, merging bins
  pairwise (``bins`` is even); every count is exact for the final edges.

Windows: ``window`` consecutive kept tokens of one text with the chosen token at offset
``window // 2`` (16 of 32: 16 tokens before it, 15 after), shifted to stay inside the
text; a text shorter than the window is shown whole, right-padded with -1. Kept tokens are
those :func:`hsae.data.extract.tokenize` keeps: no BOS / CLS / SEP / padding, ever.
Activations are the trained HSAE's on the scaled input ``s x``, as in training.

Token strings (the store's vocabulary): each token as the tokenizer decodes it after a
plain word, so that ``"".join(tokens)`` reads as the text: GPT-2's ``"Ġcat"`` is
``" cat"``, WordPiece's ``"cat"`` after a word ``" cat"`` and ``"##s"`` is ``"s"``. (A
byte-level token holding part of a UTF-8 character decodes as "\ufffd".)

Memory is bounded whatever the corpus: the state is ``[n, slots, window]`` per level,
and a batch is scored ``chunk_elements`` activations at a time (a slice of features), of
which only the non-zero entries go on. The store depends on the texts, the model, the
settings and the seed; not on the batch size (up to float noise of padded batches).

Why one file of about 550 lines: the streaming pass, its per-feature heaps and reservoirs
and its command share the state of that one pass.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from hsae.data.extract import LoadedLM, check_layer, layer_activations, tokenize
from hsae.explore.contexts import ContextStore, LevelContexts
from hsae.flags import Command, model_dir_option, option
from hsae.method.model import HSAE
from hsae.trained import TrainedHSAE

F16_MAX = 65504.0
POOL_BATCHES = 32
"""Texts are read this many batches at a time and batched by length."""
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class Batch:
    """Kept tokens of a batch of texts, flattened: token ``t`` belongs to text ``text[t]``."""

    token_ids: Tensor  # [T] the LM's token ids
    text: Tensor  # [T] index of the text in the batch
    start: Tensor  # [B] first token of each text
    length: Tensor  # [B] kept tokens of each text
    text_number: Tensor  # [B] index of each text in the whole stream


# ---------------------------------------------------------------------------------------
# the best contexts so far, per feature


def _lexsort(*keys: Tensor) -> Tensor:
    """The order sorting by ``keys[0]``, then ``keys[1]``, ... (all ascending, stable)."""
    order = torch.arange(keys[0].numel())
    for key in reversed(keys):
        order = order[torch.argsort(key[order], stable=True)]
    return order


def _best_per_group(group: Tensor, score: Tensor, tiebreak: Tensor) -> Tensor:
    """Indices of the highest-scoring entry of each group (lowest ``tiebreak`` on ties)."""
    order = _lexsort(group, -score, tiebreak)
    g = group[order]
    first = torch.ones_like(g, dtype=torch.bool)
    first[1:] = g[1:] != g[:-1]
    return order[first]


class BestContexts:
    """Per feature, the ``slots`` highest-scoring contexts so far (score, text, window)."""

    def __init__(self, n: int, slots: int, window: int):
        self.score = torch.full((n, slots), -torch.inf, dtype=torch.float64)
        self.text = torch.full((n, slots), -1, dtype=torch.int64)
        self.ids = torch.full((n, slots, window), -1, dtype=torch.int32)  # the LM's ids
        self.acts = torch.zeros(n, slots, window)

    @property
    def slots(self) -> int:
        return self.score.shape[1]

    def offer(self, feat: Tensor, score: Tensor, text: Tensor, windows) -> None:
        """Merge candidates (one per (text, feature), texts not held yet) into the best;
        ``windows(mask)`` gives the ``(ids, acts)`` windows of the masked candidates. Equal
        scores: the earlier text first."""
        if self.slots == 0 or feat.numel() == 0:
            return
        last, last_text = self.score[feat, -1], self.text[feat, -1]
        keep = (score > last) | ((score == last) & (text < last_text))
        if not keep.any():
            return
        feat, score, text = feat[keep], score[keep], text[keep]
        ids, acts = windows(keep)
        feats = torch.unique(feat)
        all_feat = torch.cat([feats.repeat_interleave(self.slots), feat])
        all_score = torch.cat([self.score[feats].flatten(), score])
        all_text = torch.cat([self.text[feats].flatten(), text])
        order = _lexsort(all_feat, -all_score, all_text)
        sorted_feat = all_feat[order]
        rank = torch.arange(order.numel()) - torch.searchsorted(sorted_feat, sorted_feat)
        chosen = order[rank < self.slots]  # exactly `slots` per feature, best first
        shape = (len(feats), self.slots)
        self.score[feats] = all_score[chosen].view(shape)
        self.text[feats] = all_text[chosen].view(shape)
        all_ids = torch.cat([self.ids[feats].flatten(0, 1), ids])
        all_acts = torch.cat([self.acts[feats].flatten(0, 1), acts])
        self.ids[feats] = all_ids[chosen].view(*shape, -1)
        self.acts[feats] = all_acts[chosen].view(*shape, -1)


class LevelCollector:
    """Everything kept for one level's features while the texts stream by."""

    def __init__(
        self, n: int, top_k: int, n_sampled: int, window: int, bins: int, seed: int, level: int
    ):
        check_settings(bins=bins)
        self.window, self.bins, self.seed, self.level = window, bins, seed, level
        self.top = BestContexts(n, top_k, window)
        self.sample = BestContexts(n, n_sampled, window)
        self.count = torch.zeros(n, dtype=torch.int64)
        self.max_act = torch.zeros(n)
        self.hist = torch.zeros(n, bins, dtype=torch.int64)
        self.hist_max = torch.zeros(n, dtype=torch.float64)

    def update(self, acts: Tensor, first: int, batch: Batch) -> None:
        """Take in one chunk: ``acts`` [T, m] are features ``first .. first + m - 1``."""
        tok, col = acts.nonzero(as_tuple=True)
        if tok.numel() == 0:
            return
        val = acts[tok, col]
        feat = col + first
        self.count += torch.bincount(feat, minlength=self.count.numel())
        self.max_act.scatter_reduce_(0, feat, val, "amax")
        self._histogram(feat, val)
        group = batch.text[tok] * acts.shape[1] + col
        best = _best_per_group(group, val.double(), tok)
        self._offer(self.top, acts, batch, tok[best], col[best], val[best].double(), first)
        text = batch.text[tok]
        position = tok - batch.start[text]
        u = uniforms(self.seed, self.level, batch.text_number[text], position, feat)
        key = u.log() / val.double()  # log of u ** (1 / a): same order, no underflow
        drawn = _best_per_group(group, key, tok)
        self._offer(self.sample, acts, batch, tok[drawn], col[drawn], key[drawn], first)

    def _offer(self, best: BestContexts, acts, batch: Batch, tok, col, score, first) -> None:
        text = batch.text[tok]

        def windows(mask: Tensor) -> tuple[Tensor, Tensor]:
            return _windows(acts, batch, tok[mask], col[mask], self.window)

        best.offer(col + first, score, batch.text_number[text], windows)

    def _histogram(self, feat: Tensor, val: Tensor) -> None:
        v = val.double()
        top = torch.zeros_like(self.hist_max).scatter_reduce_(0, feat, v, "amax")
        new = (self.hist_max == 0) & (top > 0)
        self.hist_max[new] = _power_of_two_above(top[new])
        while (grow := top > self.hist_max).any():  # double h, merging bins pairwise
            merged = self.hist[grow, 0::2] + self.hist[grow, 1::2]
            self.hist[grow] = torch.cat([merged, torch.zeros_like(merged)], 1)
            self.hist_max[grow] *= 2
        index = torch.ceil(v * self.bins / self.hist_max[feat]).long() - 1
        flat = feat * self.bins + index.clamp(0, self.bins - 1)
        self.hist.view(-1).index_add_(0, flat, torch.ones_like(flat))

    def finish(self, n_tokens: int, lookup: Tensor) -> LevelContexts:
        """The level's store tensors; ``lookup[lm_id]`` is the token's vocabulary index."""

        def ids(t: Tensor) -> Tensor:
            return torch.where(t >= 0, lookup[t.clamp(min=0)], -1).to(torch.int32)

        def acts(t: Tensor) -> Tensor:
            return t.clamp(max=F16_MAX).half()

        return LevelContexts(
            top_ids=ids(self.top.ids),
            top_acts=acts(self.top.acts),
            sample_ids=ids(self.sample.ids),
            sample_acts=acts(self.sample.acts),
            frequency=(self.count.double() / max(n_tokens, 1)).float(),
            max_act=self.max_act.clone(),
            histogram=self.hist.clone(),
            histogram_max=self.hist_max.float(),
        )


def _power_of_two_above(x: Tensor) -> Tensor:
    """The smallest power of two >= x (x > 0), exactly."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.ones_like(x), exponent - (mantissa == 0.5).long())


def uniforms(seed: int, level: int, *parts: Tensor) -> Tensor:
    """Uniforms on (0, 1), float64: a splitmix64 hash of (seed, level, parts[k][i])."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # uint64 products wrap, on purpose
        h = np.full(parts[0].shape, seed, dtype=np.uint64)
        for part in (np.full(parts[0].shape, level), *(p.numpy() for p in parts)):
            h = _splitmix(h ^ _splitmix(part.astype(np.uint64) + _GOLDEN))
    return torch.from_numpy(((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53)


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _windows(acts: Tensor, batch: Batch, tok: Tensor, col: Tensor, window: int):
    """Token ids and activations [C, window] around each (token, feature) candidate."""
    text = batch.text[tok]
    start, length = batch.start[text], batch.length[text]
    local = tok - start
    first = torch.minimum(local - window // 2, length - window).clamp(min=0)
    offset = first.unsqueeze(1) + torch.arange(window)
    valid = offset < length.unsqueeze(1)
    flat = (start.unsqueeze(1) + offset).clamp(max=acts.shape[0] - 1)
    ids = torch.where(valid, batch.token_ids[flat], -1).to(torch.int32)
    values = torch.where(valid, acts[flat, col.unsqueeze(1)], 0.0)
    return ids, values


# ---------------------------------------------------------------------------------------
# token strings


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token as decoded after a plain word, so that joining them reads as the text."""
    lead = tokenizer("a", add_special_tokens=False)["input_ids"][-1:]
    head = tokenizer.decode(lead) if lead else ""
    out = []
    for i in ids:
        both = tokenizer.decode([*lead, i]) if lead else ""
        out.append(both[len(head) :] if lead and both.startswith(head) else tokenizer.decode([i]))
    return out


# ---------------------------------------------------------------------------------------
# the pass


def _level_acts(model: HSAE, x: Tensor, level: int, cols: slice) -> Tensor:
    """``model.encode(x)[level][:, cols]`` without the other columns (JumpReLU, no grad)."""
    pre = (x - model.b_dec[level]) @ model.W_enc[level][:, cols] + model.b_enc[level][cols]
    return pre * (pre > model.threshold[level][cols])


def _batch(lm: LoadedLM, texts: list[str], numbers: list[int], layer: int, context_len: int):
    """The kept tokens' (hidden states [T, d], Batch) of some non-empty texts."""
    input_ids, mask, keep = tokenize(lm, texts, context_len)
    device = next(lm.model.parameters()).device
    hidden = layer_activations(lm, input_ids.to(device), mask.to(device), layer)
    lengths = keep.sum(1)
    starts = torch.cumsum(lengths, 0) - lengths
    batch = Batch(
        token_ids=input_ids[keep],
        text=torch.repeat_interleave(torch.arange(len(texts)), lengths),
        start=starts,
        length=lengths,
        text_number=torch.tensor(numbers, dtype=torch.int64),
    )
    return hidden[keep.to(device)], batch


@torch.no_grad()
def collect_contexts(
    model: HSAE,
    lm: LoadedLM,
    texts: Iterable[str],
    layer: int,
    *,
    top_k: int = 10,
    n_sampled: int = 5,
    window: int = 32,
    bins: int = 32,
    context_len: int = 256,
    batch_size: int = 8,
    max_texts: int | None = None,
    seed: int = 0,
    chunk_elements: int = 2**21,
    progress: bool = True,
    meta: dict | None = None,
) -> ContextStore:
    """Stream ``texts`` through the LM and the HSAE once; the store of every feature's
    contexts (see module doc). ``meta`` is added to the store's meta."""
    check_settings(
        top_k=top_k,
        n_sampled=n_sampled,
        window=window,
        bins=bins,
        context_len=context_len,
        batch_size=batch_size,
        seed=seed,
    )
    check_layer(lm, layer)
    if lm.d_model != model.d_in:
        raise ValueError(
            f"the language model's width is {lm.d_model} but the HSAE reads d_in = "
            f"{model.d_in}: wrong model or layer"
        )
    levels = [
        LevelCollector(n, top_k, n_sampled, window, bins, seed, level)
        for level, n in enumerate(model.sizes)
    ]
    source = enumerate(itertools.islice(texts, max_texts))
    n_texts = n_tokens = 0
    began = time.perf_counter()
    bar = tqdm(unit="tok", unit_scale=True, disable=not progress, desc="contexts")
    try:
        while pool := list(itertools.islice(source, batch_size * POOL_BATCHES)):
            n_texts += len(pool)
            for chunk in _by_length(pool, batch_size):
                hidden, batch = _batch(
                    lm, [t for _, t in chunk], [i for i, _ in chunk], layer, context_len
                )
                x = model.scaled(hidden)
                _score(model, x, batch, levels, chunk_elements)
                n_tokens += x.shape[0]
                bar.update(x.shape[0])
    finally:
        bar.close()
    if n_tokens == 0:
        raise ValueError(f"no tokens: the {n_texts} texts read hold no text")
    seconds = time.perf_counter() - began
    return _store(
        lm,
        levels,
        n_tokens,
        meta or {},
        dict(
            layer=layer,
            n_texts=n_texts,
            n_tokens=n_tokens,
            window=window,
            anchor=window // 2,
            top_k=top_k,
            n_sampled=n_sampled,
            bins=bins,
            context_len=context_len,
            seed=seed,
            seconds=round(seconds, 1),
        ),
    )


def _by_length(pool: list[tuple[int, str]], batch_size: int) -> list[list[tuple[int, str]]]:
    """The non-empty texts of a pool in batches of similar length (less padding to
    compute; each text keeps its number, so the store is the same)."""
    live = sorted((it for it in pool if isinstance(it[1], str) and it[1].strip()),
                  key=lambda it: len(it[1]))  # fmt: skip
    return [live[k : k + batch_size] for k in range(0, len(live), batch_size)]


def _score(model: HSAE, x: Tensor, batch: Batch, levels, chunk_elements: int) -> None:
    """Every level's activations on ``x``, a slice of features at a time, into ``levels``."""
    cols = max(1, chunk_elements // max(1, x.shape[0]))
    for level, collector in enumerate(levels):
        for first in range(0, model.sizes[level], cols):
            acts = _level_acts(model, x, level, slice(first, first + cols)).cpu()
            collector.update(acts, first, batch)


def _store(lm: LoadedLM, levels, n_tokens: int, meta: dict, facts: dict) -> ContextStore:
    """Map the kept LM token ids to the store's vocabulary of token strings."""
    held = [c.ids for lv in levels for c in (lv.top, lv.sample)]
    lm_ids = torch.unique(torch.cat([t.flatten() for t in held]))
    lm_ids = lm_ids[lm_ids >= 0]
    lookup = torch.full((int(lm_ids.max()) + 1 if lm_ids.numel() else 1,), -1)
    position: dict[str, int] = {}  # tokens that read the same share an entry
    for lm_id, text in zip(lm_ids.tolist(), token_strings(lm.tokenizer, lm_ids.tolist())):
        lookup[lm_id] = position.setdefault(text, len(position))
    stored = [lv.finish(n_tokens, lookup) for lv in levels]
    sizes = [lv.n_features for lv in stored]
    return ContextStore({**meta, **facts, "sizes": sizes}, list(position), stored)


def check_settings(**settings: int) -> None:
    """Counts must be integers >= 1 (n_sampled, seed >= 0, context_len >= 2, bins even)."""
    low = {"n_sampled": 0, "context_len": 2, "bins": 2, "seed": 0}
    for name, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low.get(name, 1):
            raise ValueError(f"{name} must be an integer >= {low.get(name, 1)}, got {value!r}")
    if settings.get("bins", 2) % 2:
        raise ValueError(
            f"bins must be even (the histogram merges bins pairwise), got {settings['bins']}"
        )


# ---------------------------------------------------------------------------------------
# the command


@dataclass
class Plan:
    """What `hsae contexts` reads: flags, else what the model's training cache used."""

    lm: str
    layer: int
    text: str
    context_len: int
    skip: int = 0
    """Texts at the start of ``text`` that the training cache used (not shown)."""


def plan(
    data: dict, lm: str | None, layer: int | None, text: str | None, context_len: int | None
) -> Plan:
    """Fill the unset flags from the `hsae cache` the model was trained on (if any); texts
    of the cache's own source start after the last one it used."""
    from hsae.data.cache import CachedActivations

    missing = [f for f, v in (("--model", lm), ("--layer", layer), ("--text", text)) if v is None]
    cache = None
    if data.get("kind") == "cache":
        try:
            cache = CachedActivations(data["path"])
        except ValueError:
            if missing:
                raise
    if cache is None:
        if missing:
            raise ValueError(
                f"the model was not trained on an `hsae cache` directory; pass {', '.join(missing)}"
            )
        return Plan(lm, layer, text, context_len or 256)
    meta = cache.meta
    text = meta["text"] if text is None else text
    skip = cache.manifest["texts_done"] if text == meta["text"] else 0
    return Plan(
        lm=meta["model"] if lm is None else lm,
        layer=meta["layer"] if layer is None else layer,
        text=text,
        context_len=context_len or meta.get("context_len", 256),
        skip=skip,
    )


SETTINGS = ("top_k", "n_sampled", "window", "bins", "batch_size", "max_texts", "seed")


def run(args: ContextsOptions) -> None:
    from pathlib import Path

    from hsae import pipeline
    from hsae.data.extract import load_lm, skip_texts
    from hsae.data.text import text_source

    settings = {name: getattr(args, name) for name in SETTINGS}
    trained = TrainedHSAE.load(args.model_dir)
    model = trained.model
    out = Path(args.out)
    p = plan(trained.data, args.model, args.layer, args.text, args.context_len)
    texts = skip_texts(text_source(p.text), p.skip)
    first = next(texts, None)  # fail before loading the language model
    if first is None:
        after = f" after the {p.skip} texts the training cache used" if p.skip else ""
        raise ValueError(f"no texts in {p.text!r}{after}")
    lm = load_lm(pipeline.resolve_model(p.lm), dtype=args.dtype)
    meta = {
        "model": str(trained.directory.resolve()),
        "model_sha256": trained.fingerprint(),
        "lm": p.lm,
        "text": p.text,
        "skipped_texts": p.skip,
    }
    store = collect_contexts(
        model,
        lm,
        itertools.chain([first], texts),
        p.layer,
        context_len=p.context_len,
        progress=not args.quiet,
        meta=meta,
        **settings,
    )
    store.save(out)
    _report(store, out)


def _report(store: ContextStore, out) -> None:
    m = store.meta
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("contexts."))
    skipped = f", after the cache's {m['skipped_texts']}" if m.get("skipped_texts") else ""
    print(
        f"contexts of {sum(store.sizes)} features (levels {', '.join(map(str, store.sizes))}) "
        f"from {m['n_tokens']:,} tokens of {m['n_texts']:,} texts ({m['text']}{skipped}) in "
        f"{m['seconds']:.0f} s ({m['n_tokens'] / max(m['seconds'], 1e-9):,.0f} tok/s); "
        f"written to {out} ({size / 1e6:.1f} MB)"
    )


@dataclass(kw_only=True)
class ContextsOptions:
    model_dir: str = model_dir_option()
    out: str = option(help="directory for the context store", output="dir")
    text: str | None = option(
        None,
        "builtin, a .txt/.jsonl file or directory, or hf:NAME "
        "(default: the training cache's source, after the texts it used)",
    )
    model: str | None = option(None, "language model (default: the training cache's)")
    layer: int | None = option(None, "hidden state index (default: the cache's)", low=0)
    context_len: int | None = option(None, "tokens per text (default: the cache's, or 256)",
                                     low=1)  # fmt: skip
    max_texts: int = option(2000, "texts to read")
    top_k: int = option(10, "top contexts per feature")
    n_sampled: int = option(5, "sampled contexts per feature")
    window: int = option(32, "tokens per context")
    bins: int = option(32, "histogram bins, even")
    batch_size: int = option(8, "texts per forward pass")
    seed: int = option(0, "seed of the sampled contexts")
    dtype: str = option("float32", "language model dtype")
    quiet: bool = option(False, "no progress bar")

    def validate(self) -> None:
        check_settings(**{name: getattr(self, name) for name in SETTINGS})


COMMANDS = [Command("contexts", "top-activating and sampled contexts of every feature",
                    ContextsOptions, run)]  # fmt: skip
