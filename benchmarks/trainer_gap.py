"""Where hsae's trainer and SAE Lens's part ways: one JumpReLU SAE, one switch at a time.

On the benchmark's `cpu-ssb` size (benchmarks/synthetic.py) SAE Lens's JumpReLU trainer
learns most of the planted features and hsae's few. This trains one JumpReLU SAE of
`--n` latents on the same rows in a plain loop whose every setting is a switch, starting
from SAE Lens's recipe (`Recipe()`, as `JumpReLUTrainingSAE` with the quadratic L0 loss
and `SAETrainer` run it for the benchmark) or from hsae's (`--from hsae`), and prints FVE,
L0, dead share and true features recovered for the start and for each single change:

- init_norm / unit: decoder rows start at this norm (encoder = their transpose); unit
  keeps them at norm 1 (radial gradient dropped, renormalised after each step), as hsae;
- l0: `quadratic`, SAE Lens's per-row 2/T (L0_row - T)^2, or `controller`, hsae's
  lambda * L0 with lambda from hsae.method.controller (target annealed from 3T);
- bandwidth, lr, threshold_lr, beta1, beta2, schedule (constant or hsae's wsd), clip (the
  global gradient norm, SAE Lens clips at 1; 0 = off), theta_start (SAE Lens's 0.01 or
  hsae's per-latent quantile at 3T), b_dec_start (zero or the data mean).

    python benchmarks/trainer_gap.py                  # SAE Lens's recipe, then each change
    python benchmarks/trainer_gap.py --from hsae      # hsae's, then each of SAE Lens's
    python benchmarks/trainer_gap.py --only --set unit=false init_norm=0.1  # one run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from typing import Literal, get_args, get_type_hints

import torch
from synthetic import BATCH, EVAL_ROWS, SIZES, draw_rows, recovered, synthetic_model
from torch import Tensor

from hsae.config import TrainConfig
from hsae.evaluation.metrics import LevelStats
from hsae.method.controller import SparsityController
from hsae.method.jumprelu import JumpReLU, Step
from hsae.method.model import THRESHOLD_FLOOR, drop_radial_grad, unit_rows, upper_quantile
from hsae.method.train import lr_at


@dataclass
class Recipe:
    """SAE Lens's JumpReLU recipe as the benchmark runs it (benchmarks/synthetic.py)."""

    init_norm: float = 0.1
    unit: bool = False
    l0: Literal["quadratic", "controller"] = "quadratic"
    bandwidth: float = 0.05
    lr: float = 3e-3
    threshold_lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.999
    schedule: Literal["constant", "wsd"] = "constant"
    clip: float = 1.0
    theta_start: Literal["constant", "quantile"] = "constant"
    b_dec_start: Literal["zero", "mean"] = "zero"


CHOICES = {name: get_args(kind) for name, kind in get_type_hints(Recipe).items() if get_args(kind)}
"""The Recipe fields that take one of a few words, and those words (from their types)."""

HSAE_RECIPE = Recipe(
    init_norm=1.0, unit=True, l0="controller", bandwidth=0.5, lr=5e-3, threshold_lr=0.03,
    beta1=0.0, beta2=0.995, schedule="wsd", clip=0.0, theta_start="quantile",
    b_dec_start="mean",
)  # fmt: skip
"""hsae's settings at 1,000 steps: TrainConfig's lr 5e-4 scaled to the run's length,
threshold_lr, Adam betas, the wsd schedule; HSAEConfig's bandwidth; HSAE's unit rows and
data start; the controller with its constants scaled to the run's length."""


@dataclass
class SAE:
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    theta: Tensor

    def params(self) -> list[Tensor]:
        return [self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.theta]

    def pre(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc


def start(r: Recipe, x: Tensor, n: int, target: float, seed: int) -> SAE:
    torch.manual_seed(seed)
    w = torch.empty(n, x.shape[1])
    torch.nn.init.kaiming_uniform_(w)  # SAE Lens's draw, then rows to init_norm
    w = unit_rows(w) * r.init_norm
    b_dec = x.mean(0) if r.b_dec_start == "mean" else torch.zeros(x.shape[1])
    sae = SAE(w.T.clone(), torch.zeros(n), w, b_dec, torch.full((n,), 0.01))
    if r.theta_start == "quantile":  # hsae: each latent fires on 3T / n of the rows
        q = upper_quantile(sae.pre(x), 1 - 3 * target / n)
        sae.theta = q.clamp(min=r.bandwidth / 2)
    for p in sae.params():
        p.requires_grad_(True)
    return sae


def controller(steps: int, target: float, n: int) -> SparsityController:
    """hsae's controller with TrainConfig's constants scaled to the run's length."""
    eta, momentum, step = TrainConfig(steps=steps).controller_constants()
    return SparsityController(1, target, eta, momentum, TrainConfig.lambda_init, step,
                              start_multiple=3.0, steps=steps, sizes=(n,))  # fmt: skip


def train(r: Recipe, rows: Tensor, n: int, target: float, steps: int, seed: int) -> SAE:
    sae = start(r, rows[:65536], n, target, seed)
    groups = [
        {"params": sae.params()[:4], "base": r.lr},
        {"params": [sae.theta], "base": r.threshold_lr},
    ]
    adam = torch.optim.Adam(groups, betas=(r.beta1, r.beta2))
    ctrl = controller(steps, target, n) if r.l0 == "controller" else None
    for step in range(steps):
        i = (step % (rows.shape[0] // BATCH)) * BATCH
        x = rows[i : i + BATCH]
        pre = sae.pre(x)
        error = JumpReLU.apply(pre, sae.theta, r.bandwidth) @ sae.W_dec + sae.b_dec - x
        l0_row = Step.apply(pre, sae.theta, r.bandwidth).sum(-1)
        if ctrl is None:
            sparsity = (2 / target * (l0_row - target) ** 2).mean()
        else:
            sparsity = ctrl.lambdas[0] * l0_row.mean()
        adam.zero_grad()
        (error.pow(2).sum(-1).mean() + sparsity).backward()
        if r.unit:
            drop_radial_grad(sae.W_dec)
        if r.clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.params(), r.clip)
        for g in adam.param_groups:
            g["lr"] = (
                g["base"]
                if r.schedule == "constant"
                else lr_at(step, g["base"], steps, 0.1, "wsd", 0.2)
            )
        adam.step()
        with torch.no_grad():
            sae.theta.clamp_(min=THRESHOLD_FLOOR if r.unit else 0.0)
            if r.unit:
                sae.W_dec.copy_(unit_rows(sae.W_dec))
        if ctrl is not None:
            ctrl.update(l0_row.mean().detach().view(1), step)
    return sae


@torch.no_grad()
def measure(sae: SAE, rows: Tensor, gt: Tensor) -> dict:
    stats = LevelStats(sae.W_dec.shape[0])
    for i in range(0, rows.shape[0], 4096):
        x = rows[i : i + 4096]
        pre = sae.pre(x)
        acts = pre * (pre > sae.theta)
        stats.update(x, acts, acts @ sae.W_dec + sae.b_dec)
    s = stats.result()
    return {"fve": s["fve"], "l0": s["l0"], "dead": s["dead_frac"],
            "recovered": recovered(sae.W_dec.detach(), gt)}  # fmt: skip


def changes_toward(other: Recipe, base: Recipe) -> list[dict]:
    """One change per field in which other differs from base (init_norm with unit)."""
    out = []
    for f in dataclasses.fields(Recipe):
        if getattr(other, f.name) != getattr(base, f.name) and f.name != "unit":
            out.append({f.name: getattr(other, f.name)})
    if other.unit != base.unit:
        out.append({"unit": other.unit, "init_norm": other.init_norm})
    return out


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="base", choices=["saelens", "hsae"], default="saelens")
    parser.add_argument("--n", type=int, default=1024, help="latents (default 1,024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="changes to the start recipe (Recipe's fields)")  # fmt: skip
    parser.add_argument("--only", action="store_true", help="the start recipe only")
    args = parser.parse_args()
    base = Recipe() if args.base == "saelens" else HSAE_RECIPE
    names = {f.name for f in dataclasses.fields(Recipe)}
    given = dict(kv.split("=", 1) for kv in args.set if "=" in kv)
    if len(given) != len(args.set) or set(given) - names:
        parser.error(f"--set takes FIELD=VALUE with FIELD one of {sorted(names)}")
    if args.n <= 0:
        parser.error("--n must be > 0")
    base = dataclasses.replace(base, **{k: parse_value(v) for k, v in given.items()})
    for name, allowed in CHOICES.items():
        if getattr(base, name) not in allowed:
            parser.error(f"--set {name} must be one of {allowed}, got {getattr(base, name)!r}")
    other = HSAE_RECIPE if args.base == "saelens" else Recipe()
    size = SIZES["cpu-ssb"]
    synth = synthetic_model(size)
    rows = draw_rows(synth, size.steps * BATCH + EVAL_ROWS)
    rows = rows * math.sqrt(rows.shape[1]) / rows[: 100 * BATCH].norm(dim=1).mean()
    train_rows, eval_rows = rows[:-EVAL_ROWS], rows[-EVAL_ROWS:]
    gt = synth.feature_dict.feature_vectors.detach().float()
    runs = [{}] + ([] if args.only else changes_toward(other, base))
    print(f"cpu-ssb, {args.n} latents, {size.steps} steps of {BATCH} rows, seed {args.seed}; "
          f"start: {args.base} {json.dumps(given)}")  # fmt: skip
    for change in runs:
        began = time.perf_counter()
        recipe = dataclasses.replace(base, **change)
        sae = train(recipe, train_rows, args.n, size.target_l0, size.steps, args.seed)
        m = measure(sae, eval_rows, gt)
        print(f"{json.dumps(change) if change else 'start':<44} FVE {m['fve']:.3f} "
              f"L0 {m['l0']:5.1f} dead {m['dead']:.2f} recovered {m['recovered']:4d} "
              f"{time.perf_counter() - began:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
