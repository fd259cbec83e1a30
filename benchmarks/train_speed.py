"""HSAE against SAE Lens, training the same four dictionaries on the same activations.

(a) HSAE, its default method (constraint loss, linked levels) and the paper's
(`--model.method paper`: the substitution too);
(b) SAE Lens JumpReLU training SAEs of the four sizes, one after another, each through
SAE Lens's own `training_forward_pass`, backward and an Adam step. Both read the same
in-memory activations (d = 384 by default, batch 1024, target L0 32, fp32, this CPU's
default threads) and are timed in alternating rounds, so that a change in the machine's
load hits both alike. HSAE runs with the kernel settings of `hsae train` (deterministic).
Prints tokens/s of each, the ratios HSAE / SAE Lens and default method / paper, the
share of this machine's measured dense matmul rate (dense cost: 12 d sum(n) FLOP per
token) and peak RSS.

    python benchmarks/train_speed.py              # about 2 minutes on 2 cores
    python benchmarks/train_speed.py --steps 100  # steadier figures
    python benchmarks/train_speed.py --quality    # time to quality, about 8 minutes
    python benchmarks/train_speed.py --decoder-init-norm 0.1  # free decoder norms from 0.1

Tokens/s says little unless a step learns as much. ``--quality`` measures time to
quality on the ground-truth rows of ``benchmarks/synthetic.py``: SAE Lens trains its four
JumpReLU SAEs for the benchmark's run and its final held-out FVE per level is the bar;
hsae trains the same run with its defaults, and the wall time of its steps (evaluation
excluded) until every level's held-out FVE reaches the bar is compared with SAE Lens's
whole training time.
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import get_args

import torch

from hsae.config import HSAEConfig, RunConfig, TrainConfig, Window
from hsae.method.train import Trainer, kernel_settings


def matmul_rate(d: int, n: int, batch: int, repeats: int = 20) -> float:
    """FLOP/s of this machine's dense fp32 matmul at the encoder's shape."""
    a, b = torch.randn(batch, d), torch.randn(d, n)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * batch * d * n * repeats / (time.perf_counter() - started)


def hsae_stepper(
    data: torch.Tensor,
    sizes: tuple[int, ...],
    l0: float,
    kernel: str,
    method: str = "hsae",
    decoder_init_norm: float | None = None,
    window: str | None = None,
):
    """A function running one HSAE training step, after 10 warm-up steps (the first
    hierarchy update happens there, so links exist; one follows every 10 steps).

    The step at the target L0: the default method's annealed target (3x at the start)
    makes the first half of a run's steps costlier, which whole runs show
    (benchmarks/synthetic.py's seconds, and --quality here)."""
    warmup = 10
    model = HSAEConfig(method=method, sizes=sizes, target_l0=l0, update_every=warmup, l0_start=1.0,
                       decoder_init_norm=decoder_init_norm, window=window)  # fmt: skip
    cfg = RunConfig(
        model=model,
        train=TrainConfig(steps=10**6, batch_size=data.shape[1], checkpoint_every=0,
                          progress=False, scale_tokens=data.shape[1], device="cpu",
                          kernel=kernel),
    )  # fmt: skip
    trainer = Trainer(cfg, data.shape[2], lambda start: iter(data), "/tmp/hsae_speed")
    trainer.init_fresh()

    def step() -> None:
        trainer.train_step(data[trainer.step % len(data)])

    for _ in range(warmup):
        step()
    return step


def sae_lens_stepper(data: torch.Tensor, sizes: tuple[int, ...], l0: float):
    """A function running one SAE Lens training step on each of the four SAEs."""
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    configs = [JumpReLUTrainingSAEConfig(d_in=data.shape[2], d_sae=n, target_l0=l0) for n in sizes]
    saes = [JumpReLUTrainingSAE(cfg) for cfg in configs]
    opts = [torch.optim.Adam(sae.parameters(), lr=5e-4, betas=(0.0, 0.995)) for sae in saes]
    count = 0

    def step() -> None:
        nonlocal count
        for sae, opt in zip(saes, opts):
            step_input = TrainStepInput(
                sae_in=data[count % len(data)], coefficients={"l0": 1.0},
                dead_neuron_mask=None, n_training_steps=count, is_logging_step=False,
            )  # fmt: skip
            out = sae.training_forward_pass(step_input)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        count += 1

    for _ in range(5):
        step()
    return step


def interleaved_rates(steppers: dict, steps: int, batch: int, rounds: int = 4) -> dict:
    """tokens/s of each stepper, timed in alternating rounds so that a change in the
    machine's load hits all of them alike."""
    seconds = dict.fromkeys(steppers, 0.0)
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
        for name, step in steppers.items():
            started = time.perf_counter()
            for _ in range(per_round):
                step()
            seconds[name] += time.perf_counter() - started
    return {name: rounds * per_round * batch / s for name, s in seconds.items()}


def time_to_quality(check_every: int = 50) -> None:
    """SAE Lens's final FVE per level as the bar; hsae's step time until it clears it."""
    import synthetic  # this folder's ground-truth benchmark

    size = synthetic.SIZES["cpu"]
    synth = synthetic.synthetic_model(size)
    rows = synthetic.draw_rows(synth, size.steps * synthetic.BATCH + synthetic.EVAL_ROWS)
    train_rows, eval_rows = rows[: -synthetic.EVAL_ROWS], rows[-synthetic.EVAL_ROWS :]
    started = time.perf_counter()
    lens, _ = synthetic.train_sae_lens(train_rows, size, seed=0)
    lens_seconds = time.perf_counter() - started
    bar = held_out_fve(lens, eval_rows)
    cfg = RunConfig(
        model=HSAEConfig(sizes=size.levels, target_l0=size.target_l0,
                         update_every=max(1, size.steps // 20)),
        train=TrainConfig(steps=size.steps, checkpoint_every=0, progress=False),
    )  # fmt: skip
    trainer = Trainer(cfg, size.hidden_dim, synthetic.row_stream(train_rows), "/tmp/hsae_ttq")
    with kernel_settings(deterministic=True, device=torch.device("cpu")):
        started = time.perf_counter()
        trainer.init_fresh()
        batches, seconds, reached = synthetic.row_stream(train_rows)(0), 0.0, None
        while trainer.step < size.steps and reached is None:
            trainer.train_step(next(batches))
            if trainer.step % check_every == 0:
                seconds += time.perf_counter() - started
                fve = held_out_fve(trainer.model, eval_rows)
                if all(f >= b for f, b in zip(fve, bar)):
                    reached = trainer.step
                started = time.perf_counter()
    print(f"SAE Lens: {size.steps} steps in {lens_seconds:.0f} s, final held-out FVE "
          + " ".join(f"{b:.3f}" for b in bar))  # fmt: skip
    if reached is None:
        print(f"hsae did not reach SAE Lens's FVE at every level in {size.steps} steps "
              f"({seconds:.0f} s); its final FVE "
              + " ".join(f"{f:.3f}" for f in held_out_fve(trainer.model, eval_rows)))  # fmt: skip
        return
    print(
        f"hsae reached it at step {reached}, after {seconds:.0f} s of training; "
        f"time to SAE Lens's quality, hsae / SAE Lens: {seconds / lens_seconds:.2f}"
    )


@torch.no_grad()
def held_out_fve(model, rows: torch.Tensor) -> list[float]:
    x = rows * model.scale
    total = (x - x.mean(0)).pow(2).sum()
    acts = model.encode(x)
    return [1 - float((model.decode(a, level) - x).pow(2).sum() / total)
            for level, a in enumerate(acts)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", action="store_true", help="time to SAE Lens's quality")
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--sizes", default="512,1024,2048,4096")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--target-l0", type=float, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--dense", action="store_true", help="also time HSAE's dense reference kernel (slow)"
    )
    parser.add_argument(
        "--decoder-init-norm",
        type=float,
        default=None,
        help="the default method's --model.decoder_init_norm (default: the method's; 0: unit rows)",
    )
    parser.add_argument(
        "--window", choices=get_args(Window), default=None,
        help="the default method's --model.window (default: the method's)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.decoder_init_norm is not None and args.decoder_init_norm < 0:
        parser.error(f"--decoder-init-norm must be >= 0, got {args.decoder_init_norm}")
    if args.quality:
        time_to_quality()
        return
    sizes = tuple(int(n) for n in args.sizes.split(","))
    data = torch.randn(8, args.batch_size, args.d)
    dense_flop = 12 * args.d * sum(sizes)
    peak = matmul_rate(args.d, max(sizes), args.batch_size)
    names = {"live": "HSAE (all four levels, linked)", "paper": "HSAE, --model.method paper",
             "lens": "SAE Lens (four SAEs)", "dense": "HSAE, dense reference kernel"}  # fmt: skip
    with kernel_settings(deterministic=True, device=torch.device("cpu")):  # as `hsae train`
        steppers = {"live": hsae_stepper(data, sizes, args.target_l0, "live", "hsae",
                                         args.decoder_init_norm, args.window),
                    "paper": hsae_stepper(data, sizes, args.target_l0, "live", "paper"),
                    "lens": sae_lens_stepper(data, sizes, args.target_l0)}  # fmt: skip
        if args.dense:
            steppers["dense"] = hsae_stepper(data, sizes, args.target_l0, "dense")
        rates = interleaved_rates(steppers, args.steps, args.batch_size)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"d {args.d}, levels {list(sizes)}, batch {args.batch_size}, target L0 "
        f"{args.target_l0:g}, {torch.get_num_threads()} threads, {args.steps} timed steps"
    )
    print(f"dense matmul rate of this machine: {peak / 1e9:.1f} GFLOP/s")
    for key, rate in rates.items():
        share = rate * dense_flop / peak
        print(f"{names[key]:32s} {rate:10,.0f} tokens/s  ({share:.1%} of the dense matmul rate)")
    print(f"HSAE / SAE Lens: {rates['live'] / rates['lens']:.2f}x; peak RSS {rss:,.0f} MiB")
    print(f"step cost, default method / paper: {rates['paper'] / rates['live']:.2f}x")


if __name__ == "__main__":
    main()
