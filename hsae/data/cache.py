"""On-disk activation cache: sharded safetensors plus a JSON manifest, streamed back in
shuffled batches whose memory is bounded by a shuffle buffer, not by the cache.

Layout of a cache directory::

    manifest.json              {"format": "hsae-cache/1", "complete", "d", "dtype",
                                "shard_tokens", "n_tokens", "texts_done", "scale",
                                "row_norm_sum", "meta": {model, layer, text source, ...},
                                "shards": [{"file", "rows", "bytes", "sha256", "texts_done"}]}
    shard_00000.safetensors    one tensor "acts" of shape (rows, d) in the cache's dtype
    shard_00001.safetensors    ...

Writing (:class:`CacheWriter`). Rows are buffered and written as a shard once the buffer
holds ``shard_tokens`` rows; a shard only ever ends at an :meth:`CacheWriter.add` boundary,
so each shard entry records exactly how many texts its rows (and all earlier ones) came
from. Every shard is written atomically, then the manifest is rewritten atomically: the
manifest lists complete shards only. A crash between the two leaves an orphan shard, which
the next open removes together with any leftover temp file. Reopening with the same
settings resumes: ``writer.texts_done`` says how many texts to skip. :meth:`CacheWriter.close`
writes the remainder, the token count and the input scale ``s`` with ``E||s x|| = sqrt(d)``
(from a running sum of row norms), and marks the cache complete.

Reading (:class:`CachedActivations`). Opening checks the manifest and that every shard file
has its recorded byte size (cheap); the first load of each shard checks its SHA-256. A
truncated or corrupt shard raises a one-line :class:`~hsae.io.FormatError` naming it. The
API follows :class:`~hsae.data.activations.NpyActivations` (``d``, ``n``, ``split``,
``split_rows``, ``read``, ``sequential``, ``batches``), so the trainer can use either.

Block shuffle (:meth:`CachedActivations.batches`). Epoch ``e`` visits the view's shards in
the order ``default_rng([seed, e, 0]).permutation``; consecutive shards (in that order) are
grouped greedily into windows of at most ``buffer_tokens`` rows (a shard larger than the
buffer forms a window of its own); the rows of window ``w`` are visited in the order
``default_rng([seed, e, 1, w]).permutation``. Epochs are concatenated and batch ``k`` holds
positions ``[k B, (k + 1) B)`` of that endless sequence: every row appears exactly once
per epoch, and batch ``k`` is a pure function of ``(seed, k, B, buffer_tokens)`` and the
cache, so a resumed run sees exactly the batches of an uninterrupted one without reading
the skipped ones. Order within a batch: rows are grouped by shard and the shards ordered
by where they sit in their window, the middle of the shard's rows in the window's shard
order as a fraction of the window's rows (ties: the earlier window first); rows of one
shard keep their shuffled order. For a batch inside one window this is the window's
shard order; a batch that straddles windows interleaves their shards. The order
changes nothing about which rows a batch holds; it is what lets data-parallel ranks read
only their own shards.

Data-parallel parts (``batches(..., rank=r, world=N)``). Rank ``r`` of ``N`` gets rows
``[r B/N, (r + 1) B/N)`` of global batch ``k``, exactly the rows a one-process run puts
there, so ``N`` processes train on the same global batches as one process. By the order
above, those rows come from about the ``r``-th ``1/N`` of each window's shards, in every
batch, and rank ``r`` loads only the shards its rows come from: per window about ``1/N``
of it plus the one or two shards it shares with a neighbouring rank (so more than ``1/N``
when a window holds fewer than about ``N`` shards: keep ``shard_tokens`` well below
``buffer_tokens / N``). Memory: a loaded shard is kept until the stream leaves its window,
so a rank holds the shards its rows of the current window touch (in the cache's dtype),
about ``buffer_tokens / N`` rows plus a shard or two; one process holds at most one
window, ``max(buffer_tokens, largest shard)`` rows.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from hsae import io
from hsae.data.activations import HeldOutSplit
from hsae.io import FormatError, one_line

CACHE_FORMAT = "hsae-cache/1"
MANIFEST = "manifest.json"
SHARD_KEY = "acts"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DEFAULT_SHARD_TOKENS = 2**20
DEFAULT_BUFFER_TOKENS = 2**22

_SHARD_NAME = re.compile(r"shard_\d{5,}\.safetensors")
_TEMP_NAME = re.compile(r"\.(manifest\.json|shard_\d{5,}\.safetensors)\.[0-9a-f]+\.tmp")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_CHUNK = 1 << 22


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_json(obj: Any) -> Any:
    """``obj`` as JSON would give it back (tuples become lists, numpy scalars numbers)."""
    return json.loads(io.to_json_text(obj))


# =========================================================================== writing


class CacheWriter:
    """Write (or resume writing) an activation cache in ``directory``.

    ``meta`` describes where the activations came from (model, layer, text source, context
    length, ...); it must be JSON-serialisable and is stored as the manifest's ``meta``. A
    directory that already holds a manifest is resumed if ``meta``, ``dtype`` and
    ``shard_tokens`` match what it was written with, and refused otherwise.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        meta: dict,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        dtype: str = "float32",
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if not _is_int(shard_tokens) or shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        self.directory = Path(directory)
        self.meta = _as_json(meta)
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self._torch_dtype = DTYPES[dtype]
        self._buffer: list[Tensor] = []
        self._buffered_rows = 0
        self._buffered_texts = 0
        manifest_path = self.directory / MANIFEST
        if manifest_path.exists():
            self._resume(manifest_path)
        else:
            self._start_fresh()
        self._remove_leftovers()

    # ------------------------------------------------------------------ open

    def _start_fresh(self) -> None:
        if self.directory.exists() and not self.directory.is_dir():
            raise FormatError(f"cache directory {self.directory} exists and is not a directory")
        if self.directory.is_dir():
            foreign = [
                p.name
                for p in self.directory.iterdir()
                if not (_SHARD_NAME.fullmatch(p.name) or _TEMP_NAME.fullmatch(p.name))
            ]
            if foreign:
                raise FormatError(
                    f"{self.directory} is not empty and holds no {MANIFEST} (found "
                    f"{sorted(foreign)[0]!r}); refusing to write a cache there"
                )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.d: int | None = None
        self.shards: list[dict] = []
        self._committed_rows = 0
        self._committed_texts = 0
        self._norm_sum = 0.0
        self.complete = False
        self.scale: float | None = None
        # no manifest until the first shard: a run that fails before any row is written
        # must not leave settings behind that block a corrected rerun

    def _resume(self, path: Path) -> None:
        manifest = _check_manifest(path, io.load_json(path))
        theirs = {
            "dtype": manifest["dtype"],
            "shard_tokens": manifest["shard_tokens"],
            **{f"meta.{k}": v for k, v in manifest["meta"].items()},
        }
        ours = {
            "dtype": self.dtype,
            "shard_tokens": self.shard_tokens,
            **{f"meta.{k}": v for k, v in self.meta.items()},
        }
        differ = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
        if differ:
            shown = "; ".join(
                f"{k}: {json.dumps(ours.get(k))} now, {json.dumps(theirs.get(k))} in {MANIFEST}"
                for k in differ[:4]
            )
            more = f"; and {len(differ) - 4} more" if len(differ) > 4 else ""
            raise FormatError(
                one_line(
                    f"cache {self.directory} was written with other settings ({shown}{more}); "
                    "use the same settings to resume, or another directory"
                )
            )
        for entry in manifest["shards"]:
            _check_shard_size(self.directory, entry)
        self.d = manifest["d"]
        self.shards = list(manifest["shards"])
        self._committed_rows = manifest["n_tokens"]
        self._committed_texts = manifest["texts_done"]
        self._norm_sum = float(manifest["row_norm_sum"])
        self.complete = bool(manifest["complete"])
        self.scale = manifest["scale"]

    def _remove_leftovers(self) -> None:
        """Temp files of interrupted atomic writes, and shards the manifest does not list."""
        listed = {entry["file"] for entry in self.shards}
        for path in self.directory.iterdir():
            orphan = _SHARD_NAME.fullmatch(path.name) and path.name not in listed
            if (orphan or _TEMP_NAME.fullmatch(path.name)) and path.is_file():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    # ------------------------------------------------------------------ progress

    @property
    def texts_done(self) -> int:
        """Texts whose rows are safely on disk: on resume, skip this many texts."""
        return self._committed_texts

    @property
    def n_tokens(self) -> int:
        """Rows on disk plus rows buffered."""
        return self._committed_rows + self._buffered_rows

    # ------------------------------------------------------------------ writing

    def add(self, acts: Tensor, texts_consumed: int) -> None:
        """Buffer ``acts`` (``[n, d]``, from ``texts_consumed`` more texts); write a shard
        when the buffer holds ``shard_tokens`` rows or more."""
        if self.complete:
            raise ValueError(f"cache {self.directory} is already complete; nothing to add")
        if not _is_int(texts_consumed) or texts_consumed < 0:
            raise ValueError(f"texts_consumed must be an integer >= 0, got {texts_consumed!r}")
        if not isinstance(acts, Tensor) or acts.ndim != 2 or not acts.is_floating_point():
            shape = list(acts.shape) if isinstance(acts, Tensor) else type(acts).__name__
            raise ValueError(f"acts must be a 2-D float tensor [n, d], got {shape}")
        d = int(acts.shape[1])
        if self.d is None:
            if d == 0:
                raise ValueError("acts have width 0")
            self.d = d
        elif d != self.d:
            raise ValueError(f"acts have width {d}, cache {self.directory} has width {self.d}")
        rows = acts.detach().to("cpu", self._torch_dtype, copy=True).contiguous()
        if rows.numel() and not bool(torch.isfinite(rows).all()):
            hint = (
                " (beyond float16's range? use bfloat16 or float32)"
                if (self.dtype == "float16" and bool(torch.isfinite(acts).all()))
                else ""
            )
            raise ValueError(f"activations for cache {self.directory} contain NaN or Inf{hint}")
        if rows.shape[0]:
            self._buffer.append(rows)
        self._buffered_rows += int(rows.shape[0])
        self._buffered_texts += texts_consumed
        if self._buffered_rows >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        """Write the buffer as the next shard, then the manifest that lists it."""
        if self._buffered_rows == 0:
            return
        rows = self._buffer[0] if len(self._buffer) == 1 else torch.cat(self._buffer)
        name = shard_name(len(self.shards))
        data = safetensors_bytes({SHARD_KEY: rows})
        io.atomic_write_bytes(self.directory / name, data)  # a failed write keeps the buffer
        self._buffer = []
        self._norm_sum += float(rows.float().norm(dim=1).double().sum())
        self._committed_rows += int(rows.shape[0])
        self._committed_texts += self._buffered_texts
        self.shards.append(
            {
                "file": name,
                "rows": int(rows.shape[0]),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "texts_done": self._committed_texts,
            }
        )
        self._buffered_rows = self._buffered_texts = 0
        self._write_manifest()

    def close(self, scale: float | None = None) -> None:
        """Write the remaining rows, the token count and the input scale; mark complete.

        ``scale`` defaults to ``sqrt(d) / mean ||x||`` over every row written. Closing a
        complete cache does nothing.
        """
        if self.complete:
            return
        self._flush()
        if self._buffered_texts:  # texts that gave no rows (e.g. only a BOS token)
            self._committed_texts += self._buffered_texts
            self._buffered_texts = 0
        if self._committed_rows == 0:
            raise ValueError(f"cache {self.directory}: no activations were added")
        if scale is None:
            mean_norm = self._norm_sum / self._committed_rows
            if not mean_norm > 0:
                raise ValueError(f"cache {self.directory}: activations are all zero")
            scale = math.sqrt(self.d) / mean_norm
        scale = float(scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        self.scale = scale
        self.complete = True
        self._write_manifest()

    def _write_manifest(self) -> None:
        io.atomic_write_json(
            self.directory / MANIFEST,
            {
                "format": CACHE_FORMAT,
                "complete": self.complete,
                "d": self.d,
                "dtype": self.dtype,
                "shard_tokens": self.shard_tokens,
                "n_tokens": self._committed_rows,
                "texts_done": self._committed_texts,
                "scale": self.scale,
                "row_norm_sum": self._norm_sum,
                "meta": self.meta,
                "shards": self.shards,
            },
        )


# =========================================================================== manifest checks


def _check_manifest(path: Path, manifest: dict) -> dict:
    """Field types and consistency of a manifest; FormatError (one line, naming ``path``)."""

    def bad(problem: str) -> FormatError:
        return FormatError(one_line(f"{path}: {problem}"))

    if manifest.get("format") != CACHE_FORMAT:
        raise bad(f"format is {manifest.get('format')!r}, expected {CACHE_FORMAT!r}")
    for key in ("complete", "d", "dtype", "shard_tokens", "n_tokens", "texts_done", "shards"):
        if key not in manifest:
            raise bad(f"missing field {key!r}")
    if not isinstance(manifest["complete"], bool):
        raise bad(f"'complete' must be true or false, got {manifest['complete']!r}")
    if manifest["dtype"] not in DTYPES:
        raise bad(f"dtype must be one of {', '.join(DTYPES)}, got {manifest['dtype']!r}")
    d = manifest["d"]
    if d is not None and (not _is_int(d) or d <= 0):
        raise bad(f"d must be a positive integer, got {d!r}")
    for key in ("shard_tokens", "n_tokens", "texts_done"):
        value = manifest[key]
        if not _is_int(value) or value < 0 or (key == "shard_tokens" and value == 0):
            raise bad(f"{key} must be a non-negative integer, got {value!r}")
    if not isinstance(manifest.get("meta", {}), dict):
        raise bad("'meta' must be a JSON object")
    manifest.setdefault("meta", {})
    norm_sum = manifest.setdefault("row_norm_sum", 0.0)
    if not isinstance(norm_sum, (int, float)) or isinstance(norm_sum, bool):
        raise bad(f"row_norm_sum must be a number, got {norm_sum!r}")
    scale = manifest.setdefault("scale", None)
    if scale is not None and (
        not isinstance(scale, (int, float))
        or isinstance(scale, bool)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise bad(f"scale must be a positive number or null, got {scale!r}")
    shards = manifest["shards"]
    if not isinstance(shards, list):
        raise bad("'shards' must be a list")
    total, texts = 0, 0
    for index, entry in enumerate(shards):
        _check_entry(bad, index, entry)
        if entry["texts_done"] < texts:
            raise bad(f"shard {index}: texts_done decreases")
        total, texts = total + entry["rows"], entry["texts_done"]
    if total != manifest["n_tokens"]:
        raise bad(f"n_tokens is {manifest['n_tokens']} but the shards hold {total} rows")
    if texts > manifest["texts_done"]:
        raise bad(f"texts_done is {manifest['texts_done']} but a shard records {texts}")
    if shards and d is None:
        raise bad("shards are listed but d is null")
    return manifest


def _check_entry(bad, index: int, entry: Any) -> None:
    if not isinstance(entry, dict):
        raise bad(f"shard {index} must be a JSON object")
    if entry.get("file") != shard_name(index):
        raise bad(f"shard {index} must be named {shard_name(index)!r}, got {entry.get('file')!r}")
    for key in ("rows", "bytes", "texts_done"):
        value = entry.get(key)
        if not _is_int(value) or value < 0 or (key != "texts_done" and value == 0):
            raise bad(f"shard {index}: {key} must be a positive integer, got {value!r}")
    if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
        raise bad(f"shard {index}: sha256 must be 64 lowercase hex digits")


def _check_shard_size(directory: Path, entry: dict) -> None:
    path = directory / entry["file"]
    where = f"{entry['file']} in cache {directory}"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FormatError(f"{where} is missing") from None
    if not path.is_file():
        raise FormatError(f"{where} is not a regular file")
    if size != entry["bytes"]:
        kind = "truncated" if size < entry["bytes"] else "corrupt"
        raise FormatError(f"{where} is {kind} ({size} bytes, expected {entry['bytes']})")


# =========================================================================== reading


@dataclass(frozen=True)
class _Piece:
    """Rows ``[lo, hi)`` of shard ``shard``; ``first`` is the cache row index of ``lo``."""

    shard: int
    lo: int
    hi: int
    first: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo


@dataclass
class _EpochPlan:
    windows: list[list[int]]  # piece indices of each window, in visiting order
    starts: list[int]  # position in the epoch where each window starts; one extra at the end

    def piece_starts(self, window: int, pieces: list[_Piece]) -> np.ndarray:
        """Row of the window where each of its pieces starts; one extra at the end."""
        return np.cumsum([0] + [pieces[p].rows for p in self.windows[window]])


@dataclass
class _Part:
    """Rows of one batch (or of one rank's part of it) that come from one window, grouped
    by piece: ``pieces[i]`` is the piece of row ``i``, ``local[i]`` its row in the piece."""

    window: tuple[int, int]  # (epoch, window)
    pieces: np.ndarray
    local: np.ndarray
    at: np.ndarray  # where each row goes in the batch (or the rank's part)


class CachedActivations(HeldOutSplit):
    """Rows ``[start, stop)`` of a complete activation cache, as float32 batches."""

    def __init__(self, directory: str | os.PathLike, expected_d: int | None = None) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FormatError(f"activation cache {self.directory} not found or not a directory")
        manifest_path = self.directory / MANIFEST
        manifest = _check_manifest(manifest_path, io.load_json(manifest_path))
        if not manifest["complete"]:
            raise FormatError(
                f"cache {self.directory} is incomplete (an interrupted `hsae cache`?); "
                "run the same command again to finish it"
            )
        if manifest["n_tokens"] == 0 or manifest["scale"] is None:
            raise FormatError(f"{manifest_path}: a complete cache needs rows and a scale")
        if expected_d is not None and manifest["d"] != expected_d:
            raise FormatError(
                f"activations in cache {self.directory} have width {manifest['d']}, "
                f"the model expects {expected_d}"
            )
        for entry in manifest["shards"]:
            _check_shard_size(self.directory, entry)
        self.manifest = manifest
        self._entries: list[dict] = manifest["shards"]
        self._offsets = np.cumsum([0] + [e["rows"] for e in self._entries]).tolist()
        self._storage_dtype = DTYPES[manifest["dtype"]]
        self._verified: set[int] = set()  # shared by the views of one cache
        self.start, self.stop = 0, int(manifest["n_tokens"])
        self._set_pieces()

    # ------------------------------------------------------------------ description

    @property
    def d(self) -> int:
        return int(self.manifest["d"])

    @property
    def n(self) -> int:
        """Number of rows in this view (not the whole cache after :meth:`split`)."""
        return self.stop - self.start

    @property
    def meta(self) -> dict:
        """What the writer was told: model, layer, text source, ..."""
        return self.manifest["meta"]

    @property
    def scale(self) -> float:
        """Input scale s with E||s x|| = sqrt(d) over the whole cache."""
        return float(self.manifest["scale"])

    @property
    def dtype(self) -> str:
        """Storage dtype of the shards (batches are always float32)."""
        return self.manifest["dtype"]

    @property
    def n_shards(self) -> int:
        return len(self._entries)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (
            f"CachedActivations({str(self.directory)!r}, rows {self.start}:{self.stop}, "
            f"d={self.d}, {self.n_shards} shards, {self.dtype})"
        )

    # ------------------------------------------------------------------ views

    def _set_pieces(self) -> None:
        """The parts of shards that fall inside ``[start, stop)``."""
        pieces = []
        for index, entry in enumerate(self._entries):
            first = self._offsets[index]
            lo, hi = max(self.start, first), min(self.stop, first + entry["rows"])
            if lo < hi:
                pieces.append(_Piece(index, lo - first, hi - first, lo))
        self._pieces = pieces
        self._piece_first = np.array([p.first for p in pieces], dtype=np.int64)
        self._plans: dict[tuple[int, int, int], _EpochPlan] = {}
        self._perms: dict[tuple[int, int, int, int], np.ndarray] = {}

    @property
    def label(self) -> str:
        return f"cache {self.directory}"

    def _view(self, start: int, stop: int) -> CachedActivations:
        view = copy.copy(self)
        view.start, view.stop = start, stop
        view._set_pieces()
        return view

    # ------------------------------------------------------------------ shards

    def _shard_where(self, index: int) -> str:
        return f"{self._entries[index]['file']} in cache {self.directory}"

    def _load_raw(self, index: int) -> Tensor:
        """Shard ``index`` in its storage dtype; its SHA-256 is checked on the first load."""
        entry = self._entries[index]
        path = self.directory / entry["file"]
        _check_shard_size(self.directory, entry)
        if index not in self._verified:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(_HASH_CHUNK):
                    digest.update(chunk)
            if digest.hexdigest() != entry["sha256"]:
                raise FormatError(f"{self._shard_where(index)} is corrupt (checksum mismatch)")
            self._verified.add(index)
        try:
            tensors = io.load_safetensors(path)
        except FormatError as err:
            raise FormatError(f"{self._shard_where(index)} is unreadable: {err}") from None
        acts = tensors.get(SHARD_KEY)
        expected = (entry["rows"], self.d)
        if acts is None or tuple(acts.shape) != expected or acts.dtype != self._storage_dtype:
            found = "no 'acts' tensor" if acts is None else f"{list(acts.shape)} {acts.dtype}"
            raise FormatError(
                f"{self._shard_where(index)} holds {found}, expected {list(expected)} {self.dtype}"
            )
        return acts

    def read_shard(self, index: int) -> Tensor:
        """All rows of shard ``index`` of the cache (ignoring views), as float32."""
        if not 0 <= index < self.n_shards:
            raise IndexError(f"shard {index} out of range: cache has {self.n_shards} shards")
        acts = self._load_raw(index).float()
        self._check_finite(acts, index, 0)
        return acts

    def _check_finite(self, rows: Tensor, shard: int, first_local_row: int) -> None:
        finite = torch.isfinite(rows).all(dim=1)
        if not bool(finite.all()):
            row = first_local_row + int(torch.argmin(finite.byte()))
            raise _nonfinite(self._shard_where(shard), row)

    # ------------------------------------------------------------------ in order

    def read(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``[start, stop)`` of this view, in order, as a checked float32 tensor."""
        stop = self.n if stop is None else min(stop, self.n)
        if not 0 <= start <= stop:
            raise ValueError(f"bad row range {start}:{stop} for a view of {self.n} rows")
        lo, hi = self.start + start, self.start + stop
        parts = [torch.empty(0, self.d)]
        for piece in self._pieces:
            a, b = max(lo, piece.first), min(hi, piece.first + piece.rows)
            if a < b:
                local = piece.lo + a - piece.first
                rows = self._load_raw(piece.shard)[local : local + b - a].float()
                self._check_finite(rows, piece.shard, local)
                parts.append(rows)
        return torch.cat(parts)

    def sequential(self, batch_size: int) -> Iterator[Tensor]:
        """One pass over this view in cache order, one shard in memory at a time: for
        evaluation on held-out rows. The last batch may be short."""
        _check_positive("batch_size", batch_size)
        carry: list[Tensor] = []
        carried = 0
        for piece in self._pieces:
            rows = self._load_raw(piece.shard)[piece.lo : piece.hi].float()
            self._check_finite(rows, piece.shard, piece.lo)
            pos = 0
            while pos < piece.rows:
                take = min(batch_size - carried, piece.rows - pos)
                carry.append(rows[pos : pos + take])
                carried, pos = carried + take, pos + take
                if carried == batch_size:
                    yield torch.cat(carry) if len(carry) > 1 else carry[0].clone()
                    carry, carried = [], 0
        if carried:
            yield torch.cat(carry)

    # ------------------------------------------------------------------ shuffled

    def epoch_plan(self, seed: int, epoch: int, buffer_tokens: int) -> list[list[int]]:
        """Windows of epoch ``epoch``: lists of shard indices, in visiting order."""
        plan = self._plan(seed, epoch, buffer_tokens)
        return [[self._pieces[p].shard for p in window] for window in plan.windows]

    def _plan(self, seed: int, epoch: int, buffer_tokens: int) -> _EpochPlan:
        key = (seed, epoch, buffer_tokens)
        if key not in self._plans:
            if len(self._plans) >= 4:
                self._plans.pop(next(iter(self._plans)))
            order = np.random.default_rng([seed, epoch, 0]).permutation(len(self._pieces))
            windows: list[list[int]] = []
            starts, size = [0], 0
            for p in order.tolist():
                rows = self._pieces[p].rows
                if windows and size + rows <= buffer_tokens:
                    windows[-1].append(p)
                    size += rows
                else:
                    if windows:
                        starts.append(starts[-1] + size)
                    windows.append([p])
                    size = rows
            starts.append(starts[-1] + size)
            self._plans[key] = _EpochPlan(windows, starts)
        return self._plans[key]

    def _segments(
        self, step: int, batch_size: int, seed: int, buffer_tokens: int
    ) -> list[tuple[int, int, int, int]]:
        """Batch ``step`` as ``(epoch, window, lo, hi)``: positions ``[lo, hi)`` of that
        window's shuffled order, in batch order."""
        position, remaining, out = step * batch_size, batch_size, []
        while remaining > 0:
            epoch, offset = divmod(position, self.n)
            plan = self._plan(seed, epoch, buffer_tokens)
            window = bisect.bisect_right(plan.starts, offset) - 1
            lo = offset - plan.starts[window]
            take = min(remaining, plan.starts[window + 1] - offset)
            out.append((epoch, window, lo, lo + take))
            position, remaining = position + take, remaining - take
        return out

    def _window_perm(self, seed: int, epoch: int, window: int, rows: int) -> np.ndarray:
        """Visiting order of the window's rows; the two most recent windows are cached."""
        key = (seed, epoch, window, rows)
        if key not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = np.random.default_rng([seed, epoch, 1, window]).permutation(rows)
        return self._perms[key]

    def _batch_parts(
        self, step: int, batch_size: int, seed: int, buffer_tokens: int, rank: int, world: int
    ) -> list[_Part]:
        """Rows ``[rank b, (rank + 1) b)`` of batch ``step`` (``b = batch_size / world``),
        one part per window they come from: index arithmetic only, nothing is read."""
        segments, middles = [], []  # per window: its rows of the batch, grouped by piece
        for epoch, window, lo, hi in self._segments(step, batch_size, seed, buffer_tokens):
            plan = self._plan(seed, epoch, buffer_tokens)
            starts = plan.piece_starts(window, self._pieces)
            rows = self._window_perm(seed, epoch, window, int(starts[-1]))[lo:hi]
            slot = np.searchsorted(starts, rows, side="right") - 1  # piece within the window
            order = np.argsort(slot, kind="stable")
            slot, rows = slot[order], rows[order]
            pieces = np.asarray(plan.windows[window])[slot]
            segments.append(((epoch, window), pieces, rows - starts[slot]))
            middles.append((starts[slot] + starts[slot + 1]) / (2 * starts[-1]))
        share = batch_size // world
        mine = np.arange(rank * share, (rank + 1) * share)
        if len(segments) == 1:
            key, pieces, local = segments[0]
            return [_Part(key, pieces[mine], local[mine], np.arange(share))]
        # A batch across windows: their pieces interleave by where they sit in their window.
        mine = np.argsort(np.concatenate(middles), kind="stable")[mine]
        bounds = np.cumsum([0, *(len(m) for m in middles)])
        parts = []
        for i, (key, pieces, local) in enumerate(segments):
            at = np.flatnonzero((mine >= bounds[i]) & (mine < bounds[i + 1]))
            if at.size:
                index = mine[at] - bounds[i]  # increasing: the merge keeps each window's order
                parts.append(_Part(key, pieces[index], local[index], at))
        return parts

    def batch_rows(
        self,
        step: int,
        batch_size: int,
        seed: int,
        buffer_tokens: int = DEFAULT_BUFFER_TOKENS,
        rank: int = 0,
        world: int = 1,
    ) -> np.ndarray:
        """Cache row indices of batch ``step`` in batch order (rank ``rank``'s part of it
        when ``world`` > 1): a pure function of its arguments."""
        _check_stream_args(batch_size, seed, step, buffer_tokens, rank, world)
        rows = np.empty(batch_size // world, dtype=np.int64)
        for part in self._batch_parts(step, batch_size, seed, buffer_tokens, rank, world):
            rows[part.at] = self._piece_first[part.pieces] + part.local
        return rows

    def batches(
        self,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        buffer_tokens: int = DEFAULT_BUFFER_TOKENS,
        rank: int = 0,
        world: int = 1,
    ) -> Iterator[Tensor]:
        """Endless block-shuffled float32 batches; the first one yielded is ``start_step``.

        With ``world`` > 1, rank ``rank``'s part of each batch, reading only the shards
        that part needs (see the module docstring). Holds the shards of one window at a
        time: at most ``max(buffer_tokens, largest shard)`` rows.
        """
        _check_stream_args(batch_size, seed, start_step, buffer_tokens, rank, world)
        return self._batches(batch_size, seed, start_step, buffer_tokens, rank, world)

    def _batches(
        self, batch_size: int, seed: int, step: int, buffer_tokens: int, rank: int, world: int
    ) -> Iterator[Tensor]:
        window: tuple[int, int] | None = None
        loaded: dict[int, Tensor] = {}  # piece -> its rows, for the pieces of `window` in use
        while True:
            parts = self._batch_parts(step, batch_size, seed, buffer_tokens, rank, world)
            out = torch.empty(batch_size // world, self.d) if len(parts) > 1 else None
            for part in parts:
                if part.window != window:
                    loaded = {}  # release the old window's shards before loading the next
                    window = part.window
                rows = self._gather(part, loaded)
                if out is None:
                    out = rows  # one window: the part is the whole batch, in order
                else:
                    out[torch.from_numpy(part.at)] = rows
            yield out
            step += 1

    def _gather(self, part: _Part, loaded: dict[int, Tensor]) -> Tensor:
        """The part's rows as a checked float32 tensor; each piece is loaded on first use
        and kept (in ``loaded``)."""
        rows = torch.empty(len(part.local), self.d, dtype=self._storage_dtype)
        local = torch.from_numpy(part.local)
        cuts = (np.flatnonzero(np.diff(part.pieces)) + 1).tolist()  # rows come in piece runs
        for a, b in zip([0, *cuts], [*cuts, len(part.local)], strict=True):
            index = int(part.pieces[a])
            if index not in loaded:
                loaded[index] = self._load_piece(self._pieces[index])
            torch.index_select(loaded[index], 0, local[a:b], out=rows[a:b])
        rows = rows.float()
        finite = torch.isfinite(rows).all(dim=1)
        if not bool(finite.all()):
            bad = int(torch.argmin(finite.byte()))
            piece = self._pieces[int(part.pieces[bad])]
            raise _nonfinite(self._shard_where(piece.shard), piece.lo + int(local[bad]))
        return rows

    def _load_piece(self, piece: _Piece) -> Tensor:
        """The piece's rows in the storage dtype, not holding on to the rest of its shard."""
        raw = self._load_raw(piece.shard)
        return raw if piece.rows == raw.shape[0] else raw[piece.lo : piece.hi].clone()


def _nonfinite(where: str, row: int) -> FormatError:
    return FormatError(f"non-finite value (NaN or Inf) in {where} at row {row}")


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_stream_args(
    batch_size: int, seed: int, step: int, buffer_tokens: int, rank: int = 0, world: int = 1
) -> None:
    _check_positive("batch_size", batch_size)
    _check_positive("buffer_tokens", buffer_tokens)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if step < 0:
        raise ValueError(f"start_step must be >= 0, got {step}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, {world}), got {rank}")
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} is not divisible by {world} processes")
