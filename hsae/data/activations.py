"""Activations stored as one ``(N, d)`` float ``.npy`` file, streamed in shuffled batches.

The file is memory-mapped (``np.load(..., mmap_mode="r", allow_pickle=False)``), so a
cache larger than RAM works and nothing in it can run code. Only the rows of a batch
are read, converted to float32 and checked for NaN/Inf.

Held-out data: :meth:`NpyActivations.split` cuts the LAST rows off as an evaluation set and
returns two views of the same file. Train on ``train.batches(...)`` and evaluate on
``held.sequential(...)``; a view never draws rows outside its own range, so the held-out
tokens are never trained on. (Taking the tail rather than a random subset keeps whole
documents on one side when the cache was written document by document.)

Shuffling is epoch-wise: epoch ``e`` visits the view's rows in the order
``default_rng([seed, e]).permutation(n)``, epochs are concatenated, and batch ``k`` is
positions ``[k * B, (k + 1) * B)`` of that endless sequence. A batch may straddle two
epochs, every batch is full, and every row appears exactly once per epoch. Because batch
``k`` is a pure function of ``(seed, k, B)``, resuming at ``start_step=k`` yields exactly
the batches an uninterrupted run would have seen, without touching skipped data.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hsae.io import FormatError


class HeldOutSplit:
    """Train / held-out views of a row source: the last rows are held out, and the train
    view's batches never draw them. Subclasses provide `n`, `start`, `stop`, `_view` and
    `label` (the source's name in messages)."""

    n: int
    start: int
    stop: int
    label: str

    def _view(self, start: int, stop: int):
        raise NotImplementedError

    def split(self, eval_frac: float):
        """``(train, held_out)`` views: the last ``eval_frac`` of rows (>= 1 row) are held out."""
        if not 0.0 < eval_frac < 1.0:
            raise ValueError(f"eval_frac must lie in (0, 1), got {eval_frac}")
        return self.split_rows(max(1, round(self.n * eval_frac)))

    def split_rows(self, n_eval: int):
        """``(train, held_out)`` views: the last ``n_eval`` rows of this view are held out."""
        if not 0 < n_eval < self.n:
            raise FormatError(
                f"{self.label}: cannot hold out {n_eval} of {self.n} rows "
                "(both train and evaluation sets need at least one row)"
            )
        cut = self.stop - n_eval
        return self._view(self.start, cut), self._view(cut, self.stop)


class NpyActivations(HeldOutSplit):
    """Rows ``[start, stop)`` of a memory-mapped ``(N, d)`` float ``.npy`` file."""

    def __init__(self, path: str | os.PathLike, expected_d: int | None = None) -> None:
        self.path = Path(path)
        self._array = _open_npy(self.path, expected_d)
        self.start = 0
        self.stop = int(self._array.shape[0])
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    # ------------------------------------------------------------------ shape and views

    @property
    def d(self) -> int:
        """Width of each activation vector."""
        return int(self._array.shape[1])

    @property
    def n(self) -> int:
        """Number of rows in this view (not the whole file after :meth:`split`)."""
        return self.stop - self.start

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"NpyActivations({str(self.path)!r}, rows {self.start}:{self.stop}, d={self.d})"

    @property
    def label(self) -> str:
        return str(self.path)

    def _view(self, start: int, stop: int) -> NpyActivations:
        """A view of rows ``[start, stop)`` of the file, sharing the memory map."""
        view = copy.copy(self)
        view.start, view.stop = start, stop
        view._perm_cache = {}
        return view

    # ------------------------------------------------------------------ reading

    def read(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``[start, stop)`` of this view, in order, as a checked float32 tensor."""
        stop = self.n if stop is None else min(stop, self.n)
        if not 0 <= start <= stop:
            raise ValueError(f"bad row range {start}:{stop} for a view of {self.n} rows")
        rows = np.arange(self.start + start, self.start + stop)
        return self.read_rows(rows)

    def sequential(self, batch_size: int) -> Iterator[Tensor]:
        """One pass over this view in file order: for evaluation on held-out rows."""
        _check_positive("batch_size", batch_size)
        for first in range(0, self.n, batch_size):
            yield self.read(first, first + batch_size)

    def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Tensor]:
        """Endless shuffled float32 batches; the first one yielded is batch ``start_step``."""
        _check_positive("batch_size", batch_size)
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        step = start_step
        while True:
            yield self.read_rows(self.batch_rows(step, batch_size, seed))
            step += 1

    def batch_rows(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """File row indices of batch ``step``: a pure function of its arguments (see module doc)."""
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        position, remaining = step * batch_size, batch_size
        parts = []
        while remaining > 0:
            epoch, offset = divmod(position, self.n)
            take = min(remaining, self.n - offset)
            parts.append(self._permutation(seed, epoch)[offset : offset + take])
            position, remaining = position + take, remaining - take
        return np.concatenate(parts) + self.start

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        """Order of the view's rows in one epoch; the two most recent epochs are cached."""
        key = (seed, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) >= 2:
                self._perm_cache.pop(next(iter(self._perm_cache)))
            self._perm_cache[key] = np.random.default_rng([seed, epoch]).permutation(self.n)
        return self._perm_cache[key]

    def read_rows(self, rows: np.ndarray) -> Tensor:
        """Gather ``rows`` (file indices) in the given order; the mmap is read sorted."""
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), self.d), dtype=np.float32)
        out[order] = self._array[rows[order]]
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            bad_row = int(rows[int(np.argmin(finite))])
            raise FormatError(
                f"non-finite value (NaN or Inf) in activations file {self.path} near row {bad_row}"
            )
        return torch.from_numpy(out)


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _open_npy(path: Path, expected_d: int | None) -> np.ndarray:
    """Memory-map ``path`` and check it is a non-empty 2-D float array of the right width."""
    if not path.exists():
        raise FormatError(f"activations file {path} not found")
    if not path.is_file():
        raise FormatError(f"activations file {path} is not a regular file")
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":  # numpy would suggest allow_pickle, which we never use
            raise FormatError(f"activations file {path} is not a .npy file (no .npy header)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:  # pickled, truncated, object dtype, ...
        reason = " ".join(str(err).split())
        if "pickle" in reason or "Python objects" in reason:
            reason = "it holds pickled Python objects, which hsae never loads"
        raise FormatError(
            f"activations file {path} is not a readable .npy array: {reason}"
        ) from err
    if not isinstance(array, np.ndarray):  # e.g. an .npz archive
        raise FormatError(f"activations file {path} is not a .npy array (an .npz archive?)")
    _check_array(path, array, expected_d)
    return array


def _check_array(path: Path, array: np.ndarray, expected_d: int | None) -> None:
    if array.ndim != 2:
        raise FormatError(
            f"activations in {path} have shape {list(array.shape)}, expected 2-D (tokens, width)"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise FormatError(f"activations in {path} have dtype {array.dtype}, expected a float type")
    n, d = array.shape
    if expected_d is not None and d != expected_d:
        raise FormatError(f"activations in {path} have width {d}, the model expects {expected_d}")
    if n == 0 or d == 0:
        raise FormatError(f"activations in {path} are empty (shape {list(array.shape)})")
