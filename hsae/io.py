"""Files on disk: atomic writes, safe loads, output checks and run locks.

Three rules hold for everything here:

* nothing is loaded with pickle: tensors travel in safetensors, everything else in JSON;
* every write is atomic: a temp file in the same directory is written, flushed and
  fsynced, then moved over the target with ``os.replace``, so a crash leaves either the
  old file or the new one, never half of one (a whole directory is swapped likewise);
* bad input raises :class:`FormatError`, a ``ValueError`` whose one-line message names the
  file and the problem, instead of a traceback from deep inside a parser.

The formats built on these: the trained directory (`hsae.trained_dir`), checkpoints
(`hsae.method.checkpoint`), the activation cache (`hsae.data.cache`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save as save_bytes
from torch import Tensor

PathLike = str | os.PathLike


def one_line(problem: BaseException | str) -> str:
    """An exception's message (or any text) folded onto one line, at most 300 characters."""
    text = " ".join(str(problem).split())
    if not text and isinstance(problem, BaseException):
        text = type(problem).__name__
    return text[:300]


class FormatError(ValueError):
    """A file is missing, truncated, corrupt or inconsistent; the message is one line."""


def format_error(path: PathLike, problem: str) -> FormatError:
    """Build a one-line FormatError naming ``path``."""
    text = " ".join(str(problem).split())
    return FormatError(f"{os.fspath(path)}: {text}")


def check_writable(path: PathLike, kind: str) -> None:
    """FormatError now, before any compute, if ``path`` cannot be written as a ``kind``
    ("file" or "dir"): an existing path of the other kind, an ancestor that is a file, or
    a folder this process may not write in (atomic writes need the parent too)."""
    path = Path(path)
    if kind == "dir" and path.exists() and not path.is_dir():
        raise format_error(path, "exists and is not a directory")
    if kind == "file" and path.is_dir():
        raise format_error(path, "is a directory; expected a file name")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise format_error(path, f"cannot be created: {ancestor} is a file, not a directory")
    for folder in [ancestor] + ([path] if kind == "dir" and path.exists() else []):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise format_error(path, f"cannot be written: no write permission in {folder}")


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
        raise format_error(directory, f"another hsae process (pid {holder}) is writing this run; "
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
    path.parent.mkdir(parents=True, exist_ok=True)  # `--out runs/new/report.json` just works
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


def json_default(obj: Any) -> Any:
    """Let numpy / torch scalars and arrays through json.dumps via ``tolist()``."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def to_json_text(obj: Any) -> str:
    """The project's JSON style: indent 2, keys in insertion order, trailing newline."""
    return json.dumps(obj, indent=2, default=json_default) + "\n"


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Serialise first, then write atomically: a serialisation error leaves ``path`` untouched."""
    atomic_write_bytes(path, to_json_text(obj).encode("utf-8"))


def cpu_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
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
    atomic_write_bytes(path, save_bytes(cpu_tensors(tensors), metadata=metadata))


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


# --------------------------------------------------------------------------- safe loads


def require_file(path: Path) -> None:
    if not path.exists():
        raise format_error(path, "file not found")
    if not path.is_file():
        raise format_error(path, "not a regular file")


def load_safetensors(path: PathLike) -> dict[str, Tensor]:
    """Load every tensor of a safetensors file; FormatError if missing, truncated or corrupt."""
    return read_safetensors(Path(path))[0]


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and header metadata. safetensors raises assorted errors on bad files; unify them."""
    require_file(path)
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as err:  # SafetensorError, OSError, RuntimeError, ValueError, ...
        raise format_error(
            path, f"not a readable safetensors file (truncated or corrupt?): {err}"
        ) from err
    return tensors, dict(metadata)


def load_json(path: PathLike) -> dict:
    """Load a JSON object; FormatError if missing, unreadable, invalid or not an object."""
    path = Path(path)
    require_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise format_error(path, f"cannot read: {err}") from err
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise format_error(
            path, f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from err
    if not isinstance(obj, dict):
        raise format_error(path, f"expected a JSON object, found {type(obj).__name__}")
    return obj
