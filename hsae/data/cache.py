"""Reading an activation cache, streamed back in shuffled batches whose memory is bounded
by a shuffle buffer, not by the cache (format: `hsae.data.cache_format`; writing:
`hsae.data.cache_writer`).

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

Why one file of about 470 lines: the shuffle plan and the per-rank parts decide together
which rows each batch holds and which shards a rank loads.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hsae import io
from hsae.data.activations import HeldOutSplit
from hsae.data.cache_format import (
    DEFAULT_BUFFER_TOKENS,
    DTYPES,
    HASH_CHUNK,
    MANIFEST,
    SHARD_KEY,
    check_manifest,
    check_shard_size,
)
from hsae.io import FormatError


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
        manifest = check_manifest(manifest_path, io.load_json(manifest_path))
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
            check_shard_size(self.directory, entry)
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
        check_shard_size(self.directory, entry)
        if index not in self._verified:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(HASH_CHUNK):
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
