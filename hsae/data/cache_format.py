"""The activation cache's format (design §6): names, dtypes, the manifest and its checks.

    manifest.json              {"format": "hsae-cache/1", "complete", "d", "dtype",
                                "shard_tokens", "n_tokens", "texts_done", "scale",
                                "row_norm_sum", "meta": {model, layer, text source, ...},
                                "shards": [{"file", "rows", "bytes", "sha256", "texts_done"}]}
    shard_00000.safetensors    one tensor "acts" of shape (rows, d) in the cache's dtype
    shard_00001.safetensors    ...

Writing: `hsae.data.cache_writer`; reading and the shuffled stream: `hsae.data.cache`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from hsae import io
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

SHARD_NAME = re.compile(r"shard_\d{5,}\.safetensors")
TEMP_NAME = re.compile(r"\.(manifest\.json|shard_\d{5,}\.safetensors)\.[0-9a-f]+\.tmp")
SHA256 = re.compile(r"[0-9a-f]{64}")
HASH_CHUNK = 1 << 22


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def as_json(obj: Any) -> Any:
    """``obj`` as JSON would give it back (tuples become lists, numpy scalars numbers)."""
    return json.loads(io.to_json_text(obj))


def check_manifest(path: Path, manifest: dict) -> dict:
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
    if d is not None and (not is_int(d) or d <= 0):
        raise bad(f"d must be a positive integer, got {d!r}")
    for key in ("shard_tokens", "n_tokens", "texts_done"):
        value = manifest[key]
        if not is_int(value) or value < 0 or (key == "shard_tokens" and value == 0):
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
        if not is_int(value) or value < 0 or (key != "texts_done" and value == 0):
            raise bad(f"shard {index}: {key} must be a positive integer, got {value!r}")
    if not isinstance(entry.get("sha256"), str) or not SHA256.fullmatch(entry["sha256"]):
        raise bad(f"shard {index}: sha256 must be 64 lowercase hex digits")


def check_shard_size(directory: Path, entry: dict) -> None:
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
