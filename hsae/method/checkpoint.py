"""Checkpoints: one safetensors file with the run's tensors and its JSON state, and a
SHA-256 over both that resume verifies (design §6)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save as save_bytes
from torch import Tensor

from hsae.io import (
    PathLike,
    atomic_write_bytes,
    cpu_tensors,
    format_error,
    json_default,
    read_safetensors,
)

CHECKPOINT_FORMAT = "hsae-checkpoint/1"
STATE_KEY = "hsae_state"
"""Safetensors metadata key under which a checkpoint stores its JSON state."""


def checkpoint_digest(tensors: dict[str, Tensor], state: dict) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and the state without its own
    digest: resume refuses a checkpoint whose bytes changed after it was written."""
    digest = hashlib.sha256()
    rest = {k: v for k, v in state.items() if k != "sha256"}
    digest.update(json.dumps(rest, sort_keys=True, default=json_default).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: PathLike, tensors: dict[str, Tensor], state: dict) -> None:
    """One safetensors file holding tensors plus the JSON ``state`` in its header metadata.

    A single file replaced atomically cannot be half-updated, unlike a tensors file plus a
    JSON file. ``state["format"]`` is set to ``hsae-checkpoint/1`` and ``state["sha256"]``
    to :func:`checkpoint_digest`.
    """
    tensors = cpu_tensors(tensors)
    state = {**state, "format": CHECKPOINT_FORMAT}
    state["sha256"] = checkpoint_digest(tensors, state)
    text = json.dumps(state, default=json_default)
    atomic_write_bytes(path, save_bytes(tensors, metadata={STATE_KEY: text}))


def load_checkpoint(path: PathLike) -> tuple[dict[str, Tensor], dict]:
    """Tensors and state of a checkpoint; FormatError if missing, corrupt, without state,
    or if its bytes no longer match the checksum written with it."""
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    if STATE_KEY not in metadata:
        raise format_error(path, f"not an HSAE checkpoint (no {STATE_KEY!r} metadata)")
    try:
        state = json.loads(metadata[STATE_KEY])
    except json.JSONDecodeError as err:
        raise format_error(path, f"checkpoint state is not valid JSON: {err.msg}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise format_error(path, f"checkpoint format is {found!r}, expected {CHECKPOINT_FORMAT!r}")
    if state.get("sha256") != checkpoint_digest(tensors, state):
        raise format_error(path, "checksum mismatch: the checkpoint changed after it was written "
                          "(corrupt); delete it to start over")  # fmt: skip
    return tensors, state
