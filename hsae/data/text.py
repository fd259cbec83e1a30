"""Text sources for activation extraction: where the documents come from.

:func:`text_source` turns one string spec into an iterator of documents (``str``):

``builtin``
    An offline corpus present on every machine: the docstrings of the installed Python
    standard library (:func:`builtin_corpus`). Nothing is downloaded or cached; the order is
    deterministic for a given Python installation. Good for tests and smoke runs.
a local path
    A ``.txt`` file (one document per blank-line-separated paragraph), a ``.jsonl`` file
    (one JSON object per line, the document in field ``text``), or a directory: every
    ``.txt``/``.jsonl`` file under it, recursively, in sorted path order (:func:`local_texts`).
``hf:NAME[:CONFIG][@SPLIT]``
    A Hugging Face ``datasets`` dataset, streamed (:func:`hf_texts`); ``CONFIG`` defaults to
    none and ``SPLIT`` to ``train``. The paper's corpus, MiniPile, is
    ``hf:JeanKaddour/minipile``; e.g. ``hf:wikitext:wikitext-103-raw-v1@validation``.

Why paragraphs for ``.txt``: extraction truncates each document to the context length
(1024 tokens by default), so one document per file would discard everything after the
first 1024 tokens of a long file; paragraphs keep all of the text.

Every problem with a source (missing file, bad JSON line, missing field, dataset that cannot
be loaded) raises :class:`hsae.io.FormatError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from hsae.io import FormatError, one_line

MINIPILE = "hf:JeanKaddour/minipile"
"""The documented default text source for real runs (the paper's corpus)."""

MIN_DOC_CHARS = 40
"""Docstrings shorter than this are not documents ("Return self==value.")."""

_SKIP_MODULES = frozenset(
    {
        "antigravity",  # opens a web browser
        "this",  # prints the Zen of Python
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "readline",  # changes the terminal's line editing
        "rlcompleter",  # installs a readline completer
        "test",  # the regression test suite: huge, slow, side effects
        "ensurepip",
        "lib2to3",
        "pydoc_data",
    }
)
_TEXT_SUFFIXES = (".txt", ".jsonl")


# ---------------------------------------------------------------------------------------
# built-in offline corpus


def builtin_corpus() -> Iterator[str]:
    """Yield the docstrings of the installed standard library, one document per docstring.

    Top-level modules are visited in sorted order of ``sys.stdlib_module_names``, each
    followed by its submodules depth-first in name order (private ``_names``, test suites,
    ``__main__`` modules and modules with import side effects are skipped; so is any module
    that fails to import). In each module: the module docstring, then its own classes and
    functions by name, a class followed by its methods and properties by name. Docstrings
    are cleaned with ``inspect.cleandoc``; those under 40 characters and repeats are skipped.
    """
    seen: set[str] = set()
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES or name.startswith("turtle"):
            continue
        for module in _walk_modules(name):
            for doc in _module_docs(module):
                if doc not in seen:
                    seen.add(doc)
                    yield doc


def _walk_modules(name: str) -> Iterator[ModuleType]:
    """The module, then its submodules depth-first in name order (tests, mains skipped)."""
    module = _import_quietly(name)
    if module is None:
        return
    yield module
    paths = getattr(module, "__path__", None)
    if not paths:
        return
    subs = sorted({info.name for info in pkgutil.iter_modules(list(paths))})
    for sub in subs:
        if not (sub.startswith("_") or sub.startswith("test") or sub in _SKIP_MODULES):
            yield from _walk_modules(f"{name}.{sub}")


def _import_quietly(name: str) -> ModuleType | None:
    """Import a module with warnings and stdout/stderr silenced; None if it fails."""
    sink = io.StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except (Exception, SystemExit):
        return None


def _clean(obj: object) -> str | None:
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return None
    doc = inspect.cleandoc(doc)
    return doc if len(doc) >= MIN_DOC_CHARS else None


def _module_docs(module: ModuleType) -> Iterator[str]:
    docs = [_clean(module)]
    for key, obj in sorted(vars(module).items()):
        if key.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            docs.append(_clean(obj))
            docs.extend(_class_docs(obj))
        elif callable(obj):
            docs.append(_clean(obj))
    yield from (d for d in docs if d is not None)


def _class_docs(cls: type) -> Iterator[str | None]:
    for key, member in sorted(vars(cls).items()):
        if key.startswith("_"):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if callable(member) or isinstance(member, property):
            yield _clean(member)


# ---------------------------------------------------------------------------------------
# local files


def local_texts(path: str | os.PathLike, field: str = "text") -> Iterator[str]:
    """Documents from a ``.txt``/``.jsonl`` file or a directory of them (sorted, recursive).

    ``.txt``: one document per paragraph (lines separated by blank lines), stripped.
    ``.jsonl``: one JSON object per non-blank line; the document is its string ``field``.
    The path is checked now; bad lines raise :class:`FormatError` while iterating.
    """
    files = _text_files(Path(path))
    return _iter_files(files, field)


def _text_files(path: Path) -> list[Path]:
    if not path.exists():
        raise FormatError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES)
        if not files:
            raise FormatError(f"{path}: directory holds no .txt or .jsonl files")
        return files
    if path.suffix not in _TEXT_SUFFIXES:
        raise FormatError(f"{path}: unsupported text file (expected .txt or .jsonl)")
    return [path]


def _iter_files(files: list[Path], field: str) -> Iterator[str]:
    for file in files:
        if file.suffix == ".jsonl":
            yield from _jsonl_docs(file, field)
        else:
            yield from _txt_docs(file)


def _txt_docs(file: Path) -> Iterator[str]:
    lines: list[str] = []
    with _open_text(file) as handle:
        for line in handle:
            if line.strip():
                lines.append(line.rstrip("\n"))
            elif lines:
                yield "\n".join(lines).strip()
                lines = []
    if lines:
        yield "\n".join(lines).strip()


def _jsonl_docs(file: Path, field: str) -> Iterator[str]:
    with _open_text(file) as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield _jsonl_field(line, field, f"{file}:{number}")


def _jsonl_field(line: str, field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{where}: bad JSON: {exc.msg}") from None
    if not isinstance(record, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise FormatError(f"{where}: no field {field!r}")
    value = record[field]
    if not isinstance(value, str):
        raise FormatError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
    return value


def _open_text(file: Path):
    try:
        return open(file, encoding="utf-8", errors="replace")  # noqa: SIM115
    except OSError as exc:
        raise FormatError(f"{file}: cannot read: {one_line(exc)}") from None


# ---------------------------------------------------------------------------------------
# Hugging Face datasets


def hf_texts(
    name: str, config: str | None = None, split: str = "train", field: str = "text"
) -> Iterator[str]:
    """Stream documents from ``datasets.load_dataset(name, config, split=split, streaming=True)``.

    The dataset is opened now (errors surface at the call); records are read lazily. Any
    failure, when opening or while streaming, becomes a one-line :class:`FormatError`.
    """
    try:
        import datasets

        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:
        raise FormatError(f"cannot load dataset {name}: {one_line(exc)}") from None
    return _iter_records(dataset, name, field)


def _iter_records(dataset, name: str, field: str) -> Iterator[str]:
    records = iter(dataset)
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as exc:
            raise FormatError(f"cannot read dataset {name}: {one_line(exc)}") from None
        if field not in record:
            raise FormatError(f"dataset {name}: no field {field!r} (has {sorted(record)})")
        value = record[field]
        if isinstance(value, str):
            yield value


# ---------------------------------------------------------------------------------------
# specs


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``"hf:NAME[:CONFIG][@SPLIT]"`` -> ``(name, config or None, split or "train")``."""
    body = spec.removeprefix("hf:")
    body, at, split = body.rpartition("@") if "@" in body else (body, "", "train")
    name, _, config = body.partition(":")
    if not name or (at and not split):
        raise FormatError(f"bad dataset spec {spec!r}: expected hf:NAME[:CONFIG][@SPLIT]")
    return name, config or None, split


def text_source(spec: str, field: str = "text") -> Iterator[str]:
    """Documents from ``builtin``, a local path, or ``hf:NAME[:CONFIG][@SPLIT]`` (see module doc).

    ``field`` names the text field of ``.jsonl`` records and of dataset records.
    """
    if spec == "builtin":
        return builtin_corpus()
    if spec.startswith("hf:"):
        name, config, split = parse_hf_spec(spec)
        return hf_texts(name, config, split=split, field=field)
    if Path(spec).exists():
        return local_texts(spec, field=field)
    raise FormatError(
        f"unknown text source {spec!r}: expected 'builtin', an existing path, "
        "or hf:NAME[:CONFIG][@SPLIT]"
    )
