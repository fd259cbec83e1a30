"""HSAE against SAE Lens, training the same four dictionaries on the same activations.

(a) HSAE with the paper's mechanisms on (constraint loss, substitution, linked levels);
(b) SAE Lens JumpReLU training SAEs of the four sizes, one after another, each through
SAE Lens's own `training_forward_pass`, backward and an Adam step. Both read the same
in-memory activations (d = 384 by default, batch 1024, target L0 32, fp32, this CPU's
default threads). Prints tokens/s of each, their ratio, the share of this machine's
measured dense matmul rate (dense cost: 12 d sum(n) FLOP per token) and peak RSS.

    python benchmarks/train_speed.py              # about 2 minutes on 2 cores
    python benchmarks/train_speed.py --steps 100  # steadier figures
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from hsae.config import HSAEConfig, RunConfig, TrainConfig
from hsae.train import Trainer


def matmul_rate(d: int, n: int, batch: int, repeats: int = 20) -> float:
    """FLOP/s of this machine's dense fp32 matmul at the encoder's shape."""
    a, b = torch.randn(batch, d), torch.randn(d, n)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * batch * d * n * repeats / (time.perf_counter() - started)


def time_hsae(data: torch.Tensor, sizes: tuple[int, ...], l0: float, steps: int) -> float:
    warmup = 10
    cfg = RunConfig(
        model=HSAEConfig(sizes=sizes, target_l0=l0, update_every=warmup),
        train=TrainConfig(steps=warmup + steps, batch_size=data.shape[1], checkpoint_every=0,
                          progress=False, scale_tokens=data.shape[1], device="cpu"),
    )  # fmt: skip
    trainer = Trainer(cfg, data.shape[2], lambda start: iter(data), "/tmp/hsae_speed")
    trainer.init_fresh()
    for step in range(warmup):  # the first hierarchy update happens here: links exist
        trainer.train_step(data[step % len(data)])
    started = time.perf_counter()
    for step in range(steps):
        trainer.train_step(data[step % len(data)])
    return steps * data.shape[1] / (time.perf_counter() - started)


def time_sae_lens(data: torch.Tensor, sizes: tuple[int, ...], l0: float, steps: int) -> float:
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    seconds = 0.0
    for n in sizes:
        cfg = JumpReLUTrainingSAEConfig(d_in=data.shape[2], d_sae=n, target_l0=l0)
        sae = JumpReLUTrainingSAE(cfg)
        opt = torch.optim.Adam(sae.parameters(), lr=5e-4, betas=(0.0, 0.995))
        for step in range(5 + steps):
            if step == 5:
                started = time.perf_counter()
            step_input = TrainStepInput(
                sae_in=data[step % len(data)], coefficients={"l0": 1.0},
                dead_neuron_mask=None, n_training_steps=step, is_logging_step=False,
            )  # fmt: skip
            out = sae.training_forward_pass(step_input)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        seconds += time.perf_counter() - started
    return steps * data.shape[1] / seconds  # tokens through all four dictionaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--sizes", default="512,1024,2048,4096")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--target-l0", type=float, default=32)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    sizes = tuple(int(n) for n in args.sizes.split(","))
    data = torch.randn(8, args.batch_size, args.d)
    dense_flop = 12 * args.d * sum(sizes)
    peak = matmul_rate(args.d, max(sizes), args.batch_size)
    hsae = time_hsae(data, sizes, args.target_l0, args.steps)
    lens = time_sae_lens(data, sizes, args.target_l0, args.steps)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"d {args.d}, levels {list(sizes)}, batch {args.batch_size}, target L0 "
        f"{args.target_l0:g}, {torch.get_num_threads()} threads, {args.steps} timed steps"
    )
    print(f"dense matmul rate of this machine: {peak / 1e9:.1f} GFLOP/s")
    for name, rate in (("HSAE (all four levels, linked)", hsae), ("SAE Lens (four SAEs)", lens)):
        share = rate * dense_flop / peak
        print(f"{name:32s} {rate:10,.0f} tokens/s  ({share:.1%} of the dense matmul rate)")
    print(f"HSAE / SAE Lens: {hsae / lens:.2f}x; peak RSS {rss:,.0f} MiB")


if __name__ == "__main__":
    main()
