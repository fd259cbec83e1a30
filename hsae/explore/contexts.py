"""Top-activating and sampled contexts of every feature (paper appendix C).

A context store is a directory:

    contexts.json          meta (model, layer, text source, tokens seen, window, top_k,
                           n_sampled, level sizes) and the vocabulary: the token strings
                           that occur in any stored context
    contexts.safetensors   per level l:
        level_{l}.top_ids      int32   [n, top_k, window]     vocabulary index, -1 = empty
        level_{l}.top_acts     float16 [n, top_k, window]     this feature's activation
        level_{l}.sample_ids   int32   [n, n_sampled, window]
        level_{l}.sample_acts  float16 [n, n_sampled, window]
        level_{l}.frequency    float32 [n]                    share of tokens it fires on
        level_{l}.max_act      float32 [n]
        level_{l}.histogram    int64   [n, bins]              activations > 0 per bin
        level_{l}.histogram_max float32 [n]                   top edge h of the histogram

Histogram bin ``i`` counts the activations in ``(i h / bins, (i + 1) h / bins]`` with
``h = histogram_max`` (:meth:`LevelContexts.histogram_edges`), a bound fixed while
streaming: `hsae contexts` uses the smallest power of two >= max_act, so
``max_act <= h < 2 max_act`` (hsae.explore.collect). A store without ``histogram_max``
(written before it existed) means ``h = max_act``.

Top contexts are ordered by their largest activation, highest first; a feature with
fewer contexts than slots has rows of -1. Sampled contexts are drawn in proportion to
activation. Everything the explorer, the judge and the figures read goes through
:class:`ContextStore`. ``hsae contexts`` (hsae.explore.collect) writes stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hsae.io import FormatError, atomic_save_safetensors, atomic_write_json, load_json
from hsae.io import load_safetensors as _load_tensors
from hsae.trained import TrainedHSAE

META_FILE = "contexts.json"
TENSOR_FILE = "contexts.safetensors"
FIELDS = ("top_ids", "top_acts", "sample_ids", "sample_acts", "frequency", "max_act", "histogram")
OPTIONAL_FIELDS = ("histogram_max",)
"""Read when present; older stores lack them (defaults in :class:`LevelContexts`)."""


@dataclass
class Example:
    """One context of one feature: its tokens and the feature's activation on each."""

    tokens: list[str]
    acts: list[float]

    @property
    def max_act(self) -> float:
        return max(self.acts, default=0.0)

    def marked(self, threshold: float = 0.0) -> str:
        """The text with every token whose activation exceeds ``threshold`` as <<token>>.

        Adjacent marked tokens share one pair of marks, as in the paper's appendix C."""
        out, inside = [], False
        for tok, act in zip(self.tokens, self.acts):
            hot = act > threshold
            if hot and not inside:  # a word's leading space stays outside: " <<cat>>"
                body = tok.lstrip()
                out.append(tok[: len(tok) - len(body)] + "<<")
                tok = body
            if not hot and inside:
                out.append(">>")
            out.append(tok)
            inside = hot
        if inside:
            out.append(">>")
        return "".join(out)


@dataclass
class LevelContexts:
    """The tensors of one level (shapes in the module docstring)."""

    top_ids: Tensor
    top_acts: Tensor
    sample_ids: Tensor
    sample_acts: Tensor
    frequency: Tensor
    max_act: Tensor
    histogram: Tensor
    histogram_max: Tensor | None = None
    """Top edge of each feature's histogram; None means max_act (older stores)."""

    def __post_init__(self) -> None:
        if self.histogram_max is None:
            self.histogram_max = self.max_act.float().clone()

    @property
    def n_features(self) -> int:
        return int(self.frequency.shape[0])

    def histogram_edges(self, feature: int) -> list[float]:
        """The ``bins + 1`` edges of one feature's histogram, from 0 to histogram_max."""
        bins, top = self.histogram.shape[1], float(self.histogram_max[feature])
        return [top * i / bins for i in range(bins + 1)]


@dataclass
class ContextStore:
    meta: dict
    """model, layer, text, n_tokens, window, top_k, n_sampled, sizes (and anything else)."""
    vocab: list[str]
    levels: list[LevelContexts]

    @property
    def sizes(self) -> list[int]:
        return [lv.n_features for lv in self.levels]

    def examples(self, level: int, feature: int, kind: str = "top") -> list[Example]:
        """The stored contexts of one feature; ``kind`` is "top" or "sample"."""
        if kind not in ("top", "sample"):
            raise ValueError(f"kind must be 'top' or 'sample', got {kind!r}")
        lv = self.levels[level]
        if not 0 <= feature < lv.n_features:
            raise ValueError(f"level {level} has {lv.n_features} features, not {feature}")
        ids = getattr(lv, f"{kind}_ids")[feature].tolist()
        acts = getattr(lv, f"{kind}_acts")[feature].float().tolist()
        out = []
        for row_ids, row_acts in zip(ids, acts):
            kept = [(self.vocab[i], a) for i, a in zip(row_ids, row_acts) if i >= 0]
            if kept:
                out.append(Example([t for t, _ in kept], [a for _, a in kept]))
        return out

    def save(self, directory: str | Path) -> None:
        """Write both files atomically (tensors first: the JSON marks a complete store)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"level_{i}.{name}": getattr(lv, name).contiguous()
            for i, lv in enumerate(self.levels)
            for name in FIELDS + OPTIONAL_FIELDS
        }
        atomic_save_safetensors(directory / TENSOR_FILE, tensors)
        meta = {**self.meta, "sizes": self.sizes}
        atomic_write_json(directory / META_FILE, {"meta": meta, "vocab": self.vocab})

    @classmethod
    def load(cls, directory: str | Path) -> ContextStore:
        """Read a store; a missing, truncated or inconsistent one is a one-line FormatError."""
        directory = Path(directory)
        header = load_json(directory / META_FILE)
        meta, vocab = header.get("meta"), header.get("vocab")
        if not isinstance(meta, dict) or not isinstance(vocab, list):
            raise FormatError(f"{directory / META_FILE}: needs 'meta' and 'vocab'")
        tensors = _load_tensors(directory / TENSOR_FILE)
        sizes = meta.get("sizes")
        if not isinstance(sizes, list) or not sizes:
            raise FormatError(f"{directory / META_FILE}: meta.sizes must list the level sizes")
        levels = [_read_level(tensors, i, n, len(vocab), directory) for i, n in enumerate(sizes)]
        return cls(meta, [str(t) for t in vocab], levels)


def _read_level(tensors: dict[str, Tensor], i: int, n: int, n_vocab: int, where: Path):
    missing = [f for f in FIELDS if f"level_{i}.{f}" not in tensors]
    if missing:
        raise FormatError(f"{where / TENSOR_FILE}: level {i} lacks {', '.join(missing)}")
    present = [f for f in FIELDS + OPTIONAL_FIELDS if f"level_{i}.{f}" in tensors]
    lv = LevelContexts(**{f: tensors[f"level_{i}.{f}"] for f in present})
    for name in FIELDS + OPTIONAL_FIELDS:
        if getattr(lv, name).shape[0] != n:
            raise FormatError(f"{where / TENSOR_FILE}: level_{i}.{name} is not {n} features long")
    for name in ("top_ids", "sample_ids"):
        ids = getattr(lv, name)
        if ids.numel() and (int(ids.max()) >= n_vocab or int(ids.min()) < -1):
            raise FormatError(f"{where / TENSOR_FILE}: level_{i}.{name} indexes outside the vocab")
    return lv


def empty_level(n: int, top_k: int, n_sampled: int, window: int, bins: int) -> LevelContexts:
    """A level with no contexts yet (all ids -1)."""
    return LevelContexts(
        top_ids=torch.full((n, top_k, window), -1, dtype=torch.int32),
        top_acts=torch.zeros(n, top_k, window, dtype=torch.float16),
        sample_ids=torch.full((n, n_sampled, window), -1, dtype=torch.int32),
        sample_acts=torch.zeros(n, n_sampled, window, dtype=torch.float16),
        frequency=torch.zeros(n),
        max_act=torch.zeros(n),
        histogram=torch.zeros(n, bins, dtype=torch.int64),
    )


def check_store_matches(store: ContextStore, trained: TrainedHSAE, where: str | Path) -> None:
    """A context store belongs to the model it was collected from: the same level sizes and,
    where the store recorded it, the same trained model (by fingerprint, so that a moved
    directory still matches)."""
    if store.sizes != trained.sizes:
        raise FormatError(f"{where}: contexts are for levels {store.sizes}, the model in "
                          f"{trained.directory} has {trained.sizes}")  # fmt: skip
    recorded = store.meta.get("model_sha256")
    if recorded is not None and recorded != trained.fingerprint():
        raise FormatError(f"{where}: contexts were collected from another model "
                          f"({store.meta.get('model')}), not {trained.directory}")  # fmt: skip
