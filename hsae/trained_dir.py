"""The trained directory on disk (design §6): what `TrainedHSAE` saves and loads.

    hsae.json          {"format": "hsae/1", "d_in", "sizes", "scale", "config", "summary"}
    hierarchy.json     {"parents": [null, [p_0, p_1, ...], ...]}
    level_0/ ...       one SAE Lens 6.x JumpReLU SAE each (cfg.json, sae_weights.safetensors)

The model works on scaled inputs ``s * x``. The exported level weights fold ``s`` in
(``W_enc * s``, ``W_dec / s``, ``b_dec / s``) so that SAE Lens, fed raw activations, computes
the same features, and a reconstruction equal to ours divided by ``s``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hsae.io import (
    FormatError,
    PathLike,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    format_error,
    load_json,
    load_safetensors,
    replaced_directory,
    to_json_text,
)

TRAINED_FORMAT = "hsae/1"
SAE_WEIGHTS_FILE = "sae_weights.safetensors"
SAE_CFG_FILE = "cfg.json"
SAE_LENS_FORMAT_VERSION = "6.0.0"
"""Written as ``metadata.sae_lens_version``: SAE Lens reads it to decide whether a cfg.json
needs its pre-6.0 conversion, which would drop our metadata. It names the on-disk format
we follow, not an installed SAE Lens."""

LEVEL_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


@dataclass
class LevelWeights:
    """One level's parameters in the model's scaled space (see :mod:`hsae.method.model`)."""

    W_enc: Tensor  # [d, n]
    b_enc: Tensor  # [n]
    W_dec: Tensor  # [n, d], unit-norm rows
    b_dec: Tensor  # [d]
    threshold: Tensor  # [n], >= 0


def save_trained(
    directory: PathLike,
    levels: Sequence[LevelWeights],
    parents: Sequence[Tensor | None],
    scale: float,
    config: dict,
    summary: dict,
    *,
    sae_metadata: dict[str, Any] | None = None,
) -> None:
    """Write a trained HSAE directory as one unit (built beside it, then swapped in).

    ``parents`` holds one int array per level pair: ``parents[l - 1][j]`` is the parent in
    level ``l - 1`` of feature ``j`` of level ``l``, or -1. A leading ``None`` (the
    hierarchy.json layout, length L) is accepted too. ``sae_metadata`` adds SAE Lens
    metadata such as ``model_name`` or ``hook_name`` to every level's cfg.json.
    """
    directory = Path(os.path.abspath(directory))  # "." or "out/" get a real name to swap
    scale = _check_scale(directory, scale)
    d_in = _check_levels(levels)
    parent_lists = _parents_to_lists(levels, parents)
    sizes = [int(level.W_enc.shape[1]) for level in levels]
    header = {
        "format": TRAINED_FORMAT,
        "d_in": d_in,
        "sizes": sizes,
        "scale": scale,
        "config": _strict_json(config),
        "summary": _strict_json(summary),
    }
    texts = {"hsae.json": to_json_text(header), "hierarchy.json": _hierarchy_text(parent_lists)}
    _refuse_foreign_directory(directory)
    with replaced_directory(directory) as staging:
        for name, text in texts.items():
            atomic_write_bytes(staging / name, text.encode("utf-8"))
        for index, level in enumerate(levels):
            _write_level(staging / f"level_{index}", level, index, len(levels), scale, sae_metadata)


def _check_scale(directory: Path, scale: float) -> float:
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise format_error(directory, f"scale must be a positive finite number, got {scale}")
    return scale


def _check_levels(levels: Sequence[LevelWeights]) -> int:
    """Shapes consistent across a level and across levels; the folded export needs theta >= 0."""
    if not levels:
        raise ValueError("save_trained needs at least one level")
    d_in = int(levels[0].W_enc.shape[0])
    for index, level in enumerate(levels):
        n = int(level.W_enc.shape[1])
        problem = _shape_problem(_level_dict(level), d_in, n)
        if problem:
            raise ValueError(f"level {index}: {problem}")
        if bool((level.threshold < 0).any()):
            # SAE Lens applies relu before the jump; equal to ours only when theta >= 0.
            raise ValueError(f"level {index}: negative threshold, SAE Lens export would differ")
    return d_in


def _level_dict(level: LevelWeights) -> dict[str, Tensor]:
    return {key: getattr(level, key) for key in LEVEL_KEYS}


def _expected_shapes(d_in: int, n: int) -> dict[str, tuple[int, ...]]:
    return {
        "W_enc": (d_in, n),
        "b_enc": (n,),
        "W_dec": (n, d_in),
        "b_dec": (d_in,),
        "threshold": (n,),
    }


def _shape_problem(tensors: dict[str, Tensor], d_in: int, n: int) -> str | None:
    """The first missing or mis-shaped tensor of a level, as text; None if all fit."""
    for key, shape in _expected_shapes(d_in, n).items():
        if key not in tensors:
            return f"missing tensor {key}"
        got = tuple(tensors[key].shape)
        if got != shape:
            return f"{key} has shape {list(got)}, expected {list(shape)}"
    return None


def _parents_to_lists(
    levels: Sequence[LevelWeights], parents: Sequence[Tensor | None]
) -> list[list[int]]:
    """Validate parent arrays against level sizes; return one Python list per level >= 1."""
    arrays = list(parents)
    if len(arrays) == len(levels) and arrays and arrays[0] is None:
        arrays = arrays[1:]
    if len(arrays) != len(levels) - 1:
        raise ValueError(
            f"expected {len(levels) - 1} parent arrays for {len(levels)} levels, got {len(arrays)}"
        )
    out = []
    for index, array in enumerate(arrays, start=1):
        values = torch.as_tensor(array).to("cpu").long().reshape(-1)
        n_child = int(levels[index].W_enc.shape[1])
        n_parent = int(levels[index - 1].W_enc.shape[1])
        _check_parent_values(f"level {index} parents", values, n_child, n_parent)
        out.append(values.tolist())
    return out


def _check_parent_values(where: str, values: Tensor, n_child: int, n_parent: int) -> None:
    if values.numel() != n_child:
        raise FormatError(f"{where}: {values.numel()} entries, level has {n_child} features")
    if values.numel() == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < -1 or high >= n_parent:
        raise FormatError(f"{where}: values must lie in [-1, {n_parent}), found [{low}, {high}]")


def _hierarchy_text(parent_lists: list[list[int]]) -> str:
    """hierarchy.json with one feature list per line: readable and still small."""
    rows = ["null"] + [json.dumps(values, separators=(",", ":")) for values in parent_lists]
    return '{\n  "parents": [\n    ' + ",\n    ".join(rows) + "\n  ]\n}\n"


def _strict_json(obj: Any) -> Any:
    """Round-trip through JSON, turning NaN/inf into null: other tools' parsers reject them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _strict_json(obj.tolist())
    return obj


def fold_scale(level: LevelWeights, scale: float) -> dict[str, Tensor]:
    """Weights that act on raw x exactly as ``level`` acts on ``scale * x`` (output / scale)."""
    return {
        "W_enc": _f32(level.W_enc.double() * scale),
        "W_dec": _f32(level.W_dec.double() / scale),
        "b_enc": _f32(level.b_enc),
        "b_dec": _f32(level.b_dec.double() / scale),
        "threshold": _f32(level.threshold),
    }


def unfold_scale(tensors: dict[str, Tensor], scale: float) -> LevelWeights:
    """Inverse of :func:`fold_scale` (exact up to one float32 rounding unless s is a power of 2)."""
    return LevelWeights(
        W_enc=_f32(tensors["W_enc"].double() / scale),
        b_enc=_f32(tensors["b_enc"]),
        W_dec=_f32(tensors["W_dec"].double() * scale),
        b_dec=_f32(tensors["b_dec"].double() * scale),
        threshold=_f32(tensors["threshold"]),
    )


def _f32(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu", torch.float32).contiguous()


def sae_lens_cfg(
    d_in: int, d_sae: int, level: int, n_levels: int, scale: float, extra: dict[str, Any] | None
) -> dict[str, Any]:
    """cfg.json of one level, following SAE Lens 6.x's ``JumpReLUSAEConfig.to_dict()``."""
    metadata: dict[str, Any] = {
        "model_name": None,
        "hook_name": None,
        "hook_head_index": None,
        "model_class_name": None,
        "context_size": None,
        "prepend_bos": None,
        "dataset_path": None,
        "sae_lens_version": SAE_LENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        **(extra or {}),
        "hsae_level": level,
        "hsae_n_levels": n_levels,
        "hsae_scale": scale,
        "hsae_scale_folded": True,
    }
    return {
        "architecture": "jumprelu",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }


def _write_level(
    folder: Path,
    level: LevelWeights,
    index: int,
    n_levels: int,
    scale: float,
    extra: dict[str, Any] | None,
) -> None:
    folder.mkdir()
    d_in, d_sae = (int(n) for n in level.W_enc.shape)
    atomic_save_safetensors(folder / SAE_WEIGHTS_FILE, fold_scale(level, scale))
    atomic_write_json(
        folder / SAE_CFG_FILE, sae_lens_cfg(d_in, d_sae, index, n_levels, scale, extra)
    )


def _refuse_foreign_directory(directory: Path) -> None:
    """Replacing a directory deletes it: only ever do that to an earlier HSAE export."""
    if directory.exists() and not directory.is_dir():
        raise format_error(directory, "exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / "hsae.json").is_file():
        raise format_error(
            directory, "exists and is not an HSAE directory (no hsae.json); refusing to replace it"
        )


def load_trained(directory: PathLike) -> tuple[list[LevelWeights], list[Tensor], float, dict]:
    """Read a trained HSAE directory back into the model's scaled space.

    Returns ``(levels, parents, scale, header)`` where ``parents`` has one LongTensor per
    level pair (length L - 1, as :func:`save_trained` takes it) and ``header`` is hsae.json.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise format_error(directory, "not found or not a directory")
    header = load_json(directory / "hsae.json")
    d_in, sizes, scale = _check_header(directory / "hsae.json", header)
    levels = [_read_level(directory / f"level_{i}", d_in, n, scale) for i, n in enumerate(sizes)]
    parents = _read_hierarchy(directory / "hierarchy.json", sizes)
    return levels, parents, scale, header


def _check_header(path: Path, header: dict) -> tuple[int, list[int], float]:
    if header.get("format") != TRAINED_FORMAT:
        raise format_error(path, f"format is {header.get('format')!r}, expected {TRAINED_FORMAT!r}")
    d_in, sizes, scale = header.get("d_in"), header.get("sizes"), header.get("scale")
    if not _is_int(d_in) or d_in <= 0:
        raise format_error(path, f"d_in must be a positive integer, got {d_in!r}")
    if not isinstance(sizes, list) or not sizes or not all(_is_int(n) and n > 0 for n in sizes):
        raise format_error(
            path, f"sizes must be a non-empty list of positive integers, got {sizes!r}"
        )
    if (
        not isinstance(scale, (int, float))
        or isinstance(scale, bool)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise format_error(path, f"scale must be a positive number, got {scale!r}")
    return d_in, sizes, float(scale)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_level(folder: Path, d_in: int, n: int, scale: float) -> LevelWeights:
    weights_path = folder / SAE_WEIGHTS_FILE
    tensors = load_safetensors(weights_path)
    problem = _shape_problem(tensors, d_in, n)
    if problem:
        raise format_error(weights_path, problem)
    cfg_path = folder / SAE_CFG_FILE
    cfg = load_json(cfg_path)
    if cfg.get("d_in") != d_in or cfg.get("d_sae") != n:
        raise format_error(
            cfg_path,
            f"d_in/d_sae are {cfg.get('d_in')}/{cfg.get('d_sae')}, hsae.json says {d_in}/{n}",
        )
    if cfg.get("architecture") != "jumprelu":
        raise format_error(
            cfg_path, f"architecture is {cfg.get('architecture')!r}, expected 'jumprelu'"
        )
    return unfold_scale(tensors, scale)


def _read_hierarchy(path: Path, sizes: list[int]) -> list[Tensor]:
    raw = load_json(path).get("parents")
    if not isinstance(raw, list) or len(raw) != len(sizes) or raw[0] is not None:
        raise format_error(
            path, f"'parents' must be a list of {len(sizes)} entries starting with null"
        )
    out = []
    for index, values in enumerate(raw[1:], start=1):
        if not isinstance(values, list) or not all(_is_int(v) for v in values):
            raise format_error(path, f"parents of level {index} must be a list of integers")
        tensor = torch.tensor(values, dtype=torch.long)
        try:
            _check_parent_values(f"level {index} parents", tensor, sizes[index], sizes[index - 1])
        except FormatError as err:
            raise format_error(path, str(err)) from None
        out.append(tensor)
    return out
