"""Streaming benchmark: train from an on-disk cache several times larger than the shuffle
buffer, and show that memory follows the buffer, not the cache.

Run it from the repository root (defaults take about two minutes on two CPU cores and
about 0.8 GB of temporary disk)::

    python benchmarks/streaming.py
    python benchmarks/streaming.py --rows 4194304 --buffer-tokens 262144 --steps 1000
    python benchmarks/streaming.py --dir /data/bench_cache --keep     # reuse the cache

What it does:

1. builds a synthetic cache (random rows, ``--d`` wide, ``--dtype`` on disk) with
   :class:`hsae.data.cache_writer.CacheWriter`, in a child process so that writing does not count
   towards this process's peak RSS (skipped if ``--dir`` already holds a complete cache);
2. streams one full epoch through :meth:`CachedActivations.batches` (read, checksum,
   block shuffle, float32 conversion) and reports tokens/s and peak RSS;
3. trains a small HSAE (:class:`hsae.method.train.Trainer`) for ``--steps`` steps on that stream
   and reports training tokens/s and peak RSS again;
4. for comparison, runs the same training in a child process fed with random batches made
   in memory (``--no-control`` skips it): the difference in peak RSS is what streaming from
   the cache costs. (The trainer's own footprint includes its scale/threshold estimate on
   ``--scale-tokens`` rows.)

Peak RSS is ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. The shuffle window holds at most
``max(buffer, one shard)`` rows in the storage dtype, plus one shard while it loads.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from hsae.config import HSAEConfig, RunConfig, TrainConfig
from hsae.data.cache import CachedActivations
from hsae.data.cache_format import DTYPES, MANIFEST
from hsae.data.cache_writer import CacheWriter
from hsae.io import FormatError
from hsae.method.train import Trainer

MiB = 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MiB if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB
    except OSError:
        return float("nan")


def build_cache(directory: str, rows: int, d: int, dtype: str, shard_tokens: int, seed: int):
    """Random rows with a per-row scale and a shared offset, added in text-sized chunks."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    offset = torch.randn(d, generator=gen)
    meta = {"model": "synthetic", "layer": 0, "text_source": f"randn(seed={seed})"}
    writer = CacheWriter(directory, meta, shard_tokens=shard_tokens, dtype=dtype)
    chunk = 4096
    done = writer.n_tokens  # a resumed build continues where it stopped
    while done < rows:
        n = min(chunk, rows - done)
        scale = 0.5 + torch.rand(n, 1, generator=gen)
        writer.add(torch.randn(n, d, generator=gen) * scale + offset, texts_consumed=1)
        done += n
    writer.close()


def disk_mib(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file()) / MiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2**20, help="tokens in the cache")
    parser.add_argument("--d", type=int, default=384, help="activation width")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16")
    parser.add_argument("--shard-tokens", type=int, default=2**15)
    parser.add_argument("--buffer-tokens", type=int, default=2**17, help="shuffle buffer rows")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300, help="training steps (0: skip)")
    parser.add_argument("--sizes", default="256,512", help="HSAE level sizes")
    parser.add_argument(
        "--scale-tokens", type=int, default=2**14, help="tokens for the trainer's scale/init"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", help="cache directory (default: a temporary one)")
    parser.add_argument(
        "--no-control", action="store_true", help="skip the in-memory training for comparison"
    )
    parser.add_argument("--keep", action="store_true", help="keep the cache afterwards")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="hsae_stream_bench_"))
    directory = Path(args.dir) if args.dir else work / "cache"
    try:
        run(args, directory, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.dir and not args.keep and (directory / MANIFEST).exists():
            shutil.rmtree(directory, ignore_errors=True)


def open_cache(directory: Path) -> CachedActivations | None:
    """The complete cache in ``directory``, or None if there is none yet."""
    try:
        return CachedActivations(directory)
    except FormatError:
        return None


def run(args: argparse.Namespace, directory: Path, work: Path) -> None:
    cache = open_cache(directory)
    if cache is not None:
        print(f"reusing the cache in {directory}")
    else:
        started = time.perf_counter()
        child = multiprocessing.get_context("spawn").Process(
            target=build_cache,
            args=(str(directory), args.rows, args.d, args.dtype, args.shard_tokens, args.seed),
        )
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"building the cache failed (exit code {child.exitcode})")
        print(f"built the cache in {time.perf_counter() - started:.1f} s (child process)")
        cache = CachedActivations(directory)

    itemsize = DTYPES[cache.dtype].itemsize
    cache_mib = disk_mib(directory)
    buffer_mib = args.buffer_tokens * cache.d * itemsize / MiB
    shard_rows = max(e["rows"] for e in cache.manifest["shards"])
    print(
        f"cache: {cache.n:,} tokens x d={cache.d} {cache.dtype}, {cache.n_shards} shards, "
        f"{cache_mib:.0f} MiB on disk"
    )
    print(
        f"buffer: {args.buffer_tokens:,} tokens = {buffer_mib:.0f} MiB "
        f"(cache / buffer = {cache.n / args.buffer_tokens:.1f}); "
        f"one shard = {shard_rows * cache.d * itemsize / MiB:.0f} MiB"
    )
    print(f"RSS before streaming: {current_rss_mib():.0f} MiB (peak so far {peak_rss_mib():.0f})")

    # 1. one full epoch through the shuffled stream, no training
    steps = math.ceil(cache.n / args.batch_size)
    batches = cache.batches(args.batch_size, args.seed, buffer_tokens=args.buffer_tokens)
    started = time.perf_counter()
    checksum = 0.0
    for _ in range(steps):
        checksum += float(next(batches)[:, 0].sum())
    seconds = time.perf_counter() - started
    del batches
    print(
        f"stream only: one epoch, {steps * args.batch_size:,} tokens in {seconds:.1f} s = "
        f"{steps * args.batch_size / seconds:,.0f} tokens/s; peak RSS {peak_rss_mib():.0f} MiB"
    )

    # 2. training from the stream
    if args.steps <= 0:
        return
    stream = make_stream(cache, args.batch_size, args.seed, args.buffer_tokens)
    seconds, rate = train(args, cache.d, stream, work / "run")
    tokens = args.steps * args.batch_size
    streamed_peak = peak_rss_mib()
    print(
        f"training from the cache: HSAE sizes {args.sizes}, {args.steps} steps x "
        f"{args.batch_size} = {tokens:,} tokens ({tokens / args.buffer_tokens:.1f} buffers) in "
        f"{seconds:.1f} s = {rate:,.0f} tokens/s; peak RSS {streamed_peak:.0f} MiB"
    )

    # 3. the same training from batches made in memory, for the trainer's own footprint
    if args.no_control:
        return
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=control, args=(args, cache.d, str(work / "control"), queue))
    child.start()
    seconds, rate, control_peak = queue.get()
    child.join()
    print(
        f"same training, random batches in memory (child process): {rate:,.0f} tokens/s; "
        f"peak RSS {control_peak:.0f} MiB"
    )
    print(
        f"streaming a {cache_mib:.0f} MiB cache through a {buffer_mib:.0f} MiB buffer added "
        f"{streamed_peak - control_peak:+.0f} MiB of peak RSS to training"
    )


def make_stream(cache: CachedActivations, batch_size: int, seed: int, buffer_tokens: int):
    def stream(start_step: int):
        return cache.batches(batch_size, seed, start_step, buffer_tokens)

    return stream


def train(args: argparse.Namespace, d: int, stream, out: Path) -> tuple[float, float]:
    """Train a small HSAE for ``args.steps`` steps; (seconds, tokens/s)."""
    sizes = tuple(int(n) for n in args.sizes.split(","))
    cfg = RunConfig(
        model=HSAEConfig(sizes=sizes, target_l0=min(32.0, sizes[0] / 4), update_every=100),
        train=TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            checkpoint_every=0,
            scale_tokens=args.scale_tokens,
            progress=False,
        ),
    )
    summary = Trainer(cfg, d, stream, out).fit().summary
    return summary["seconds"], summary["tokens_per_second"]


def control(args: argparse.Namespace, d: int, out: str, queue) -> None:
    """The training of step 2 fed with random float32 batches generated per step."""
    torch.set_num_threads(args.threads)

    def stream(start_step: int):
        step = start_step
        while True:
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            yield torch.randn(args.batch_size, d, generator=gen)
            step += 1

    seconds, rate = train(args, d, stream, Path(out))
    queue.put((seconds, rate, peak_rss_mib()))


if __name__ == "__main__":
    main()
