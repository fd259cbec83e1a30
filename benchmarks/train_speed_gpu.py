"""Training speed at the paper's sizes: d = 2304 (gemma-2-2b), levels 2048-16384, batch 1024.

Prints tokens/s and the projected hours for the paper's 100M tokens (the paper: about
6 hours on one A800). Random activations already on the device, so this measures the
training step, not the data path.

    python benchmarks/train_speed_gpu.py                      # the GPU, fp32
    python benchmarks/train_speed_gpu.py --autocast           # bf16 autocast
    python benchmarks/train_speed_gpu.py --kernel dense       # the dense reference step
    python benchmarks/train_speed_gpu.py --device cpu --d 64 --sizes 64,128 --steps 5  # smoke
"""

from __future__ import annotations

import argparse
import time

import torch

from hsae.config import HSAEConfig, RunConfig, TrainConfig
from hsae.method.train import Trainer

PAPER_TOKENS = 100_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--d", type=int, default=2304)
    parser.add_argument("--sizes", default="2048,4096,8192,16384")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--target-l0", type=float, default=50)
    parser.add_argument("--steps", type=int, default=200, help="timed steps")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--autocast", action="store_true")
    parser.add_argument(
        "--kernel", default="live", choices=["live", "dense"], help="live entries or dense"
    )
    args = parser.parse_args()
    sizes = tuple(int(n) for n in args.sizes.split(","))
    total = args.warmup + args.steps
    cfg = RunConfig(
        model=HSAEConfig(sizes=sizes, target_l0=args.target_l0, update_every=max(1, total // 4)),
        train=TrainConfig(steps=total, batch_size=args.batch_size, device=args.device,
                          autocast=args.autocast, checkpoint_every=0, progress=False,
                          scale_tokens=args.batch_size, deterministic=False,
                          kernel=args.kernel),
    )  # fmt: skip
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run on a GPU machine, or pass --device cpu")
    data = torch.randn(8, args.batch_size, args.d, device=device)

    def stream(start: int):
        step = start
        while True:
            yield data[step % len(data)]
            step += 1

    trainer = Trainer(cfg, args.d, stream, "/tmp/hsae_speed")
    trainer.init_fresh()
    batches = stream(0)
    for _ in range(args.warmup):
        trainer.train_step(next(batches))
    _sync(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(next(batches))
    _sync(device)
    seconds = time.perf_counter() - started
    rate = args.steps * args.batch_size / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device {name}, d {args.d}, levels {list(sizes)}, batch {args.batch_size}, "
        f"autocast {args.autocast}, kernel {args.kernel}"
    )
    print(
        f"{rate:,.0f} tokens/s; 100M tokens would take {PAPER_TOKENS / rate / 3600:.2f} h "
        f"(paper: about 6 h on one A800)"
    )
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
        print(f"live entries beyond the fixed capacity (should be 0): {int(trainer.dropped)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
