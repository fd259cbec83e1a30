"""One CLI convention: every command's flags come from its options dataclass."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest
from test_cli import assert_one_line_error, run_cli

from hsae.cli import build_parser
from hsae.config import ConfigError, HSAEConfig
from hsae.flags import (
    Command,
    add_command,
    cli_fields,
    default_of,
    field_docs,
    option,
    options_from,
)


def all_commands() -> list[tuple[str, argparse.ArgumentParser, Command]]:
    """(name, parser, command) of every `hsae` command, nested groups included."""
    found = []

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    spec = sub.get_default("command_spec")
                    if spec is not None:
                        found.append((f"{prefix}{name}", sub, spec))
                    walk(sub, f"{prefix}{name} ")

    walk(build_parser(), "")
    return found


def test_every_command_is_a_dataclass():
    names = [name for name, _, _ in all_commands()]
    assert set(names) >= {"demo", "train", "eval", "cache", "posthoc", "contexts", "judge",
                          "explore", "geometry", "plots compare", "plots ablation",
                          "plots curves", "saebench"}  # fmt: skip
    for _, _, spec in all_commands():
        assert dataclasses.is_dataclass(spec.options)


def test_help_shows_each_fields_default(capsys):
    """--help of every command names every field and its default, read from the dataclass."""
    for name, parser, spec in all_commands():
        text = " ".join(parser.format_help().split())
        for f in cli_fields(spec.options):
            if f.metadata.get("positional"):
                assert f.name in text, (name, f.name)
                continue
            assert f"--{f.name}" in text, (name, f.name)
            default = default_of(f)
            if default is dataclasses.MISSING:
                assert "(required)" in text
            elif default not in (None, False):
                shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
                assert f"(default: {shown})" in text, (name, f.name, default)


def test_one_spelling_across_commands():
    """The synonyms the commands once used are gone; the shared meanings share one name."""
    flags = {
        name: {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
        for name, parser, _ in all_commands()
    }
    every = set().union(*flags.values())
    assert not every & {"--tokens", "--json", "--lm", "--llm_dtype", "--llm-dtype",
                        "--llm_batch_size", "--llm-batch-size", "--labels_out"}  # fmt: skip
    for name in ("cache", "contexts", "saebench"):
        assert {"--dtype", "--batch_size", "--model"} <= flags[name], name
    for name in ("train", "eval", "geometry"):
        assert {"--eval_tokens", "--eval_frac"} <= flags[name], name
    assert all("--out" in f for n, f in flags.items() if n != "plots"), flags


def test_dash_spelling_is_the_same_flag(tmp_path, capsys):
    for flag in ("--eval_tokens", "--eval-tokens"):
        rc, _, err = run_cli(["eval", tmp_path / "x", flag, "0"], capsys)
        assert rc == 2
        assert_one_line_error(err, "--eval_tokens must be >= 1")


@dataclass(kw_only=True)
class Toy:
    path: str = option(help="where", positional=True)
    count: int = option(3, "how many", low=1, high=9)
    ratio: float | None = option(None, "a share", low=0.0)
    flag: bool = option(False, "a switch")
    out: str = option(help="written", output="file")

    def validate(self) -> None:
        if self.ratio is not None and self.count == 9:
            raise ConfigError("count 9 takes no ratio")


def toy(argv: list[str]) -> Toy:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    command = Command("toy", "a toy", Toy, lambda opts: None, sections={"model": HSAEConfig})
    add_command(sub, command)
    return options_from(parser.parse_args(["toy", *argv]), command)


def test_options_from_flags_with_defaults_ranges_and_sections():
    opts = toy(["p", "--out", "o", "--model.rho", "0.5"])
    assert (opts.path, opts.count, opts.ratio, opts.flag, opts.out) == ("p", 3, None, False, "o")
    assert opts.sections == {"model": {"rho": 0.5}}  # only what was set
    assert toy(["p", "--out", "o", "--count", "9", "--flag"]).flag is True
    with pytest.raises(ConfigError, match="--count must be <= 9, got 10"):
        toy(["p", "--out", "o", "--count", "10"])
    with pytest.raises(ConfigError, match="--ratio must be >= 0.0, got -0.5"):
        toy(["p", "--out", "o", "--ratio", "-0.5"])
    with pytest.raises(ConfigError, match="count 9 takes no ratio"):
        toy(["p", "--out", "o", "--count", "9", "--ratio", "0.1"])


def test_field_docs_read_the_docstring_under_each_field():
    docs = field_docs(HSAEConfig)
    assert docs["rho"] == "Weight of the parent-children constraint loss L_PC"
    assert docs["sizes"].startswith("Dictionary size n_l of each level")
