"""Dataclasses as command-line flags: the one convention of every `hsae` command.

A command is an options dataclass and a function of it. Each field is a flag spelt as the
field is named (`--eval_tokens`; `--eval-tokens` is accepted too), its default written once,
in the field, and shown by `--help`. Config sections (`HSAEConfig`, `TrainConfig`, ...) become
`--section.field` flags. Ranges declared on a field (`low=`, `high=`) and the dataclass's own
`validate()` are checked before the command runs, so bad input fails in one line before any
work.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import math
import re
import textwrap
import types
import typing
from collections.abc import Callable
from typing import Any

from hsae.config import ConfigError, describe_type

MISSING = dataclasses.MISSING


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    positional: bool = False,
    low: float | None = None,
    high: float | None = None,
    output: str | None = None,
    metavar: str | None = None,
) -> Any:
    """A dataclass field that is also a flag. `output` ("file" or "dir") marks a path the
    command writes: it is checked writable before the command computes anything."""
    meta = {"help": help, "positional": positional, "low": low, "high": high,
            "output": output, "metavar": metavar}  # fmt: skip
    if default is MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def model_dir_option() -> Any:
    """The positional trained directory that most commands read: one wording everywhere."""
    return option(help="trained directory (or a run directory with model/)", positional=True)


@dataclasses.dataclass(frozen=True)
class Command:
    """One `hsae NAME` (or `hsae GROUP NAME`): its options dataclass and what runs it.

    `sections` adds `--prefix.field` flags for whole config dataclasses; what the user set
    reaches `run` as `opts.sections[prefix]`, a dict of overrides."""

    name: str
    help: str
    options: type
    run: Callable[[Any], None]
    sections: dict[str, type] = dataclasses.field(default_factory=dict)
    description: str | None = None


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (`hsae train: error: ...`), not the whole usage text."""

    def error(self, message: str):
        message = re.sub(r"(--[\w.]+)/--[\w.-]+", r"\1", message)  # the flag, not its alias
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.HelpFormatter):
    """Lists each flag under its one spelling (the dash alias stays out of `--help`)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        flag = next((o for o in action.option_strings if o.startswith("--")),
                    action.option_strings[0])  # fmt: skip
        if action.nargs == 0:
            return flag
        return f"{flag} {self._format_args(action, self._get_default_metavar_for_optional(action))}"


# ---------------------------------------------------------------- parsing one value


def _unwrap(kind) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of `X | None`."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return kind, False


def parse_value(kind, text: str):
    """A flag's text as the field's type; argparse turns the error into a message."""
    origin = typing.get_origin(kind)
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    try:
        if origin is tuple:
            return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
        if origin is typing.Literal:
            return text
        value = kind(text)
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        return value
    except ValueError:
        what = "comma-separated integers" if origin is tuple else describe_type(kind)
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _shown(default: Any) -> str:
    """How --help shows a default (nothing for None: the help text says what it means)."""
    if default is None:
        return ""
    if default is MISSING:
        return "(required)"
    if isinstance(default, tuple):
        return "(default: " + ",".join(map(str, default)) + ")"
    return f"(default: {default})"


# ---------------------------------------------------------------- building a parser


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The first sentence of each field's docstring (the string under it in the class body),
    so that config sections document their flags where their fields are defined."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError, IndexError, AttributeError):
            continue
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):  # fmt: skip
                text = " ".join(after.value.value.split())
                docs[node.target.id] = re.split(r"(?<=[a-z0-9)])\. ", text)[0].rstrip(".")
    return docs


def cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name != "sections"]


def add_flags(parser: argparse.ArgumentParser, cls: type, prefix: str | None = None) -> None:
    """One flag per field of `cls` (`--prefix.field` for a config section)."""
    group = parser.add_argument_group(f"{prefix} options") if prefix else parser
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls):
        kind, _ = _unwrap(hints[f.name])
        meta, default = f.metadata, default_of(f)
        text = meta.get("help") or field_docs(cls).get(f.name, "")
        dest = f"{prefix}.{f.name}" if prefix else f.name
        if meta.get("positional"):
            nargs = "+" if typing.get_origin(kind) is list else None
            inner = typing.get_args(kind)[0] if nargs else kind
            group.add_argument(dest, nargs=nargs, help=text,
                               type=lambda t, k=inner: parse_value(k, t))  # fmt: skip
            continue
        flags = [f"--{dest}"] + ([f"--{dest.replace('_', '-')}"] if "_" in dest else [])
        common = {"dest": dest, "default": argparse.SUPPRESS}
        if kind is bool and default is False and prefix is None:
            group.add_argument(*flags, action="store_true", help=text, **common)
            continue
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        group.add_argument(
            *flags,
            type=lambda t, k=kind: parse_value(k, t),
            choices=choices,
            required=default is MISSING,
            metavar=meta.get("metavar") or f.name.upper(),
            help=" ".join(filter(None, (text, _shown(default)))),
            **common,
        )


def add_command(sub: argparse._SubParsersAction, command: Command) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        command.name,
        help=command.help,
        description=command.description or command.help,
        formatter_class=HelpFormatter,
    )
    add_flags(parser, command.options)
    for prefix, cls in command.sections.items():
        add_flags(parser, cls, prefix)
    parser.set_defaults(command_spec=command)
    return parser


# ---------------------------------------------------------------- from flags to options


def options_from(args: argparse.Namespace, command: Command) -> Any:
    """The command's options dataclass from parsed flags, ranges and `validate()` checked."""
    given = vars(args)
    values = {f.name: given[f.name] for f in cli_fields(command.options) if f.name in given}
    opts = command.options(**values)
    if command.sections:
        opts.sections = {p: section_overrides(args, p) for p in command.sections}
    check_ranges(opts)
    if hasattr(opts, "validate"):
        opts.validate()
    return opts


def section_overrides(args: argparse.Namespace, prefix: str) -> dict:
    """The `--prefix.field` flags the user set, as {field: value}."""
    return {
        key.split(".", 1)[1]: value
        for key, value in vars(args).items()
        if key.startswith(prefix + ".")
    }


def check_ranges(opts: Any) -> None:
    for f in cli_fields(type(opts)):
        value, low, high = getattr(opts, f.name), f.metadata.get("low"), f.metadata.get("high")
        if value is None or isinstance(value, bool) or (low is None and high is None):
            continue
        if low is not None and value < low:
            raise ConfigError(f"--{f.name} must be >= {low}, got {value}")
        if high is not None and value > high:
            raise ConfigError(f"--{f.name} must be <= {high}, got {value}")


def outputs(opts: Any) -> dict[str, str]:
    """{path: "file" | "dir"} of every output the user named, for checking before work."""
    return {
        getattr(opts, f.name): f.metadata["output"]
        for f in cli_fields(type(opts))
        if f.metadata.get("output") and getattr(opts, f.name)
    }
