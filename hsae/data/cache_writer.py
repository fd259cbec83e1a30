"""Writing an activation cache (the format: `hsae.data.cache_format`).

Writing (:class:`CacheWriter`). Rows are buffered and written as a shard once the buffer
holds ``shard_tokens`` rows; a shard only ever ends at an :meth:`CacheWriter.add` boundary,
so each shard entry records exactly how many texts its rows (and all earlier ones) came
from. Every shard is written atomically, then the manifest is rewritten atomically: the
manifest lists complete shards only. A crash between the two leaves an orphan shard, which
the next open removes together with any leftover temp file. Reopening with the same
settings resumes: ``writer.texts_done`` says how many texts to skip. :meth:`CacheWriter.close`
writes the remainder, the token count and the input scale ``s`` with ``E||s x|| = sqrt(d)``
(from a running sum of row norms), and marks the cache complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from hsae import io
from hsae.data.cache_format import (
    CACHE_FORMAT,
    DEFAULT_SHARD_TOKENS,
    DTYPES,
    MANIFEST,
    SHARD_KEY,
    SHARD_NAME,
    TEMP_NAME,
    as_json,
    check_manifest,
    check_shard_size,
    is_int,
    shard_name,
)
from hsae.io import FormatError, one_line


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
        if not is_int(shard_tokens) or shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        self.directory = Path(directory)
        self.meta = as_json(meta)
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
                if not (SHARD_NAME.fullmatch(p.name) or TEMP_NAME.fullmatch(p.name))
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
        manifest = check_manifest(path, io.load_json(path))
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
            check_shard_size(self.directory, entry)
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
            orphan = SHARD_NAME.fullmatch(path.name) and path.name not in listed
            if (orphan or TEMP_NAME.fullmatch(path.name)) and path.is_file():
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
        if not is_int(texts_consumed) or texts_consumed < 0:
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
