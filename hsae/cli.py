"""The `hsae` command: train, evaluate, see and judge hierarchical SAEs.

Every command's options are a dataclass and every field a flag named as the field
(`hsae eval RUN --eval_tokens 8192`); config sections are `--model.sizes 64,128,256`,
`--train.steps 3000`, `--planted.d 64` (hsae/flags.py). A JSON config file
(`--config run.json`, with "model" and "train" sections) sets defaults that flags override.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hsae import io, pipeline
from hsae.config import (
    ConfigError,
    HSAEConfig,
    ParentPick,
    RunConfig,
    TrainConfig,
    read_config_file,
)
from hsae.data.planted import PlantedConfig
from hsae.evaluation.report_table import format_report
from hsae.flags import (
    Command,
    HelpFormatter,
    Parser,
    add_command,
    model_dir_option,
    option,
    options_from,
    outputs,
)
from hsae.interop.posthoc import (
    LINK_ROWS,
    firing_forest,
    levels_model,
    link_levels,
    read_sae_lens,
)
from hsae.io import FormatError, atomic_write_json
from hsae.method import distributed
from hsae.trained import MODEL_DIR, TrainedHSAE

# Shared option texts: one wording for one meaning across commands.
DATA = "'planted', a .npy file (N, d) or a cache directory (hsae cache)"
EVAL_FRAC = "held-out share of a .npy file"
BASELINE = "a second forest (e.g. the post-hoc baseline) to compare"


# ---------------------------------------------------------------- train


@dataclass(kw_only=True)
class TrainOptions:
    out: str = option(help="run directory (checkpoint, model/, train_log.jsonl)", output="dir")
    data: str = option("planted", DATA)
    config: str | None = option(None, "JSON file with 'model' and 'train' sections")
    resume: bool = option(False, "continue from the checkpoint")
    overwrite: bool = option(False, "replace a run already in --out")
    eval_frac: float = option(0.05, EVAL_FRAC, low=0.0, high=0.5)
    eval_tokens: int = option(65536, "held-out tokens evaluated after training (0: none)", low=0)
    quiet: bool = option(False, "no progress bar")
    sections: dict = field(default_factory=dict)


def run_config(opts: TrainOptions) -> RunConfig:
    """The config file's sections, then the flags over them."""
    data = read_config_file(opts.config) if opts.config else {}
    for section in ("model", "train"):
        data[section] = {**data.get(section, {}), **opts.sections[section]}
    cfg = RunConfig.from_dict(data)
    cfg.train.progress = not opts.quiet
    cfg.validate()
    return cfg


def cmd_train(opts: TrainOptions) -> None:
    cfg = run_config(opts)
    pipeline.check_new_run(opts.out, opts.resume, opts.overwrite)
    source = pipeline.data_source(opts.data, opts.eval_frac, opts.sections["planted"])
    result = pipeline.train(cfg, source, opts.out, resume=opts.resume)
    if not distributed.is_main():
        return
    print(
        f"trained {result.summary['steps']} steps in {result.summary['seconds']:.0f} s "
        f"(method {cfg.model.method}, links by {cfg.model.link_rule}); "
        f"model written to {Path(opts.out) / MODEL_DIR}"
    )
    if cfg.model.prune:
        print(pruned_text(result.summary["pruned_levels"]))
    if opts.eval_tokens:
        report = pipeline.evaluate_model(
            result.model, result.hierarchy.parents, source, opts.eval_tokens
        )
        print(format_report({"hsae": report}))


# ---------------------------------------------------------------- eval


@dataclass(kw_only=True)
class EvalOptions:
    model_dir: str = model_dir_option()
    data: str | None = option(None, "'planted' or a .npy file (default: the training data)")
    eval_frac: float = option(0.05, EVAL_FRAC, low=0.0, high=0.5)
    eval_tokens: int = option(65536, "held-out tokens to evaluate", low=1)
    out: str | None = option(None, "also write the full report to this JSON file", output="file")
    baseline: str | None = option(None, BASELINE)
    plots: str | None = option(None, "save Figure 3-style bar charts (PNG) here", output="dir")
    judge: str | None = option(None, "an hsae judge report: adds the yes-rate panel to --plots")
    splice: int = option(0, "loss recovered per level on N held-out texts (cache-trained "
                         "models)", low=0, metavar="N")  # fmt: skip
    sections: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.judge and not self.plots:
            raise ConfigError("--judge needs --plots DIR")


def cmd_eval(opts: EvalOptions) -> None:
    judge = None
    if opts.judge:  # read before the evaluation: a bad file fails at once
        from hsae.evaluation.plots import judge_rates

        judge = judge_rates(opts.judge, ["hsae", "baseline"])
    trained = TrainedHSAE.load(opts.model_dir)
    source = pipeline.measured_source(trained, opts.data, opts.eval_frac, opts.sections["planted"])
    forests = {"model": trained}
    if opts.baseline:  # both on the same held-out tokens
        base = TrainedHSAE.load(opts.baseline)
        if base.d_in != trained.d_in:
            raise ValueError(f"{opts.baseline}: d_in {base.d_in}, but {opts.model_dir} "
                             f"has {trained.d_in}")  # fmt: skip
        forests = {"hsae": trained, "baseline": base}
    reports = {name: _eval_one(forest, source, opts) for name, forest in forests.items()}
    print(format_report(reports))
    if opts.out:
        atomic_write_json(opts.out, reports if opts.baseline else reports["model"])
        print(f"wrote {opts.out}")
    if opts.plots:
        from hsae.evaluation.plots import write_comparison

        named = reports if opts.baseline else {"hsae": reports["model"]}
        paths = write_comparison(named, opts.plots, judge)
        print("wrote " + ", ".join(map(str, paths)))


def _eval_one(trained: TrainedHSAE, source: pipeline.Source, opts: EvalOptions) -> dict:
    report = pipeline.evaluate_model(trained.model, trained.parents, source, opts.eval_tokens)
    if opts.splice:
        report["splice"] = pipeline.splice_report(trained, opts.splice)
        report["loss_recovered"] = [lv["loss_recovered"] for lv in report["splice"]["levels"]]
    return report


# ---------------------------------------------------------------- cache, posthoc, demo


def cmd_cache(req: pipeline.CacheRequest) -> None:
    cache = pipeline.cache_activations(req, progress=not req.quiet)
    print(
        f"cache {req.out}: {cache.n} activations of width {cache.d} "
        f"({req.model}, layer {req.layer}, text {req.text}), input scale {cache.scale:.4g}"
    )


def pruned_text(pruned: list[int]) -> str:
    """What pruning did (hsae.method.prune), as `hsae train` and `hsae posthoc` print it."""
    taken = ", ".join(f"level {lv} from level {lv + 1}" for lv in pruned)
    return f"pruned: {taken or 'none (every level explains more with its own features)'}"


@dataclass(kw_only=True)
class PosthocOptions:
    sae_dirs: list[str] = option(help="SAE Lens directories, smallest first", positional=True)
    out: str = option(help="where to write the forest (HSAE format)", output="dir")
    data: str | None = option(None, "a .npy file (N, d) or a cache directory (hsae cache): "
                              "link by firing on its rows")  # fmt: skip
    similarity: Literal["auto", "encoder", "decoder", "conditional"] = option(
        "auto", "how a child finds its parent (auto: conditional with --data, else encoder)"
    )
    parent_pick: ParentPick = option("specific", "conditional links: the most likely or the "
                                     "most specific parent")  # fmt: skip
    prune: bool = option(False, "take a coarse level from the finer level's strongest "
                         "features where they fit as well (needs --data)")  # fmt: skip
    prune_tolerance: float = option(0.0, "FVE a pruned level may lose", low=0.0)
    link_tokens: int = option(LINK_ROWS, "rows of --data whose firing is counted", low=1)
    eval_frac: float = option(0.05, f"{EVAL_FRAC} or cache, left out of the links for "
                              "hsae eval", low=0.0, high=0.5)  # fmt: skip
    tree: Literal["partial", "full", "binary"] = option("partial", "which cosine links are kept")
    unassigned_quantile: float = option(0.2, "share of children left without a parent "
                                        "(cosine links)", low=0.0, high=1.0)  # fmt: skip
    overwrite: bool = option(False, "replace what --out holds")
    quiet: bool = option(False, "no progress bar")

    @property
    def link_rule(self) -> str:
        if self.similarity == "auto":
            return "conditional" if self.data else "encoder"
        return self.similarity

    def validate(self) -> None:
        if self.link_rule == "conditional" and not self.data:
            raise ConfigError("conditional links count firing: pass --data ACTIVATIONS")
        if self.prune and self.link_rule != "conditional":
            raise ConfigError("--prune needs --data ACTIVATIONS and conditional links (a cosine "
                              "link would join a kept feature to its own copy)")  # fmt: skip


def cmd_posthoc(opts: PosthocOptions) -> None:
    out = Path(opts.out)
    if out.exists() and any(out.iterdir()) and not opts.overwrite:
        raise ConfigError(f"{out}: exists and is not empty; --overwrite replaces it")
    levels = [read_sae_lens(d) for d in opts.sae_dirs]
    settings = {"sources": [str(Path(d).resolve()) for d in opts.sae_dirs],
                "similarity": opts.link_rule}  # fmt: skip
    config = {"posthoc": settings}
    if opts.link_rule == "conditional":
        model = levels_model(levels)
        source = pipeline.file_source(opts.data, opts.eval_frac, model.d_in)
        rows = pipeline.firing_rows(source, opts.link_tokens, progress=not opts.quiet)
        pruned, parents = firing_forest(model, rows, opts.parent_pick, opts.prune,
                                        opts.prune_tolerance)  # fmt: skip
        settings.update(parent_pick=opts.parent_pick, link_tokens=opts.link_tokens,
                        prune=opts.prune, prune_tolerance=opts.prune_tolerance,
                        pruned_levels=pruned)  # fmt: skip
        config["data"] = source.description  # `hsae eval OUT` measures on its held-out rows
        counted = min(opts.link_tokens, source.train_rows.n)
        how = f"links by firing on {counted:,} rows of {opts.data}"
    else:
        model, parents = link_levels(levels, opts.link_rule, opts.tree, opts.unassigned_quantile)
        settings.update(tree=opts.tree, unassigned_quantile=opts.unassigned_quantile)
        how = f"links by {opts.link_rule} cosine"
    TrainedHSAE(model, parents, config).save(opts.out)
    linked = [int((p >= 0).sum()) for p in parents]
    print(f"post-hoc forest over {len(opts.sae_dirs)} SAEs (sizes {list(model.sizes)}), {how}")
    if opts.prune:
        print(pruned_text(pruned))
    data = "" if opts.data else " --data ACTIVATIONS"
    print(f"{linked} linked children per level pair; written to {opts.out}; "
          f"measure it with: hsae eval {opts.out}{data}")  # fmt: skip


@dataclass(kw_only=True)
class DemoOptions:
    out: str = option("demo_out", "output directory", output="dir")
    steps: int | None = option(None, "training steps per model (default: the demo's)", low=1)
    seed: int = option(0, "training seed (the forest is fixed)")
    quiet: bool = option(False, "no progress bars")


def cmd_demo(opts: DemoOptions) -> None:
    from hsae.demo import run_demo

    run_demo(Path(opts.out), steps=opts.steps, progress=not opts.quiet, seed=opts.seed)


OWN_COMMANDS = [
    Command(
        "demo",
        "train hsae, the paper's HSAE and the post-hoc baseline on a planted forest",
        DemoOptions,
        cmd_demo,
    ),
    Command(
        "train",
        "train an HSAE",
        TrainOptions,
        cmd_train,
        sections={"model": HSAEConfig, "train": TrainConfig, "planted": PlantedConfig},
    ),
    Command(
        "eval",
        "measures of a trained HSAE on held-out activations",
        EvalOptions,
        cmd_eval,
        sections={"planted": PlantedConfig},
    ),
    Command(
        "cache", "extract a language model's activations to disk", pipeline.CacheRequest, cmd_cache
    ),
    Command(
        "posthoc", "link existing SAE Lens SAEs into a post-hoc forest", PosthocOptions, cmd_posthoc
    ),
]


# ---------------------------------------------------------------- entry point


def version() -> str:
    try:
        return importlib.metadata.version("hsae")
    except importlib.metadata.PackageNotFoundError:  # a checkout that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hsae", description=__doc__.splitlines()[0],
                    formatter_class=HelpFormatter)  # fmt: skip
    parser.add_argument("--version", action="version", version=f"hsae {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in OWN_COMMANDS:
        add_command(sub, command)
    for module in COMMAND_MODULES:
        commands = importlib.import_module(module).COMMANDS
        if isinstance(commands, tuple):  # (group name, help, [Command, ...])
            name, text, members = commands
            group = sub.add_parser(name, help=text, description=text)
            inner = group.add_subparsers(dest="kind", required=True, parser_class=Parser)
            for command in members:
                add_command(inner, command)
        else:
            for command in commands:
                add_command(sub, command)
    return parser


# Commands that live beside what they run: each module's COMMANDS lists its Command(s).
COMMAND_MODULES: list[str] = [
    "hsae.explore.collect",
    "hsae.explore.judge",
    "hsae.explore.site",
    "hsae.explore.geometry",
    "hsae.evaluation.plots",
    "hsae.interop.saebench",
]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command_spec
    try:
        opts = options_from(args, command)
        for path, kind in outputs(opts).items():  # every output checked before any work
            io.check_writable(path, kind)
        command.run(opts)
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
