"""Configuration dataclasses. Each field is also a command-line flag (see `cli.py`).

Defaults are the paper's (section 4, appendix A) unless a comment says otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from hsae.io import PathLike, load_json

Method = Literal["hsae", "paper"]
Similarity = Literal["encoder", "decoder", "coactivation", "conditional"]
ParentPick = Literal["likely", "specific"]
SparsityLoss = Literal["linear", "quadratic"]
Window = Literal["fixed", "encoder"]
TreeVariant = Literal["partial", "full", "binary", "fixed"]
Links = Literal["joint", "posthoc"]
DeadLatents = Literal["ghost_grads", "none"]
Kernel = Literal["live", "dense"]
Schedule = Literal["wsd", "cosine"]
LogTarget = Literal["jsonl", "wandb"]


METHOD_LINK_RULE: dict[Method, Similarity] = {"hsae": "conditional", "paper": "encoder"}
"""The link rule each method uses unless --model.similarity names one. The methods share
the paper's loss terms (L_SAE, L_PC, ghost grads) and differ in how a child finds its
parent: docs/hierarchy.md gives the measurements behind hsae's choice."""

METHOD_PERTURB_RATE: dict[Method, float] = {"hsae": 0.0, "paper": 0.05}
"""The substitution rate r each method uses unless --model.perturb_rate names one. hsae
trains without the paper's perturbation: on SAE Lens's data it costs a quarter of the true
features learned (docs/hierarchy.md)."""

METHOD_L0_START: dict[Method, float] = {"hsae": 3.0, "paper": 1.0}
"""The multiple of target_l0 each method's L0 target starts at, unless --model.l0_start
names one (hsae.method.controller anneals it to the target; 1 = the paper's fixed target).
docs/training.md gives the measurements behind hsae's 3."""

METHOD_DECODER_INIT_NORM: dict[Method, float] = {"hsae": 0.1, "paper": 0.0}
"""Where each method's decoder rows start, unless --model.decoder_init_norm names it: 0 keeps
unit rows throughout (the paper's); a positive norm starts there, with free norms."""

METHOD_WINDOW: dict[Method, Window] = {"hsae": "encoder", "paper": "fixed"}
"""Each method's straight-through window, unless --model.window names one. hsae's rows start
at 0.1, where a fixed window would span half of every level (docs/training.md)."""

METHOD_CLIP_GRAD: dict[Method, float] = {"hsae": 25.0, "paper": 0.0}
"""The bound on the gradient's global norm each method trains with, unless --train.clip_grad
names one (0: no clipping, the paper's). hsae's 25 binds only where gradients are large:
on the CPU benchmarks (d 256, norm about 90 at the start, 16-22 from step 200) in the
first 200 steps, where without it Adam's second moment remembers the early gradients and
damps the steps after; on the demo's forest (d 64) it changed only seed 1's links.
docs/hierarchy.md gives the measurements: `cpu-ssb` FVE within 0.01 of SAE Lens's at
every level, at a cost of 16-26 true features on `cpu`."""

REFERENCE_STEPS = 100_000
"""The run length the paper's controller constants were set for."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line for the user."""


@dataclass
class HSAEConfig:
    """The model and the method: levels, loss weights, hierarchy rule."""

    method: Method = "hsae"
    """hsae (links by P(parent fires | child fires), copies excluded) or paper (the
    paper's HSAE exactly, links by encoder cosine). Both train the paper's loss;
    docs/hierarchy.md measures the two."""
    sizes: tuple[int, ...] = (2048, 4096, 8192, 16384)
    """Dictionary size n_l of each level, strictly increasing."""
    target_l0: float = 50.0
    """Wanted mean number of active features per token, every level."""
    l0_start: float | None = None
    """The L0 target starts at this multiple of target_l0 and falls linearly to it over
    the first half of the run, never above a quarter of a level's features (None: the
    method's, hsae 3, paper 1 = a fixed target; hsae.method.controller)."""
    rho: float = 0.01
    """Weight of the parent-children constraint loss L_PC."""
    perturb_rate: float | None = None
    """Rate r at which a parent with children is substituted by its children (None: the
    method's, hsae 0, paper 0.05)."""
    nested: bool = False
    """Nested levels (ours, Matryoshka-style): level l+1's first n_l features are level l's
    own (shared parameters), and every level still reconstructs x from its features, so
    the new ones fit what the coarser level leaves. Only the finest level's L0 is priced
    and steered to target_l0; a coarser level fires the part of it that is its own. An
    inherited feature carries no link: links join a new feature to the level above.
    hsae.method.nested; measured in docs/hierarchy.md."""
    prune: bool = False
    """After training, each coarse level becomes the finer level's n_l most energetic
    features wherever that explains at least its own FVE less prune_tolerance, and the
    links are made again (ours, off by default). A flat level absorbs the parents that
    the finer level learns apart from their children (hsae/method/prune.py); it pays
    where the finest level learns the parents (docs/hierarchy.md)."""
    prune_tolerance: float = 0.0
    """The FVE a level may lose to pruning: 0 prunes only where it costs nothing."""
    support: float = 0.0
    """Weight s of the support constraint L_S (ours, not the paper's): a linked child
    firing where its parent is silent pays (1 + s) times the L0 price. 0 turns it off."""
    bandwidth: float = 0.5
    """Width eps of the rectangle kernel in the straight-through estimator (the paper gives
    none). Relative to inputs scaled so that E||s x|| = sqrt(d), i.e. pre-activations of
    order 1. A narrow window (0.05, SAE Lens's default) holds so few entries that theta
    gets a gradient on few steps and barely moves in a short run; a wider one makes more
    entries live and the step slower: 0.5 trained as well as 1.0 (FVE 0.941 against 0.942)
    in 0.78x its time (docs/training.md)."""
    window: Window | None = None
    """Width of each feature's straight-through window (None: the method's, hsae encoder,
    paper fixed). fixed: eps = bandwidth for every feature (the paper's; SAE Lens's).
    encoder: eps_i = bandwidth * ||W_enc[:, i]||, so the window follows the scale of
    feature i's pre-activations: with rows started small (decoder_init_norm 0.1) a fixed
    window of 0.5 spans half of every level and the step is several times slower
    (docs/training.md). With unit rows and the encoder their transpose both start at
    bandwidth."""
    sparsity_loss: SparsityLoss = "linear"
    """linear: lambda_l L0_l, lambda steered by the controller (the paper's). quadratic:
    per level the mean over rows of 2/T (L0_row - T)^2 at the controller's target T, with
    weight 1 (Gemma Scope 2; SAE Lens's quadratic mode): a row far above T pays more than
    a row near it, a row below T is pushed to fire more (docs/hierarchy.md)."""
    decoder_init_norm: float | None = None
    """None: the method's (hsae 0.1, paper 0). 0: decoder rows of unit norm throughout (the
    paper's). A positive number: every row starts at this norm, the encoder its transpose,
    and the norms are free while training (SAE Lens's start, from Anthropic's 2024 update:
    small rows turn fast early on); the trained model folds the norms into the encoder and
    thresholds (HSAE.fold_decoder_norms), so what is saved has unit rows."""
    similarity: Similarity | None = None
    """Parent choice, in place of the method's (hsae: conditional, paper: encoder): cosine
    of encoder columns, of decoder rows, EMA co-activation, or conditional: P(parent fires
    | child fires) since the last update, copies and dead parents excluded
    (hsae/method/hierarchy.py)."""
    tree: TreeVariant = "partial"
    """partial (paper), full (quantile 0), binary (<= 2 children), fixed (frozen at 1st update)."""
    unassigned_quantile: float = 0.2
    """Children whose best similarity is in this bottom quantile get no parent (partial tree)."""
    update_every: int = 5000
    """Steps between hierarchy updates; the first happens at step `update_every`."""
    links: Links = "joint"
    """joint: HSAE. posthoc: no links while training, one hierarchy update at the end."""
    link_threshold: float = 0.8
    """Conditional rule: a child whose best P(parent fires | child fires) is below this
    gets no parent (in place of unassigned_quantile), and a parent that fires on this
    share of all tokens or more is no candidate (dense: any child would pass beside it)."""
    parent_pick: ParentPick = "likely"
    """Conditional rule: which of a child's eligible parents (P(parent fires | child
    fires) >= link_threshold, not a copy) it takes. likely: the highest P(p|c); specific:
    the highest P(c|p), the parent that fires least outside the child, so that a leaf is
    linked to its own parent and not to a grandparent that fires wherever it does
    (docs/hierarchy.md measures the two)."""
    coact_momentum: float = 0.999
    """EMA momentum of the co-activation statistics (similarity = coactivation)."""

    @property
    def link_rule(self) -> Similarity:
        """How a child finds its parent: --model.similarity, else the method's rule."""
        return self.similarity or METHOD_LINK_RULE[self.method]

    @property
    def l0_start_multiple(self) -> float:
        """Where the annealed L0 target starts: --model.l0_start, else the method's."""
        return self.l0_start if self.l0_start is not None else METHOD_L0_START[self.method]

    @property
    def decoder_start(self) -> float | None:
        """The norm decoder rows start at, free while training; None: unit rows throughout.
        --model.decoder_init_norm, else the method's."""
        norm = self.decoder_init_norm
        norm = METHOD_DECODER_INIT_NORM[self.method] if norm is None else norm
        return norm if norm > 0 else None

    @property
    def substitution_rate(self) -> float:
        """The perturbation's rate r: --model.perturb_rate, else the method's."""
        rate = self.perturb_rate
        return METHOD_PERTURB_RATE[self.method] if rate is None else rate

    @property
    def window_rule(self) -> Window:
        """The straight-through window: --model.window, else the method's."""
        return self.window or METHOD_WINDOW[self.method]

    def validate(self) -> None:
        check_finite(self)
        _check_choice("method", self.method, Method)
        if len(self.sizes) < 1 or any(n <= 0 for n in self.sizes):
            raise ConfigError(f"sizes must be positive integers, got {list(self.sizes)}")
        if any(b <= a for a, b in zip(self.sizes, self.sizes[1:])):
            raise ConfigError(f"sizes must be strictly increasing, got {list(self.sizes)}")
        if self.target_l0 <= 0 or self.target_l0 >= min(self.sizes):
            raise ConfigError(f"target_l0 must lie in (0, {min(self.sizes)}), got {self.target_l0}")
        if self.nested and self.support > 0:
            raise ConfigError(
                "support and nested are not combined: with nesting only the "
                "finest level's L0 is priced, which L_S's weight reads"
            )
        if self.nested and self.prune:
            raise ConfigError("prune and nested are not combined: nested levels are prefixes")
        if self.l0_start is not None and self.l0_start < 1:
            raise ConfigError(f"l0_start must be >= 1, got {self.l0_start}")
        _check_unit("perturb_rate", self.substitution_rate)
        for name in ("unassigned_quantile", "coact_momentum", "link_threshold"):
            _check_unit(name, getattr(self, name))
        for name in ("rho", "support", "prune_tolerance"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        _check_choice("sparsity_loss", self.sparsity_loss, SparsityLoss)
        if self.window is not None:
            _check_choice("window", self.window, Window)
        if self.sparsity_loss == "quadratic" and (self.nested or self.support > 0):
            raise ConfigError(
                "sparsity_loss quadratic is not combined with nested or support: both are "
                "priced in units of the controller's lambda, which it does not use"
            )
        if self.decoder_init_norm is not None and self.decoder_init_norm < 0:
            raise ConfigError(f"decoder_init_norm must be >= 0, got {self.decoder_init_norm}")
        if self.bandwidth <= 0:
            raise ConfigError(f"bandwidth must be > 0, got {self.bandwidth}")
        if self.update_every <= 0:
            raise ConfigError(f"update_every must be > 0, got {self.update_every}")
        if self.similarity is not None:
            _check_choice("similarity", self.similarity, Similarity)
        _check_choice("tree", self.tree, TreeVariant)
        _check_choice("parent_pick", self.parent_pick, ParentPick)
        _check_choice("links", self.links, Links)

    def baseline(self) -> HSAEConfig:
        """The paper's post-hoc baseline: same SAEs, rho = 0, r = 0, links made at the end
        by the paper's rule."""
        return dataclasses.replace(
            self, method="paper", similarity=None, l0_start=None, rho=0.0, perturb_rate=0.0,
            support=0.0, nested=False, links="posthoc", prune=False,
        )  # fmt: skip


@dataclass
class TrainConfig:
    """Optimisation (appendix A): Adam, lr schedule, sparsity control, checkpoints."""

    steps: int = 100_000
    batch_size: int = 1024
    lr: float = 5e-4
    threshold_lr: float = 0.03
    """Learning rate of the thresholds theta (same schedule as lr). Adam moves a parameter by
    about its learning rate per step, and theta lives in pre-activation units of order 1
    while a weight entry is of order 1/sqrt(d): at lr, theta could not follow the encoder."""
    warmup_frac: float = 0.1
    """Linear warm-up over this fraction of steps."""
    schedule: Schedule = "wsd"
    """After warm-up. wsd: constant, then linear decay to 0 over the last decay_frac of
    steps. cosine: cosine decay to 0 (the paper's). Measured at 1k steps on SAE Lens
    synthetic data, seeds 0 and 1 (docs/training.md): wsd gave FVE 0.942 and 444-446 true
    features recovered, cosine 0.937 and 412-420."""
    decay_frac: float = 0.2
    """The wsd schedule's final decay, as a fraction of steps."""
    beta1: float = 0.0
    beta2: float = 0.995
    clip_grad: float | None = None
    """Clip the gradient's global norm to this before each step (0: no clipping; SAE Lens's
    trainer clips at 1). None: the method's, hsae 25, paper 0 (RunConfig.clip_bound)."""
    seed: int = 0
    l0_ema_momentum: float = 0.999
    """Momentum of the per-level L0 EMA of the sparsity controller, for a run of
    REFERENCE_STEPS (see scale_to_length)."""
    eta: float = 0.001
    """Decay rate of the wanted L0 trajectory, dL0* = -eta (L0_ema - target), for a run of
    REFERENCE_STEPS (see scale_to_length)."""
    lambda_init: float = 1e-3
    """Initial sparsity weight of every level."""
    lambda_step: float = 0.01
    """Multiplicative step of the controller, lambda *= exp(+-lambda_step) per step, for a
    run of REFERENCE_STEPS (see scale_to_length)."""
    scale_to_length: bool = True
    """Scale lr and the controller's time constants with the run's length (scaled_lr,
    controller_constants): the paper's values suit its 100k steps; a shorter run needs
    larger steps and a faster controller. At REFERENCE_STEPS, and with this off, lr and
    the three controller values above are used as they are."""
    dead_latents: DeadLatents = "ghost_grads"
    """Dead-latent handling: ghost grads (Jermyn & Templeton 2024) or none."""
    dead_after: int = 1000
    """A feature that has not fired for this many steps counts as dead."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (0: none)."""
    scale_tokens: int = 65536
    """Tokens used to estimate the input scale s before training."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto: this process's GPU when there is one, else the CPU."""
    autocast: bool = False
    """bf16 autocast for the forward pass; parameters and optimiser state stay fp32."""
    deterministic: bool = True
    """Deterministic kernels: a resumed run ends bit-identical to an uninterrupted one."""
    kernel: Kernel = "live"
    """live: compute the loss over live entries only (hsae/method/losses_live.py, fast);
    dense: exactly as the formulas read (the reference, several times slower)."""
    progress: bool = True
    log: LogTarget = "jsonl"
    """Where the training curve goes: train_log.jsonl in the run directory (always), and
    with wandb also to Weights & Biases (WANDB_MODE=offline keeps it local)."""
    log_every: int = 25
    """Steps between lines of the training log (and checks that the loss is finite)."""

    def scaled_lr(self) -> float:
        """lr for this run's length: lr * sqrt(REFERENCE_STEPS / steps) (5e-3 at 1k steps).
        Measured at 1k steps (docs/training.md): FVE 0.861 at 5e-3 against 0.823 at 3e-3."""
        if not self.scale_to_length:
            return self.lr
        return self.lr * math.sqrt(REFERENCE_STEPS / self.steps)

    def controller_constants(self) -> tuple[float, float, float]:
        """(eta, l0_ema_momentum, lambda_step) for this run's length.

        With r = REFERENCE_STEPS / steps: eta and 1 - momentum grow as sqrt(r), the step
        as r^(1/4), so that the paper's constants come back at 100k steps. Measured on SAE
        Lens synthetic data (docs/training.md), a 1k-step run then holds every level's L0
        within 10 % of its target; the paper's constants left it at 20-50 % of target."""
        if not self.scale_to_length:
            return self.eta, self.l0_ema_momentum, self.lambda_step
        r = REFERENCE_STEPS / self.steps
        eta = min(1.0, self.eta * math.sqrt(r))
        momentum = max(0.0, 1.0 - (1.0 - self.l0_ema_momentum) * math.sqrt(r))
        return eta, momentum, self.lambda_step * r**0.25

    def validate(self) -> None:
        check_finite(self)
        for name in ("steps", "batch_size", "dead_after", "scale_tokens", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        for name in ("warmup_frac", "decay_frac", "beta1", "beta2", "l0_ema_momentum", "eta"):
            _check_unit(name, getattr(self, name))
        if self.clip_grad is not None and self.clip_grad < 0:
            raise ConfigError(f"clip_grad must be >= 0, got {self.clip_grad}")
        for name in ("lr", "threshold_lr", "lambda_init", "lambda_step"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        _check_choice("dead_latents", self.dead_latents, DeadLatents)
        _check_choice("schedule", self.schedule, Schedule)
        _check_choice("log", self.log, LogTarget)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.schedule == "wsd" and self.warmup_frac + self.decay_frac > 1:
            raise ConfigError(
                f"warmup_frac + decay_frac must be <= 1, got {self.warmup_frac + self.decay_frac}"
            )


@dataclass
class RunConfig:
    """Everything `hsae train` needs; saved in checkpoints and in hsae.json."""

    model: HSAEConfig = field(default_factory=HSAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def clip_bound(self) -> float:
        """The gradient's global norm is clipped to this (0: not clipped):
        --train.clip_grad, else the method's."""
        clip = self.train.clip_grad
        return METHOD_CLIP_GRAD[self.model.method] if clip is None else clip

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        model = _build(HSAEConfig, data.get("model", {}))
        train = _build(TrainConfig, data.get("train", {}))
        model.sizes = tuple(int(n) for n in model.sizes)
        return cls(model=model, train=train)


def read_config_file(path: PathLike) -> dict:
    """A JSON config file: an object with "model" and "train" sections (`hsae train
    --config`, the benchmark's --config); FormatError or ConfigError in one line."""
    data = load_json(path)
    unknown = sorted(set(data) - {"model", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}")
    for section in ("model", "train"):
        if not isinstance(data.get(section, {}), dict):
            raise ConfigError(f"{path}: section {section!r} must be a JSON object")
    return data


def _build(kind: type, data: dict):
    if not isinstance(data, dict):
        raise ConfigError(f"{kind.__name__} must be a JSON object, got {data!r}")
    hints = typing.get_type_hints(kind)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"unknown {kind.__name__} field(s): {', '.join(unknown)}")
    for name, value in data.items():
        if not _fits(hints[name], value):
            raise ConfigError(f"{name} must be {describe_type(hints[name])}, got {value!r}")
    return kind(**data)


def _fits(hint, value) -> bool:
    """Whether a JSON value has the type a config field declares."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is tuple:
        return isinstance(value, list | tuple) and all(_fits(int, v) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint)


def describe_type(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        kinds = [describe_type(h) for h in typing.get_args(hint) if h is not type(None)]
        return " or ".join(kinds) + " or null"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin is tuple:
        return "a list of integers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, hint.__name__
    )


def check_finite(cfg) -> None:
    """Every number of a config dataclass is finite: NaN passes every `<` check silently."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must lie in [0, 1], got {value}")


def _check_choice(name: str, value: str, choices) -> None:
    allowed = choices.__args__
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
