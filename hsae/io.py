"""Files on disk: atomic writes, safe loads, the trained-model directory, checkpoints.

Three rules hold for everything here:

* nothing is loaded with pickle: tensors travel in safetensors, everything else in JSON;
* every write is atomic: a temp file in the same directory is written, flushed and
  fsynced, then moved over the target with ``os.replace``, so a crash leaves either the
  old file or the new one, never half of one (a whole directory is swapped likewise);
* bad input raises :class:`FormatError`, a ``ValueError`` whose one-line message names the
  file and the problem, instead of a traceback from deep inside a parser.

The trained-model directory (design §6) is::

    hsae.json          {"format": "hsae/1", "d_in", "sizes", "scale", "config", "summary"}
    hierarchy.json     {"parents": [null, [p_0, p_1, ...], ...]}
    level_0/ ...       one SAE Lens 6.x JumpReLU SAE each (cfg.json, sae_weights.safetensors)

The model works on scaled inputs ``s * x``. The exported level weights fold ``s`` in
(``W_enc * s``, ``W_dec / s``, ``b_dec / s``) so that SAE Lens, fed raw activations, computes
the same features, and a reconstruction equal to ours divided by ``s``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes
from torch import Tensor

PathLike = str | os.PathLike

TRAINED_FORMAT = "hsae/1"
CHECKPOINT_FORMAT = "hsae-checkpoint/1"
STATE_KEY = "hsae_state"
"""Safetensors metadata key under which a checkpoint stores its JSON state."""

SAE_WEIGHTS_FILE = "sae_weights.safetensors"
SAE_CFG_FILE = "cfg.json"
SAE_LENS_FORMAT_VERSION = "6.0.0"
"""Written as ``metadata.sae_lens_version``: SAE Lens reads it to decide whether a cfg.json
needs its pre-6.0 conversion, which would drop our metadata. It names the on-disk format
we follow, not an installed SAE Lens."""

LEVEL_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


def one_line(problem: BaseException | str) -> str:
    """An exception's message (or any text) folded onto one line, at most 300 characters."""
    text = " ".join(str(problem).split())
    if not text and isinstance(problem, BaseException):
        text = type(problem).__name__
    return text[:300]


class FormatError(ValueError):
    """A file is missing, truncated, corrupt or inconsistent; the message is one line."""


def _fail(path: PathLike, problem: str) -> FormatError:
    """Build a one-line FormatError naming ``path``."""
    text = " ".join(str(problem).split())
    return FormatError(f"{os.fspath(path)}: {text}")


def check_writable(path: PathLike, kind: str) -> None:
    """FormatError now, before any compute, if ``path`` cannot be written as a ``kind``
    ("file" or "dir"): an existing path of the other kind, an ancestor that is a file, or
    a folder this process may not write in (atomic writes need the parent too)."""
    path = Path(path)
    if kind == "dir" and path.exists() and not path.is_dir():
        raise _fail(path, "exists and is not a directory")
    if kind == "file" and path.is_dir():
        raise _fail(path, "is a directory; expected a file name")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise _fail(path, f"cannot be created: {ancestor} is a file, not a directory")
    for folder in [ancestor] + ([path] if kind == "dir" and path.exists() else []):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise _fail(path, f"cannot be written: no write permission in {folder}")


LOCK_FILE = ".hsae-lock"


@contextlib.contextmanager
def locked_directory(directory: PathLike) -> Iterator[Path]:
    """Hold ``directory`` (created if need be) for this process while it writes there.

    An advisory ``flock`` on ``directory/.hsae-lock``: a second writer fails at once with
    the holder's pid, and the kernel drops the lock when its holder exits, so a killed run
    never leaves it stuck."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK_FILE, "a+")  # noqa: SIM115 (held until the block ends)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise _fail(directory, f"another hsae process (pid {holder}) is writing this run; "
                               "wait for it or choose another --out") from None  # fmt: skip
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield directory
    finally:
        handle.close()


# --------------------------------------------------------------------------- atomic writes


def _sibling_name(path: Path, suffix: str) -> Path:
    """A fresh hidden name next to ``path``: same directory, so renames stay on one file system."""
    return path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"


@contextlib.contextmanager
def _temp_beside(path: Path) -> Iterator[Path]:
    """Yield a new empty temp file beside ``path``; remove it unless it was moved away.

    Created with mode 0o666 minus the umask (``mkstemp`` would give 0600, and the final file
    would inherit that after ``os.replace``).
    """
    while True:
        tmp = _sibling_name(path, ".tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _make_sibling_dir(path: Path, suffix: str) -> Path:
    """A new empty directory beside ``path`` (mode 0o777 minus umask, unlike ``mkdtemp``)."""
    while True:
        folder = _sibling_name(path, suffix)
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def _fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry lives in the parent directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def replaced_file(path: PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write; once the block succeeds it replaces
    ``path`` in one rename. On an error nothing is left behind and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # `--json runs/new/report.json` just works
    with _temp_beside(path) as tmp:
        yield tmp
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new, never a mix."""
    with replaced_file(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def replaced_directory(directory: PathLike) -> Iterator[Path]:
    """Yield a new empty directory beside ``directory`` to fill; once the block succeeds
    it is swapped in for ``directory`` (an old one is removed). On an error it is deleted
    and ``directory`` is untouched. Callers check first that replacing is allowed."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = _make_sibling_dir(directory, ".tmp")
    try:
        yield staging
        _swap_in(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _json_default(obj: Any) -> Any:
    """Let numpy / torch scalars and arrays through json.dumps via ``tolist()``."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def to_json_text(obj: Any) -> str:
    """The project's JSON style: indent 2, keys in insertion order, trailing newline."""
    return json.dumps(obj, indent=2, default=_json_default) + "\n"


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Serialise first, then write atomically: a serialisation error leaves ``path`` untouched."""
    atomic_write_bytes(path, to_json_text(obj).encode("utf-8"))


def _cpu_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors with no shared storage (safetensors refuses aliases)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def atomic_save_safetensors(
    path: PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save ``tensors`` (moved to CPU, made contiguous) as one safetensors file, atomically."""
    atomic_write_bytes(path, save_bytes(_cpu_tensors(tensors), metadata=metadata))


# --------------------------------------------------------------------------- safe loads


def _require_file(path: Path) -> None:
    if not path.exists():
        raise _fail(path, "file not found")
    if not path.is_file():
        raise _fail(path, "not a regular file")


def load_safetensors(path: PathLike) -> dict[str, Tensor]:
    """Load every tensor of a safetensors file; FormatError if missing, truncated or corrupt."""
    return _read_safetensors(Path(path))[0]


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and header metadata. safetensors raises assorted errors on bad files; unify them."""
    _require_file(path)
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as err:  # SafetensorError, OSError, RuntimeError, ValueError, ...
        raise _fail(
            path, f"not a readable safetensors file (truncated or corrupt?): {err}"
        ) from err
    return tensors, dict(metadata)


def load_json(path: PathLike) -> dict:
    """Load a JSON object; FormatError if missing, unreadable, invalid or not an object."""
    path = Path(path)
    _require_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise _fail(path, f"cannot read: {err}") from err
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise _fail(
            path, f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from err
    if not isinstance(obj, dict):
        raise _fail(path, f"expected a JSON object, found {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------- trained directory


@dataclass
class LevelWeights:
    """One level's parameters in the model's scaled space (see :mod:`hsae.model`)."""

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
        raise _fail(directory, f"scale must be a positive finite number, got {scale}")
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
        raise _fail(directory, "exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / "hsae.json").is_file():
        raise _fail(
            directory, "exists and is not an HSAE directory (no hsae.json); refusing to replace it"
        )


def _swap_in(staging: Path, directory: Path) -> None:
    """Rename ``staging`` to ``directory``; an old one is moved aside first and removed after."""
    aside: Path | None = None
    if directory.exists():
        aside = _make_sibling_dir(directory, ".old")
        os.replace(directory, aside)  # a directory may replace an empty one
    try:
        os.replace(staging, directory)
    except BaseException:
        if aside is not None:
            os.replace(aside, directory)
        raise
    _fsync_dir(directory.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def load_trained(directory: PathLike) -> tuple[list[LevelWeights], list[Tensor], float, dict]:
    """Read a trained HSAE directory back into the model's scaled space.

    Returns ``(levels, parents, scale, header)`` where ``parents`` has one LongTensor per
    level pair (length L - 1, as :func:`save_trained` takes it) and ``header`` is hsae.json.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise _fail(directory, "not found or not a directory")
    header = load_json(directory / "hsae.json")
    d_in, sizes, scale = _check_header(directory / "hsae.json", header)
    levels = [_read_level(directory / f"level_{i}", d_in, n, scale) for i, n in enumerate(sizes)]
    parents = _read_hierarchy(directory / "hierarchy.json", sizes)
    return levels, parents, scale, header


def _check_header(path: Path, header: dict) -> tuple[int, list[int], float]:
    if header.get("format") != TRAINED_FORMAT:
        raise _fail(path, f"format is {header.get('format')!r}, expected {TRAINED_FORMAT!r}")
    d_in, sizes, scale = header.get("d_in"), header.get("sizes"), header.get("scale")
    if not _is_int(d_in) or d_in <= 0:
        raise _fail(path, f"d_in must be a positive integer, got {d_in!r}")
    if not isinstance(sizes, list) or not sizes or not all(_is_int(n) and n > 0 for n in sizes):
        raise _fail(path, f"sizes must be a non-empty list of positive integers, got {sizes!r}")
    if (
        not isinstance(scale, (int, float))
        or isinstance(scale, bool)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise _fail(path, f"scale must be a positive number, got {scale!r}")
    return d_in, sizes, float(scale)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_level(folder: Path, d_in: int, n: int, scale: float) -> LevelWeights:
    weights_path = folder / SAE_WEIGHTS_FILE
    tensors = load_safetensors(weights_path)
    problem = _shape_problem(tensors, d_in, n)
    if problem:
        raise _fail(weights_path, problem)
    cfg_path = folder / SAE_CFG_FILE
    cfg = load_json(cfg_path)
    if cfg.get("d_in") != d_in or cfg.get("d_sae") != n:
        raise _fail(
            cfg_path,
            f"d_in/d_sae are {cfg.get('d_in')}/{cfg.get('d_sae')}, hsae.json says {d_in}/{n}",
        )
    if cfg.get("architecture") != "jumprelu":
        raise _fail(cfg_path, f"architecture is {cfg.get('architecture')!r}, expected 'jumprelu'")
    return unfold_scale(tensors, scale)


def _read_hierarchy(path: Path, sizes: list[int]) -> list[Tensor]:
    raw = load_json(path).get("parents")
    if not isinstance(raw, list) or len(raw) != len(sizes) or raw[0] is not None:
        raise _fail(path, f"'parents' must be a list of {len(sizes)} entries starting with null")
    out = []
    for index, values in enumerate(raw[1:], start=1):
        if not isinstance(values, list) or not all(_is_int(v) for v in values):
            raise _fail(path, f"parents of level {index} must be a list of integers")
        tensor = torch.tensor(values, dtype=torch.long)
        try:
            _check_parent_values(f"level {index} parents", tensor, sizes[index], sizes[index - 1])
        except FormatError as err:
            raise _fail(path, str(err)) from None
        out.append(tensor)
    return out


# --------------------------------------------------------------------------- checkpoints


def checkpoint_digest(tensors: dict[str, Tensor], state: dict) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and the state without its own
    digest: resume refuses a checkpoint whose bytes changed after it was written."""
    digest = hashlib.sha256()
    rest = {k: v for k, v in state.items() if k != "sha256"}
    digest.update(json.dumps(rest, sort_keys=True, default=_json_default).encode())
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
    tensors = _cpu_tensors(tensors)
    state = {**state, "format": CHECKPOINT_FORMAT}
    state["sha256"] = checkpoint_digest(tensors, state)
    text = json.dumps(state, default=_json_default)
    atomic_write_bytes(path, save_bytes(tensors, metadata={STATE_KEY: text}))


def load_checkpoint(path: PathLike) -> tuple[dict[str, Tensor], dict]:
    """Tensors and state of a checkpoint; FormatError if missing, corrupt, without state,
    or if its bytes no longer match the checksum written with it."""
    path = Path(path)
    tensors, metadata = _read_safetensors(path)
    if STATE_KEY not in metadata:
        raise _fail(path, f"not an HSAE checkpoint (no {STATE_KEY!r} metadata)")
    try:
        state = json.loads(metadata[STATE_KEY])
    except json.JSONDecodeError as err:
        raise _fail(path, f"checkpoint state is not valid JSON: {err.msg}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise _fail(path, f"checkpoint format is {found!r}, expected {CHECKPOINT_FORMAT!r}")
    if state.get("sha256") != checkpoint_digest(tensors, state):
        raise _fail(path, "checksum mismatch: the checkpoint changed after it was written "
                          "(corrupt); delete it to start over")  # fmt: skip
    return tensors, state
