"""Splice evaluation: the language model's loss with one layer replaced by an HSAE level.

For each level l, the hidden state at index ``layer`` (the numbering of
``output_hidden_states``: 0 = embedding output, k = output of block k) is replaced by the
level's reconstruction in raw space,

    x_hat = SAE_l(s x) / s,

and the model's loss is compared with the clean run and with the hidden state set to zero
(zero ablation). "Loss recovered", as SAE Lens and SAEBench report it, is

    (L_zero - L_spliced) / (L_zero - L_clean)

so 1 means the reconstruction costs nothing and 0 means it is as bad as deleting the layer.

Which loss (``kind``):

* ``"causal"``: next-token cross-entropy (nats) over every target whose token is not padding.
* ``"masked"``: masked-LM cross-entropy. A seeded ``mask_prob`` of the non-special,
  non-padding tokens is replaced by the mask token (always the mask token, no 80/10/10
  split); the same masked inputs are used for the clean, zero and spliced runs.
* ``"encoder"``: a model without an LM head (e.g. sentence-transformers' MiniLM, a bare
  ``BertModel``). There are no output logits, so no KL divergence: the loss is the mean
  squared error of the final hidden states (``last_hidden_state``, averaged over non-padding
  tokens and dimensions) against the clean run. The clean loss is 0 by definition, so loss
  recovered is 1 - MSE_spliced / MSE_zero.

Tokens and positions follow ``hsae.data.extract`` (what the HSAE was trained on): texts are
tokenised with the tokenizer's special tokens, truncated to ``context_len`` and
right-padded; a causal model whose tokenizer has a BOS but does not add it (GPT-2) gets one
prepended (``prepend_bos=None``: causal models only), as SAE Lens does. The replacement (and
the zero ablation) applies to every non-padding position that is not a special token the
tokenizer added: BOS / CLS (and BERT's SEP) keep their clean activations, because the HSAE
never trained on them and their norms are far outside its training distribution. In
masked mode the [MASK]ed positions are spliced (they were ordinary tokens).

Where the hook goes: layer 0 is the input of the first block (a forward pre-hook; GPT-2 has
no single embeddings module); layer k >= 1 is the output of block k-1. For k < n_blocks
this is ``output_hidden_states[k]``, which is checked on the first batch so that a model
whose numbering differs fails loudly instead of splicing the wrong place. For the last
index it is the raw output of the last block: models with a final norm (GPT-2's ``ln_f``,
Llama's ``norm``) report the normed state as ``hidden_states[-1]``, but the residual stream
before that norm is what ``hsae.data.extract`` reads and what is replaced here.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hsae.data.extract import find_blocks
from hsae.method.model import HSAE

KINDS = {"causal": "next-token CE", "masked": "masked-LM CE", "encoder": "final-hidden MSE"}

# ---------------------------------------------------------------- hooking one hidden state


@dataclass
class HookSite:
    """Where hidden state ``layer`` can be read and replaced: the input ("pre") or the
    output ("post") of ``module``."""

    layer: int
    module: nn.Module
    mode: str
    name: str

    @contextlib.contextmanager
    def replace(self, fn: Callable[[Tensor], Tensor | None]) -> Iterator[None]:
        """While active, hidden state ``layer`` [batch, seq, d] is replaced by ``fn(h)``
        (``fn`` returning None leaves it unchanged, e.g. to only read it)."""
        if self.mode == "pre":

            def pre_hook(module, args, kwargs):
                if args:
                    new = fn(args[0])
                    return None if new is None else ((new, *args[1:]), kwargs)
                new = fn(kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            handle = self.module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)
        else:

            def post_hook(module, args, output):
                if isinstance(output, tuple):
                    new = fn(output[0])
                    return None if new is None else (new, *output[1:])
                if isinstance(output, Tensor):
                    return fn(output)
                raise TypeError(f"cannot splice {self.name}: it returns {type(output).__name__}")

            handle = self.module.register_forward_hook(post_hook, prepend=True)
        try:
            yield
        finally:
            handle.remove()


def hidden_state_site(model: nn.Module, layer: int) -> HookSite:
    """Where hidden state ``layer`` is read and replaced; raises a one-line ValueError when
    the index is out of range."""
    blocks = find_blocks(model)
    n = len(blocks)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
        raise ValueError(
            f"layer {layer!r} is out of range: {type(model).__name__} has hidden states "
            f"0..{n} (0 = embedding output, k = output of block k)"
        )
    if layer == 0:
        return HookSite(0, blocks[0], "pre", "input of block 0")
    return HookSite(layer, blocks[layer - 1], "post", f"output of block {layer - 1}")


@torch.no_grad()
def locate_hidden_state(model: nn.Module, layer: int, inputs: dict[str, Tensor]) -> HookSite:
    """:func:`hidden_state_site`, checked on ``inputs`` against ``output_hidden_states[layer]``
    (except for the last index, which may come after a final norm; see the module doc)."""
    site = hidden_state_site(model, layer)
    if layer == len(find_blocks(model)):
        return site
    seen: list[Tensor] = []
    with site.replace(lambda h: seen.append(h.detach().clone())):
        out = model(**inputs, output_hidden_states=True)
    hidden = getattr(out, "hidden_states", None)
    if hidden is None or len(hidden) <= layer:
        raise ValueError(f"{type(model).__name__} does not return hidden state {layer}")
    want = hidden[layer]
    if not seen or seen[0].shape != want.shape or not torch.allclose(seen[0], want, atol=1e-6):
        raise ValueError(f"hidden state {layer} of {type(model).__name__} is not the {site.name}")
    return site


# ---------------------------------------------------------------- the evaluation


def _batches(texts: Iterable[str], size: int, limit: int | None) -> Iterator[list[str]]:
    it = iter(texts) if limit is None else itertools.islice(texts, limit)
    while batch := list(itertools.islice(it, size)):
        yield batch


def wants_bos(tokenizer, kind: str, prepend_bos: bool | None = None) -> bool:
    """Whether to prepend BOS: the tokenizer has one, does not add it itself, and
    ``prepend_bos`` is True, or None and the model is causal (as ``hsae.data.extract``)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or prepend_bos is False or (prepend_bos is None and kind != "causal"):
        return False
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] != [bos]


def _tokenize(
    tokenizer, texts: list[str], context_len: int, device, add_bos: bool = False
) -> dict[str, Tensor] | None:
    """Right-padded inputs plus ``special_tokens_mask``; texts without a non-special token
    are dropped (``None`` when none is left)."""
    enc = dict(
        tokenizer(
            texts,
            add_special_tokens=True,
            truncation=True,
            max_length=context_len - int(add_bos),
            return_special_tokens_mask=True,
            return_attention_mask=True,
        )
    )
    if add_bos:
        first = {"input_ids": tokenizer.bos_token_id, "special_tokens_mask": 1}
        first |= {"attention_mask": 1, "token_type_ids": 0}
        for key, value in first.items():
            if key in enc:
                enc[key] = [[value, *row] for row in enc[key]]
    rows = [i for i, spec in enumerate(enc["special_tokens_mask"]) if 0 in spec]
    if not rows:
        return None
    length = max(len(enc["input_ids"][i]) for i in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fills = {
        "input_ids": pad_id,
        "attention_mask": 0,
        "special_tokens_mask": 1,
        "token_type_ids": 0,
    }
    out = {}
    for key, fill in fills.items():
        if key not in enc:
            continue
        out[key] = torch.tensor(
            [list(enc[key][i]) + [fill] * (length - len(enc[key][i])) for i in rows],
            dtype=torch.long,
            device=device,
        )
    return out


def _outputs(out, kind: str) -> Tensor:
    if kind == "encoder":
        h = getattr(out, "last_hidden_state", None)
        if h is None:
            raise ValueError("kind 'encoder' needs a model whose output has last_hidden_state")
        return h
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ValueError(f"kind {kind!r} needs a model with an LM head (output.logits)")
    return logits


def splice_eval(
    lm_model: nn.Module,
    tokenizer,
    kind: str,
    layer: int,
    hsae: HSAE,
    texts: Iterable[str],
    context_len: int = 128,
    batch_size: int = 8,
    max_texts: int | None = None,
    mask_prob: float = 0.15,
    seed: int = 0,
    prepend_bos: bool | None = None,
    progress: bool = True,
) -> dict:
    """Clean, zero-ablated and per-level spliced loss of ``lm_model`` at hidden state
    ``layer`` over ``texts``; see the module docstring for the losses and positions.

    ``prepend_bos``: prepend the tokenizer's BOS when it does not add one itself: always
    (True), never (False), or for causal models only (None, the default).

    Returns ``{"kind", "metric", "layer", "clean", "zero", "levels": [{"level", "spliced",
    "loss_recovered"}], "n_tokens", "n_texts"}``; ``n_tokens`` counts the scored tokens,
    ``n_texts`` the texts with at least one non-special token."""
    _check_request(lm_model, tokenizer, kind, layer, hsae, mask_prob)
    device = next(lm_model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    sums = [0.0] * (2 + hsae.n_levels)  # clean, zero, one per level
    n_tokens = n_texts = 0
    site: HookSite | None = None
    add_bos = wants_bos(tokenizer, kind, prepend_bos)
    total = max_texts
    if total is None and hasattr(texts, "__len__"):
        total = len(texts)
    bar = tqdm(total=total, unit="text", desc=f"splice layer {layer}", disable=not progress)
    with _eval_mode(lm_model, hsae), bar, torch.no_grad():
        for batch in _batches(texts, batch_size, max_texts):
            bar.update(len(batch))
            enc = _tokenize(tokenizer, batch, context_len, device, add_bos)
            if enc is None:
                continue
            prepared = _prepare(enc, kind, tokenizer, mask_prob, gen)
            if site is None:
                site = locate_hidden_state(lm_model, layer, prepared.inputs)
            losses = _batch_loss_sums(lm_model, kind, prepared, site, hsae)
            sums = [total + loss for total, loss in zip(sums, losses)]
            n_tokens += int(prepared.scored.sum())
            n_texts += int(prepared.scored.shape[0])
    if n_tokens == 0:
        raise ValueError("no tokens to score: the texts are empty or too short")
    return _summary(kind, layer, [s / n_tokens for s in sums], n_tokens, n_texts)


def _check_request(lm_model, tokenizer, kind: str, layer: int, hsae: HSAE, mask_prob: float):
    """Fail on a bad request before any text is read."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "masked" and getattr(tokenizer, "mask_token_id", None) is None:
        raise ValueError("kind 'masked' needs a tokenizer with a mask token")
    if not 0.0 < mask_prob <= 1.0 and kind == "masked":
        raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
    hidden_state_site(lm_model, layer)
    hidden_size = getattr(getattr(lm_model, "config", None), "hidden_size", None)
    if hidden_size is not None and hidden_size != hsae.d_in:
        raise ValueError(
            f"the HSAE reads d={hsae.d_in} but the model's hidden size is {hidden_size}"
        )


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Modules in eval mode for the block, restored to their own mode afterwards."""
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)


def _batch_loss_sums(
    lm_model: nn.Module, kind: str, prepared: _Batch, site: HookSite, hsae: HSAE
) -> list[float]:
    """The batch's summed loss: clean, zero-ablated, then with each level spliced in."""
    clean = _forward(lm_model, kind, prepared, site, None)
    if kind == "encoder":  # the clean final hidden states are the reference
        prepared.reference = clean
    sums = [_loss_sum(kind, clean, prepared)]
    sums.append(_loss_sum(kind, _forward(lm_model, kind, prepared, site, _zero), prepared))
    for level in range(hsae.n_levels):
        splice = functools.partial(_splice_rows, hsae, level)
        sums.append(_loss_sum(kind, _forward(lm_model, kind, prepared, site, splice), prepared))
    return sums


def _summary(kind: str, layer: int, losses: list[float], n_tokens: int, n_texts: int) -> dict:
    clean_loss, zero_loss, *spliced = losses
    if kind == "encoder":
        clean_loss = 0.0
    levels = [
        {"level": level, "spliced": float(loss),
         "loss_recovered": _recovered(clean_loss, zero_loss, loss)}
        for level, loss in enumerate(spliced)
    ]  # fmt: skip
    return {
        "kind": kind,
        "metric": KINDS[kind],
        "layer": layer,
        "clean": float(clean_loss),
        "zero": float(zero_loss),
        "levels": levels,
        "n_tokens": n_tokens,
        "n_texts": n_texts,
    }


@dataclass
class _Batch:
    """One batch's model inputs and the positions spliced and scored (same for every run)."""

    inputs: dict[str, Tensor]
    splice_at: Tensor
    """[B, T] bool: non-padding positions that are not special tokens."""
    scored: Tensor
    """[B, T] (causal: [B, T-1], targets) bool: positions whose loss counts."""
    targets: Tensor | None = None
    reference: Tensor | None = None
    """encoder: the clean last_hidden_state."""


def _prepare(enc, kind, tokenizer, mask_prob, gen) -> _Batch:
    special = enc.pop("special_tokens_mask").bool()
    live = enc["attention_mask"].bool()
    splice_at = live & ~special
    if kind == "encoder":
        return _Batch(enc, splice_at, live)
    if kind == "causal":
        scored = live[:, 1:]
        return _Batch(enc, splice_at, scored, enc["input_ids"][:, 1:][scored])
    draw = torch.rand(live.shape, generator=gen).to(live.device)
    masked = live & ~special & (draw < mask_prob)
    targets = enc["input_ids"][masked]
    enc["input_ids"] = enc["input_ids"].masked_fill(masked, tokenizer.mask_token_id)
    return _Batch(enc, splice_at, masked, targets)


def _forward(model, kind: str, batch: _Batch, site: HookSite, fn) -> Tensor:
    """The model's logits (or last hidden state) with ``fn`` applied to the spliced rows."""
    if fn is None:
        return _outputs(model(**batch.inputs), kind)

    def replace(h: Tensor) -> Tensor:
        h = h.clone()
        h[batch.splice_at] = fn(h[batch.splice_at])
        return h

    with site.replace(replace):
        return _outputs(model(**batch.inputs), kind)


def _zero(x: Tensor) -> Tensor:
    return torch.zeros_like(x)


def _splice_rows(hsae: HSAE, level: int, x: Tensor) -> Tensor:
    if x.shape[-1] != hsae.d_in:
        raise ValueError(f"the hidden state has d={x.shape[-1]}, the HSAE reads {hsae.d_in}")
    x_hat = hsae.reconstruct_raw(x, level)
    return x_hat.to(x.device, x.dtype)


def _loss_sum(kind: str, out: Tensor, batch: _Batch) -> float:
    """Summed loss over the scored positions (encoder: squared error / d)."""
    if kind == "encoder":
        ref = batch.reference[batch.scored].double()
        return (out[batch.scored].double() - ref).pow(2).sum().item() / out.shape[-1]
    logits = out[:, :-1] if kind == "causal" else out
    logits = logits[batch.scored].float()
    return nn.functional.cross_entropy(logits, batch.targets, reduction="sum").item()


def _recovered(clean: float, zero: float, spliced: float) -> float:
    gap = zero - clean
    return (zero - spliced) / gap if gap != 0 else math.nan
