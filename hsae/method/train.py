"""The training loop (paper section 3.3 and appendix A).

Alternating optimisation: gradient steps on the parameters with the hierarchy fixed, and
every `update_every` steps a hierarchy update with the parameters fixed. Adam
(beta1 = 0, beta2 = 0.995), linear warm-up over 10 % of the steps then a decay to 0
(lr_at: the paper's cosine, or the default warm-up-stable-decay),
decoder rows renormalised after every step, ghost grads for dead latents, and the
velocity-based sparsity controller on every level.

Every random draw of a step comes from a generator seeded by (seed, step), so a run
resumed from a checkpoint replays exactly the steps that an uninterrupted run takes.

Why one file of about 430 lines: the loop owns the optimiser, controller, hierarchy,
firing counters and their checkpointing, which must change together to stay bit-exact on
resume.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hsae.config import ConfigError, RunConfig
from hsae.method import checkpoint, distributed, nested, prune
from hsae.method.controller import SparsityController
from hsae.method.hierarchy import COUNT_WINDOW, Hierarchy
from hsae.method.losses import LossInputs, LossOutput, draw_substitution
from hsae.method.losses_live import capacity_for
from hsae.method.model import HSAE
from hsae.method.train_log import TrainLog

Stream = Callable[[int], Iterator[Tensor]]
"""stream(start_step) yields the raw (unscaled) batch of every step from start_step on."""

CHECKPOINT = "checkpoint.safetensors"


def step_generator(seed: int, step: int, stream: int, device: torch.device | str = "cpu"):
    """A generator for one purpose (`stream`) at one step: resumable without RNG state.
    It lives on the training device, so its draws need no host-to-device copy."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 16 + stream)


def _data_difference(old: dict | None, new: dict | None, prefix: str = "") -> list[str]:
    """The keys (dotted) in which two data descriptions differ."""
    old, new = old or {}, new or {}
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _data_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(prefix + key)
    return out


def lr_at(
    step: int,
    peak: float,
    steps: int,
    warmup_frac: float,
    schedule: str,
    decay_frac: float,
) -> float:
    """Linear warm-up over the first warmup_frac of steps, then to 0 by the schedule:
    cosine (the paper's), or wsd (hold the peak, decay linearly over the last decay_frac)."""
    warmup = max(1, int(warmup_frac * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "wsd":
        decay = max(1, int(decay_frac * steps))
        return peak * min(1.0, (steps - step) / decay)
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def estimate_scale(batches: Iterator[Tensor], n_tokens: int) -> tuple[float, Tensor]:
    """The constant s with E||s x|| = sqrt(d), and the sample it was estimated on."""
    sample, seen = [], 0
    while seen < n_tokens:
        x = next(batches)
        sample.append(x)
        seen += x.shape[0]
    x = torch.cat(sample)[:n_tokens].float()
    norm = x.double().norm(dim=-1).mean().item()  # double: rows near 1e30 overflow a float32
    if not math.isfinite(norm):
        raise ConfigError(f"cannot estimate the input scale: the activations are not finite "
                          f"or too large (mean row norm {norm})")  # fmt: skip
    if norm == 0:
        raise ConfigError("cannot estimate the input scale: the activations are all zero")
    return math.sqrt(x.shape[1]) / norm, x


@dataclass
class TrainResult:
    model: HSAE
    hierarchy: Hierarchy
    summary: dict


@contextlib.contextmanager
def kernel_settings(deterministic: bool, device: torch.device) -> Iterator[None]:
    """The kernel choices of a training run, restored afterwards.

    Some CPU kernels of the live-entry loss (index_add and the like) are parallel and
    order-dependent; their deterministic versions cost no measurable time. On GPUs some
    kernels have no deterministic version: warn there rather than fail. Filling every new
    buffer with NaN is a debugging aid of deterministic mode that changes no result here
    and cost a fifth of the step."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(deterministic, warn_only=device.type != "cpu")
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill


class Trainer:
    """Owns the model, optimiser, hierarchy, controller and the step counter."""

    def __init__(
        self,
        cfg: RunConfig,
        d_in: int,
        stream: Stream,
        out_dir: str | Path,
        data: dict | None = None,
    ):
        """data: what the stream reads (a Source's description); a resume must read the same."""
        cfg.validate()
        self.cfg, self.d_in, self.data = cfg, d_in, data
        self.stream = distributed.local_slice(stream)  # this rank's rows of each batch
        self.out_dir = Path(out_dir)
        m, t = cfg.model, cfg.train
        self.device = distributed.resolve_device(t.device)
        self.model = HSAE(
            d_in,
            m.sizes,
            m.bandwidth,
            seed=t.seed,
            decoder_init_norm=m.decoder_start,
            window=m.window_rule,
        ).to(self.device)
        self.hierarchy = Hierarchy(m, self.device)
        eta, momentum, lambda_step = t.controller_constants()
        self.controller = SparsityController(
            len(m.sizes), m.target_l0, eta, momentum, t.lambda_init, lambda_step, self.device,
            start_multiple=m.l0_start_multiple, steps=t.steps, sizes=m.sizes,
        )  # fmt: skip
        self.opt = torch.optim.Adam(self.param_groups(), betas=(t.beta1, t.beta2))
        self.module: torch.nn.Module = self.model  # wrapped in DDP once initialised
        self.priced = nested.priced_levels(len(m.sizes), m.nested, self.device)
        self.since_fired = [torch.zeros(n, dtype=torch.long, device=self.device) for n in m.sizes]
        self.step = 0
        self.last: LossOutput | None = None  # the latest step's output, for the progress bar
        self.dropped = torch.zeros((), dtype=torch.long, device=self.device)
        self.pruned: list[int] = []  # the levels pruned after training
        self.live_capacity = None  # the CPU takes exact live sets; a GPU fixed sizes (no sync)
        if self.device.type == "cuda":
            rows = math.ceil(t.batch_size / distributed.world_size())
            l0s = self.controller.target_at(0).tolist()  # the largest targets of the run
            self.live_capacity = [capacity_for(rows, n, l0) for n, l0 in zip(m.sizes, l0s)]

    def param_groups(self) -> list[dict]:
        """The thresholds at threshold_lr, every other parameter at lr scaled to the run's
        length (TrainConfig.scaled_lr)."""
        t = self.cfg.train
        thresholds = list(self.model.threshold)
        chosen = {id(p) for p in thresholds}
        rest = [p for p in self.model.parameters() if id(p) not in chosen]
        return [
            {"params": rest, "base_lr": t.scaled_lr()},
            {"params": thresholds, "base_lr": t.threshold_lr},
        ]

    # ------------------------------------------------------------ set-up and checkpoints

    def init_fresh(self) -> None:
        batches = distributed.global_batches(self.stream(0))
        scale, sample = estimate_scale(batches, self.cfg.train.scale_tokens)
        self.model.scale.fill_(scale)
        targets = self.controller.target_at(0).tolist()
        self.model.init_from_data(sample.to(self.device) * scale, targets)
        if self.cfg.model.nested:  # the coarser levels start as the finest level's prefix
            nested.sync(self.model)

    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def save_checkpoint(self) -> None:
        """Never a checkpoint of a diverged state: resuming it could only diverge again."""
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise FloatingPointError(
                f"non-finite {bad[0]} at step {self.step}; no checkpoint written; lower "
                "--train.lr or check the data"
            )
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update(self._optimizer_tensors())
        tensors.update(self.hierarchy.state_tensors())
        tensors.update(self.controller.state_tensors())
        tensors.update({f"since_fired.{i}": s for i, s in enumerate(self.since_fired)})
        state = {
            "step": self.step,
            "config": self._comparable_config(),
            "d_in": self.d_in,
            "frozen": self.hierarchy.frozen,
            "data": self.data,
        }
        if distributed.is_main():  # one writer; the others wait for the file
            self.out_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.save_checkpoint(self.checkpoint_path(), tensors, state)
        distributed.barrier()

    def load_checkpoint(self) -> None:
        path = self.checkpoint_path()
        tensors, state = checkpoint.load_checkpoint(path)
        tensors = {name: t.to(self.device) for name, t in tensors.items()}
        if state.get("config") != self._comparable_config() or state.get("d_in") != self.d_in:
            raise ConfigError(
                f"checkpoint {path} was written with a different configuration or input width; "
                "resume with the same config, or start a fresh run in another --out directory"
            )
        if state.get("data") != self.data:
            raise ConfigError(
                f"checkpoint {path} was trained on other data (it differs in "
                f"{', '.join(_data_difference(state.get('data'), self.data))}); "
                "resume with the same --data and --planted settings"
            )
        prefix = "model."
        self.model.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
        self._load_optimizer_tensors(tensors)
        self.hierarchy.load_state_tensors(tensors, bool(state["frozen"]))
        self.controller.load_state_tensors(tensors)
        self.since_fired = [tensors[f"since_fired.{i}"] for i in range(len(self.since_fired))]
        self.step = int(state["step"])

    def _comparable_config(self) -> dict:
        cfg = self.cfg.to_dict()
        for volatile in ("progress", "checkpoint_every", "device", "log", "log_every"):
            cfg["train"].pop(volatile)
        cfg["model"]["sizes"] = list(cfg["model"]["sizes"])
        return cfg

    def _optimizer_tensors(self) -> dict[str, Tensor]:
        out = {}
        for k, p in enumerate(self.model.parameters()):
            for name, value in self.opt.state.get(p, {}).items():
                out[f"opt.{k}.{name}"] = value
        return out

    def _load_optimizer_tensors(self, tensors: dict[str, Tensor]) -> None:
        for k, p in enumerate(self.model.parameters()):
            state = {
                name: tensors[f"opt.{k}.{name}"]
                for name in ("step", "exp_avg", "exp_avg_sq")
                if f"opt.{k}.{name}" in tensors
            }
            if state:
                self.opt.state[p] = state

    # ------------------------------------------------------------ one step

    def loss_inputs(self) -> LossInputs:
        m, t = self.cfg.model, self.cfg.train
        rate = m.substitution_rate if m.links == "joint" else 0.0  # post hoc: no links yet
        levels = range(len(self.hierarchy.parents))
        substitution: list[Tensor | None] = [None for _ in levels]
        if rate > 0:  # the generator is seeded by the step: none to build where r = 0
            gen = step_generator(t.seed, self.step, stream=1, device=self.device)
            has = [self.hierarchy.has_children(level) for level in levels]
            substitution = [draw_substitution(h, rate, gen) for h in has]
        dead = None
        if t.dead_latents == "ghost_grads":
            dead = [s >= t.dead_after for s in self.since_fired]
        targets = self.controller.target_at(self.step) if m.sparsity_loss == "quadratic" else None
        return LossInputs(
            self.hierarchy.parents, self.controller.lambdas * self.priced, m.rho, substitution,
            dead, dense=t.kernel == "dense", capacity=self.live_capacity, support=m.support,
            l0_targets=targets,
        )  # fmt: skip

    def train_step(self, x_raw: Tensor) -> Tensor:
        """One gradient step on a raw batch; returns the loss (detached)."""
        t = self.cfg.train
        x = self.model.scaled(x_raw)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(
                self.step, group["base_lr"], t.steps, t.warmup_frac, t.schedule, t.decay_frac
            )
        with torch.autocast(self.device.type, torch.bfloat16, enabled=t.autocast):
            inputs = self.loss_inputs()
            out = self.module(x, inputs)
        self.opt.zero_grad(set_to_none=True)
        out.total.backward()
        if self.cfg.model.nested:
            nested.fold_grads(self.model)
        self.model.project_decoder_grads()
        if (clip := self.cfg.clip_bound) > 0:  # sync-free: the norm stays on the device
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.opt.step()
        self.model.apply_constraints()
        if self.cfg.model.nested:
            nested.sync(self.model)
        self.controller.update(distributed.mean(out.l0), self.step)  # replaces lambdas, not inputs'
        self.last_lambdas = inputs.lambdas  # the ones this step's loss used, for the log
        self._track_firing(out.fired)
        if self.observe_due():  # co-activation or conditional rule: firing statistics
            self.hierarchy.observe(out.dense_acts())
        if out.dropped is not None:
            self.dropped += out.dropped
        self.step += 1
        if self.links_update_due():
            self.hierarchy.update(self.model)
        self.last = out
        return out.total.detach()

    def observe_due(self) -> bool:
        """The co-activation EMA reads every step; the conditional rule's counts only the
        COUNT_WINDOW share of each interval that ends at a hierarchy update (for post-hoc
        links, the end of the run)."""
        h, m = self.hierarchy, self.cfg.model
        if h.coact is not None:
            return True
        if h.both is None:
            return False
        window = max(1, round(COUNT_WINDOW * m.update_every))
        after = self.step + 1  # this step's number once it is done
        if m.links == "posthoc":
            return after > self.cfg.train.steps - window
        return (-after) % m.update_every < window

    def links_update_due(self) -> bool:
        """Joint training re-links every update_every steps, but not after the last step:
        the final links are the ones the model was trained with (a last-step update would
        be a post-hoc re-link of the finished model)."""
        m = self.cfg.model
        last = self.step >= self.cfg.train.steps
        return m.links == "joint" and self.step % m.update_every == 0 and not last

    @torch.no_grad()
    def _track_firing(self, fired: list[Tensor]) -> None:
        for level, f in enumerate(fired):
            f = distributed.any_(f)
            self.since_fired[level] = torch.where(f, 0, self.since_fired[level] + 1)

    # ------------------------------------------------------------ the loop

    def fit(self, resume: bool = False) -> TrainResult:
        with kernel_settings(self.cfg.train.deterministic, self.device):
            return self._fit(resume)

    def _fit(self, resume: bool) -> TrainResult:
        t, m = self.cfg.train, self.cfg.model
        if m.links == "joint" and m.update_every >= t.steps:
            warnings.warn(
                f"update_every ({m.update_every}) is not below steps ({t.steps}): no hierarchy "
                "update will happen and every feature stays unlinked; the paper links every "
                f"5 % of the run (--model.update_every {max(1, t.steps // 20)})",
                stacklevel=3,
            )
        if resume:
            self.load_checkpoint()
        else:
            self.init_fresh()
        if distributed.active():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        start, started_at = self.step, time.perf_counter()
        log = self._open_log(resume)
        batches = self.stream(self.step)
        bar = tqdm(
            total=t.steps,
            initial=self.step,
            disable=not t.progress or not distributed.is_main(),
            desc=self.out_dir.name,
            dynamic_ncols=True,
        )
        last_log = (self.step, time.perf_counter())
        try:
            while self.step < t.steps:
                loss = self.train_step(next(batches))
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    self._check_finite(loss)
                    bar.set_postfix_str(self.progress_line(), refresh=False)
                    if log is not None:
                        log.write(self.log_record(loss, *last_log))
                        last_log = (self.step, time.perf_counter())
                if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            if log is not None:
                log.close()
        bar.close()
        if self.cfg.model.prune:
            self.prune(batches)
        if self.cfg.model.links == "posthoc" and not self.pruned:  # pruning has linked
            self.hierarchy.update(self.model)
        if self.model.free_norms:  # what is saved and measured has unit decoder rows
            self.model.fold_decoder_norms()
        seconds = time.perf_counter() - started_at
        return TrainResult(self.model, self.hierarchy, self.summary(start, seconds))

    def prune(self, batches: Iterator[Tensor]) -> None:
        """Pruned levels (hsae.method.prune), decided on the PRUNE_ROWS rows that follow the
        run's, then the links made again on them (joint or post hoc: the counts of the run
        describe the features that were replaced)."""
        n_batches = max(1, prune.PRUNE_ROWS // self.cfg.train.batch_size)
        rows = [self.model.scaled(next(batches)) for _ in range(n_batches)]
        self.pruned = prune.prune_levels(self.model, rows, self.cfg.model.prune_tolerance)
        if self.pruned:
            self.hierarchy.relink(self.model, rows)

    def _check_finite(self, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss.item()} at step {self.step}; lower --train.lr or check the data"
            )
        if int(self.dropped) > 0:
            warnings.warn(
                f"{int(self.dropped)} live entries did not fit the GPU capacity by step "
                f"{self.step} (their gradients were skipped); L0 is far above target",
                stacklevel=2,
            )
            self.dropped.zero_()

    def _open_log(self, resume: bool) -> TrainLog | None:
        if not distributed.is_main():
            return None
        wandb_config = self.cfg.to_dict() if self.cfg.train.log == "wandb" else None
        return TrainLog(self.out_dir, self.step if resume else None, wandb_config)

    def log_record(self, loss: Tensor, since_step: int, since_time: float) -> dict:
        """One line of train_log.jsonl: the latest step's loss by its named terms (section
        3.1), per level L0, FVE, lambda and dead fraction, and the throughput."""
        out, t = self.last, self.cfg.train
        seconds = time.perf_counter() - since_time
        tokens = (self.step - since_step) * t.batch_size
        return {
            "step": self.step,
            "tokens": self.step * t.batch_size,
            "lr": self.opt.param_groups[0]["lr"],
            "loss": loss.item(),
            "reconstruction": out.mse.sum().item(),
            "sparsity": out.sparsity.item(),
            "pc": self.cfg.model.rho * out.pc.item(),
            "ghost": out.ghost.item(),
            "support": out.support.item(),
            "l0": out.l0.tolist(),
            "fve": out.fve.tolist(),
            "lambda": self.last_lambdas.tolist(),
            "dead_frac": [(s >= t.dead_after).float().mean().item() for s in self.since_fired],
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
        }

    def progress_line(self) -> str:
        out = self.last
        l0 = "/".join(f"{v:.0f}" for v in out.l0.tolist())
        fve = "/".join(f"{v:.2f}" for v in out.fve.tolist())
        lam = "/".join(f"{v:.1e}" for v in self.controller.lambdas.tolist())
        return f"L0 {l0} FVE {fve} λ {lam}"

    def summary(self, start_step: int, seconds: float) -> dict:
        tokens = (self.step - start_step) * self.cfg.train.batch_size
        return {
            "steps": self.step,
            "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
            "l0_ema": self.controller.l0_ema.tolist(),
            "lambdas": self.controller.lambdas.tolist(),
            "scale": float(self.model.scale),
            "world_size": distributed.world_size(),
            "pruned_levels": self.pruned,
        }
