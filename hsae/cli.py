"""The `hsae` command: train, evaluate, see and judge hierarchical SAEs.

Every field of the config dataclasses is a flag: `--model.sizes 64,128,256`,
`--train.steps 3000`, `--planted.d 64`. A JSON config file (`--config run.json`, with
"model" and "train" sections) sets defaults that flags override.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import math
import sys
import typing
from pathlib import Path

from hsae import io, pipeline
from hsae.config import ConfigError, HSAEConfig, RunConfig, TrainConfig, describe_type
from hsae.data.planted import PlantedConfig
from hsae.evaluation.report_table import format_report
from hsae.interop.posthoc import build_posthoc
from hsae.io import FormatError, atomic_write_json, load_json
from hsae.method import distributed
from hsae.trained import MODEL_DIR, TrainedHSAE

SECTIONS = {"model": HSAEConfig, "train": TrainConfig, "planted": PlantedConfig}


# ---------------------------------------------------------------- dataclasses as flags


def _parse_value(kind, text: str):
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


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (`hsae train: error: ...`), not the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return "required"
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
    return f"default: {shown}"


def add_dataclass_flags(parser: argparse.ArgumentParser, prefix: str, cls: type) -> None:
    group = parser.add_argument_group(f"{prefix} options")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        group.add_argument(
            f"--{prefix}.{f.name}",
            dest=f"{prefix}.{f.name}",
            default=None,
            choices=choices,
            type=lambda text, kind=kind: _parse_value(kind, text),
            metavar=f.name.upper(),
            required=_default_text(f) == "required",
            help=f"({_default_text(f)})",
        )


def overrides(args: argparse.Namespace, prefix: str) -> dict:
    return {
        key.split(".", 1)[1]: value
        for key, value in vars(args).items()
        if key.startswith(prefix + ".") and value is not None
    }


def run_config(args: argparse.Namespace) -> RunConfig:
    data = load_json(args.config) if args.config else {}
    unknown = sorted(set(data) - {"model", "train"})
    if unknown:
        raise ConfigError(f"{args.config}: unknown section(s) {', '.join(unknown)}")
    for section in ("model", "train"):
        data[section] = {**data.get(section, {}), **overrides(args, section)}
    cfg = RunConfig.from_dict(data)
    cfg.train.progress = not args.quiet
    cfg.validate()
    return cfg


def source_from_args(args: argparse.Namespace) -> pipeline.Source:
    return pipeline.data_source(args.data, args.eval_frac, overrides(args, "planted"))


# ---------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> None:
    if args.eval_tokens < 0:
        raise ValueError(f"--eval-tokens must be >= 0 (0 skips evaluation), got {args.eval_tokens}")
    cfg = run_config(args)
    pipeline.check_new_run(args.out, args.resume, args.overwrite)
    source = source_from_args(args)
    result = pipeline.train(cfg, source, args.out, resume=args.resume)
    if not distributed.is_main():
        return
    print(
        f"trained {result.summary['steps']} steps in {result.summary['seconds']:.0f} s; "
        f"model written to {Path(args.out) / MODEL_DIR}"
    )
    if args.eval_tokens:
        report = pipeline.evaluate_model(
            result.model, result.hierarchy.parents, source, args.eval_tokens
        )
        print(format_report({"hsae": report}))


def cmd_eval(args: argparse.Namespace) -> None:
    if args.tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
    if args.judge and not args.plots:
        raise ValueError("--judge needs --plots DIR")
    judge = None
    if args.judge:  # read before the evaluation: a bad file fails at once
        from hsae.evaluation.plots import judge_rates

        judge = judge_rates(args.judge, ["hsae", "baseline"])
    trained = TrainedHSAE.load(args.model_dir)
    planted = overrides(args, "planted")
    source = pipeline.measured_source(trained, args.data, args.eval_frac, planted)
    forests = {"model": trained}
    if args.baseline:  # both on the same held-out tokens
        base = TrainedHSAE.load(args.baseline)
        if base.d_in != trained.d_in:
            raise ValueError(f"{args.baseline}: d_in {base.d_in}, but {args.model_dir} "
                             f"has {trained.d_in}")  # fmt: skip
        forests = {"hsae": trained, "baseline": base}
    reports = {name: _eval_one(forest, source, args) for name, forest in forests.items()}
    print(format_report(reports))
    if args.json:
        atomic_write_json(args.json, reports if args.baseline else reports["model"])
        print(f"wrote {args.json}")
    if args.plots:
        from hsae.evaluation.plots import write_comparison

        named = reports if args.baseline else {"hsae": reports["model"]}
        paths = write_comparison(named, args.plots, judge)
        print("wrote " + ", ".join(map(str, paths)))


def _eval_one(trained: TrainedHSAE, source: pipeline.Source, args) -> dict:
    report = pipeline.evaluate_model(trained.model, trained.parents, source, args.tokens)
    if args.splice:
        report["splice"] = pipeline.splice_report(trained, args.splice)
        report["loss_recovered"] = [lv["loss_recovered"] for lv in report["splice"]["levels"]]
    return report


def cmd_cache(args: argparse.Namespace) -> None:
    req = pipeline.CacheRequest(**overrides(args, "cache"))
    cache = pipeline.cache_activations(req, progress=not args.quiet)
    print(
        f"cache {req.out}: {cache.n} activations of width {cache.d} "
        f"({req.model}, layer {req.layer}, text {req.text}), input scale {cache.scale:.4g}"
    )


def cmd_posthoc(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"{out}: exists and is not empty; --overwrite replaces it")
    model, parents = build_posthoc(args.sae_dirs, similarity=args.similarity, tree=args.tree,
                                   unassigned_quantile=args.unassigned_quantile)  # fmt: skip
    config = {"posthoc": {"sources": [str(Path(d).resolve()) for d in args.sae_dirs],
                          "similarity": args.similarity, "tree": args.tree,
                          "unassigned_quantile": args.unassigned_quantile}}  # fmt: skip
    TrainedHSAE(model, parents, config).save(args.out)
    linked = [int((p >= 0).sum()) for p in parents]
    print(
        f"post-hoc forest over {len(args.sae_dirs)} SAEs (sizes {list(model.sizes)}): "
        f"{linked} linked children per level pair; written to {args.out}; "
        f"measure it with: hsae eval {args.out} --data ACTIVATIONS"
    )


def cmd_demo(args: argparse.Namespace) -> None:
    from hsae.demo import run_demo

    run_demo(Path(args.out), steps=args.steps, progress=not args.quiet, seed=args.seed)


# ---------------------------------------------------------------- entry point


def version() -> str:
    try:
        return importlib.metadata.version("hsae")
    except importlib.metadata.PackageNotFoundError:  # a checkout that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hsae", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hsae {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    demo = sub.add_parser("demo", help="train HSAE and the post-hoc baseline on a planted forest")
    demo.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    demo.add_argument("--steps", type=int, default=None, help="training steps per model")
    demo.add_argument("--seed", type=int, default=0, help="training seed (the forest is fixed)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(outputs={"out": "dir"})

    train = sub.add_parser("train", help="train an HSAE")
    train.add_argument("--config", help="JSON file with 'model' and 'train' sections")
    train.add_argument(
        "--data",
        default="planted",
        help="'planted', a .npy file (N, d) or a cache directory (hsae cache)",
    )
    train.add_argument("--out", required=True, help="run directory (checkpoint, model/)")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    train.add_argument("--eval-frac", type=float, default=0.05, help="held-out share of a .npy")
    train.add_argument("--eval-tokens", type=int, default=65536, help="0: skip evaluation")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(outputs={"out": "dir"})
    for prefix, cls in SECTIONS.items():
        add_dataclass_flags(train, prefix, cls)

    cache = sub.add_parser("cache", help="extract a language model's activations to disk")
    add_dataclass_flags(cache, "cache", pipeline.CacheRequest)
    cache.add_argument("--quiet", action="store_true", help="no progress bar")
    cache.set_defaults(outputs={"cache.out": "dir"})

    post = sub.add_parser("posthoc", help="link existing SAE Lens SAEs into a post-hoc forest")
    post.add_argument("sae_dirs", nargs="+", help="SAE Lens directories, smallest first")
    post.add_argument("--out", required=True, help="where to write the forest (HSAE format)")
    post.add_argument("--similarity", default="encoder", choices=["encoder", "decoder"])
    post.add_argument("--tree", default="partial", choices=["partial", "full", "binary"])
    post.add_argument("--unassigned-quantile", type=float, default=0.2)
    post.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    post.set_defaults(outputs={"out": "dir"})

    ev = sub.add_parser("eval", help="measures of a trained HSAE on held-out activations")
    ev.add_argument("model_dir", help="trained directory (or a run directory with model/)")
    ev.add_argument("--data", default=None, help="'planted' or a .npy file; default: training data")
    ev.add_argument("--eval-frac", type=float, default=0.05, help="held-out share of a .npy")
    ev.add_argument("--tokens", type=int, default=65536, help="held-out tokens to evaluate")
    ev.add_argument("--json", help="also write the full report to this JSON file")
    ev.add_argument("--baseline", help="a second forest (e.g. the post-hoc baseline) to compare")
    ev.add_argument("--plots", metavar="DIR", help="save Figure 3-style bar charts (PNG) here")
    ev.add_argument("--judge", help="an hsae judge report: adds the yes-rate panel to --plots")
    ev.add_argument(
        "--splice",
        type=int,
        default=0,
        metavar="N",
        help="loss recovered per level on N held-out texts (models trained on a cache)",
    )
    add_dataclass_flags(ev, "planted", PlantedConfig)
    ev.set_defaults(outputs={"json": "file", "plots": "dir"})
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


# Commands that live beside what they run: each module's register(sub) adds its parser and
# sets `run` (a function of the parsed args) as the parser's default.
COMMAND_MODULES: list[str] = [
    "hsae.explore.collect",
    "hsae.explore.judge",
    "hsae.explore.site",
    "hsae.explore.geometry",
    "hsae.evaluation.plots",
    "hsae.interop.saebench",
]


COMMANDS = {
    "demo": cmd_demo,
    "train": cmd_train,
    "eval": cmd_eval,
    "cache": cmd_cache,
    "posthoc": cmd_posthoc,
}


def check_outputs(args: argparse.Namespace) -> None:
    """Every output a command declared (`parser.set_defaults(outputs={dest: "file"|"dir"})`)
    is checked before the command computes anything."""
    for dest, kind in getattr(args, "outputs", {}).items():
        if getattr(args, dest, None):
            io.check_writable(getattr(args, dest), kind)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_outputs(args)
        run = COMMANDS.get(args.command) or args.run
        run(args)
    except (ConfigError, FormatError, FloatingPointError, ValueError, TypeError) as err:
        print(f"hsae: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"hsae: error: {err.filename or err}: no such file", file=sys.stderr)
        return 2
    except OSError as err:  # permission, disk full, ...: one line, never a traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"hsae: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hsae: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
