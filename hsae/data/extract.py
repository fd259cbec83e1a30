"""Residual-stream activations of a Hugging Face ``transformers`` model, batch by batch.

Layer index
-----------
``layer`` counts hidden states as ``output_hidden_states=True`` does:

* ``0`` is the embeddings output, i.e. the input of the first block;
* ``k`` (1-based) is the output of block ``k``; ``n_layers`` is the output of the last block.

It is read with a forward hook on block ``k`` (a forward *pre*-hook on block 1 for
``layer=0``), and the forward pass stops right there, so the later blocks and the LM head
are never computed. For ``layer < n_layers`` this equals ``hidden_states[layer]``. For
``layer = n_layers`` it is the raw output of the last block: models with a final norm
(GPT-2's ``ln_f``, Llama's ``norm``) report the *normed* state as ``hidden_states[-1]``;
we return the residual stream before that norm. (Encoders such as BERT have no final norm,
so the two agree.) Blocks are found as the model's first ``nn.ModuleList`` of
``n_layers`` identical modules (``transformer.h`` in GPT-2, ``encoder.layer`` in BERT).

Tokens
------
Each text is tokenised with the tokenizer's special tokens, truncated to
``min(context_len, lm.max_len)`` tokens in all, and the batch is right-padded to its longest
text. Kept are the positions that are real (``attention_mask == 1``) and not a special
token the tokenizer added: BERT's ``[CLS]`` *and* ``[SEP]`` (neither is text; both carry
outlier activations), a Llama-style ``<s>``. For a causal model whose tokenizer adds no BOS
(GPT-2), a BOS is prepended by default (``prepend_bos=None`` means "causal models only"):
the first position of a causal model is an attention sink whatever its token, so giving
it a BOS and dropping it keeps that outlier out of the data (design §4). Empty or
whitespace-only texts are dropped (but still counted in ``n_texts``).

Activations come back as float32 on the CPU whatever the model's dtype (fp16/bf16 models
run in their dtype; the cast happens after the layer is read).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hsae.io import FormatError, one_line

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
CAUSAL_MODEL_TYPES = frozenset(
    {
        "gpt2", "gpt_neo", "gpt_neox", "gptj", "gpt_bigcode", "llama", "mistral", "mixtral",
        "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "opt", "bloom",
        "falcon", "mpt", "olmo", "olmo2", "stablelm", "starcoder2", "codegen", "smollm3",
    }
)  # fmt: skip
DEFAULT_CONTEXT_LEN = 1024
_NO_LIMIT = 1_000_000  # tokenizers report "no limit" as a huge model_max_length


@dataclass
class LoadedLM:
    """A model ready for extraction; ``kind`` is "causal", "masked" or "encoder"."""

    model: nn.Module
    tokenizer: object
    kind: str
    d_model: int
    n_layers: int
    max_len: int


@dataclass
class ExtractedBatch:
    """Activations ``acts [n_tokens, d]`` (float32, CPU) of the texts consumed for them.

    ``n_texts`` counts every text taken from the input for this batch, empty ones included,
    so that a resumed run can skip exactly ``sum(n_texts)`` texts (:func:`skip_texts`).
    """

    acts: Tensor
    n_texts: int
    n_tokens: int


class _Stop(Exception):
    """Raised by the hook to end the forward pass once the layer is read."""


# ---------------------------------------------------------------------------------------
# loading


def load_lm(
    name_or_path: str | os.PathLike, dtype: str = "float32", device: str = "cpu"
) -> LoadedLM:
    """Load a causal LM, a masked LM or a bare encoder and its tokenizer, in eval mode.

    The class follows the config: a decoder (``is_decoder``, an architecture ending in
    ``ForCausalLM``/``LMHeadModel``, or a known causal ``model_type``) loads with
    ``AutoModelForCausalLM``; an architecture ending in ``ForMaskedLM`` with
    ``AutoModelForMaskedLM``; anything else with ``AutoModel``. An existing local path is
    loaded with ``local_files_only=True``. Failures raise a one-line :class:`FormatError`.
    """
    import transformers

    # Our own bar counts tokens; a second one for loading weights only clutters stderr.
    transformers.utils.logging.disable_progress_bar()
    if dtype not in DTYPES:
        raise FormatError(f"unknown dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    source = str(name_or_path)
    local = Path(source).exists()
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=local)
        kind = _model_kind(config)
        auto = {
            "causal": transformers.AutoModelForCausalLM,
            "masked": transformers.AutoModelForMaskedLM,
            "encoder": transformers.AutoModel,
        }[kind]
        model = auto.from_pretrained(source, dtype=DTYPES[dtype], local_files_only=local)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=local)
        model = model.to(device).eval().requires_grad_(False)
    except Exception as exc:
        raise FormatError(f"cannot load model {source}: {one_line(exc)}") from None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return LoadedLM(
        model=model,
        tokenizer=tokenizer,
        kind=kind,
        d_model=int(text_config.hidden_size),
        n_layers=int(text_config.num_hidden_layers),
        max_len=_max_len(text_config, tokenizer),
    )


def _model_kind(config) -> str:
    architectures = getattr(config, "architectures", None) or []
    causal_arch = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if getattr(config, "is_decoder", False) or causal_arch:
        return "causal"
    if any(a.endswith("ForMaskedLM") for a in architectures):
        return "masked"
    if not architectures and config.model_type in CAUSAL_MODEL_TYPES:
        return "causal"
    return "encoder"


def _max_len(config, tokenizer) -> int:
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    limits = [int(x) for x in limits if isinstance(x, (int, float)) and 0 < x < _NO_LIMIT]
    return min(limits) if limits else _NO_LIMIT


# ---------------------------------------------------------------------------------------
# the layer


BLOCK_PATHS = (
    "transformer.h",
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.decoder.layers",
    "gpt_neox.layers",
    "transformer.layers",
    "transformer.blocks",
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "xlm_roberta.encoder.layer",
    "electra.encoder.layer",
    "deberta.encoder.layer",
    "distilbert.transformer.layer",
    "model.encoder.layer",
    "encoder.layer",
    "transformer.layer",
    "layers",
    "h",
)
"""Attribute paths of the block list in common Hugging Face models, tried in this order."""


def _get_path(obj: object, path: str) -> object | None:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks, found at a common attribute path, or the only
    ModuleList whose length is ``config.num_hidden_layers``."""
    for path in BLOCK_PATHS:
        blocks = _get_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if n:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
        if len(lists) == 1:
            return lists[0]
    raise FormatError(
        f"cannot find the transformer blocks of {type(model).__name__} "
        f"(tried {', '.join(BLOCK_PATHS[:4])}, ...)"
    )


def check_layer(lm: LoadedLM, layer: int) -> None:
    """Raise :class:`FormatError` unless ``0 <= layer <= lm.n_layers``."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= lm.n_layers:
        raise FormatError(
            f"layer {layer!r} out of range: expected 0 (embeddings) .. {lm.n_layers} (last block)"
        )


def layer_activations(
    lm: LoadedLM, input_ids: Tensor, attention_mask: Tensor, layer: int
) -> Tensor:
    """Hidden state ``layer`` (see module doc) for a padded batch: ``[batch, seq, d]``."""
    check_layer(lm, layer)
    blocks = find_blocks(lm.model)
    captured: list[Tensor] = []

    def grab(hidden: object) -> None:
        captured.append(hidden[0] if isinstance(hidden, (tuple, list)) else hidden)
        raise _Stop

    if layer == 0:
        handle = blocks[0].register_forward_pre_hook(
            lambda _m, args, kwargs: grab(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
    else:
        handle = blocks[layer - 1].register_forward_hook(lambda _m, _a, out: grab(out))
    try:
        with torch.no_grad():
            lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise FormatError(f"layer {layer} was never reached in the forward pass")
    return captured[0]


# ---------------------------------------------------------------------------------------
# tokens


def _wants_bos(lm: LoadedLM, prepend_bos: bool | None) -> bool:
    """Whether to prepend BOS: the tokenizer has one, does not add it, and (auto) causal."""
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    if bos is None or prepend_bos is False or (prepend_bos is None and lm.kind != "causal"):
        return False
    return lm.tokenizer("a", add_special_tokens=True)["input_ids"][:1] != [bos]


def tokenize(
    lm: LoadedLM, texts: list[str], context_len: int, prepend_bos: bool | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, keep)``, right-padded ``[batch, seq]`` tensors.

    ``keep`` marks the positions whose activations are returned: real, non-special tokens.
    """
    max_len = min(int(context_len), lm.max_len)
    add_bos = _wants_bos(lm, prepend_bos)
    enc = lm.tokenizer(
        texts,
        add_special_tokens=True,
        truncation=True,
        max_length=max_len - int(add_bos),
        return_special_tokens_mask=True,
    )
    ids, special = enc["input_ids"], enc["special_tokens_mask"]
    if add_bos:
        ids = [[lm.tokenizer.bos_token_id, *row] for row in ids]
        special = [[1, *row] for row in special]
    width = max(len(row) for row in ids)
    pad_id = lm.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    keep = torch.zeros((len(ids), width), dtype=torch.bool)
    for i, (row, spec) in enumerate(zip(ids, special)):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        keep[i, : len(row)] = torch.tensor(spec) == 0
    return input_ids, mask, keep


# ---------------------------------------------------------------------------------------
# extraction


def extract(
    lm: LoadedLM,
    texts: Iterable[str],
    layer: int,
    context_len: int = DEFAULT_CONTEXT_LEN,
    batch_size: int = 8,
    progress: bool = True,
    prepend_bos: bool | None = None,
) -> Iterator[ExtractedBatch]:
    """Yield the layer's activations of ``batch_size`` texts at a time (see module doc).

    A tqdm bar counts kept tokens (``tok/s``). Every text read from ``texts`` is counted
    in exactly one batch's ``n_texts``, so resuming after ``sum(n_texts)`` is exact.
    """
    check_layer(lm, layer)
    if context_len < 2 or batch_size < 1:
        raise FormatError(
            f"need context_len >= 2 and batch_size >= 1, got {context_len}, {batch_size}"
        )
    device = next(lm.model.parameters()).device
    source = iter(texts)
    bar = tqdm(unit="tok", unit_scale=True, disable=not progress, desc=f"layer {layer}")
    try:
        while chunk := list(itertools.islice(source, batch_size)):
            batch = _extract_chunk(lm, chunk, layer, context_len, prepend_bos, device)
            bar.update(batch.n_tokens)
            yield batch
    finally:
        bar.close()


def _extract_chunk(
    lm: LoadedLM,
    chunk: list[str],
    layer: int,
    context_len: int,
    prepend_bos: bool | None,
    device: torch.device,
) -> ExtractedBatch:
    texts = [t for t in chunk if isinstance(t, str) and t.strip()]
    if not texts:
        return ExtractedBatch(torch.zeros(0, lm.d_model), len(chunk), 0)
    input_ids, mask, keep = tokenize(lm, texts, context_len, prepend_bos)
    hidden = layer_activations(lm, input_ids.to(device), mask.to(device), layer)
    acts = hidden[keep.to(device)].to(device="cpu", dtype=torch.float32)
    return ExtractedBatch(acts, len(chunk), int(acts.shape[0]))


def skip_texts(texts: Iterable[str], n: int) -> Iterator[str]:
    """``texts`` without its first ``n`` items (resume after ``n`` texts were extracted)."""
    return itertools.islice(iter(texts), n, None)
