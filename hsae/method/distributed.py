"""Data-parallel training across processes (`torchrun --nproc_per_node N -m hsae train`).

PyTorch's DistributedDataParallel averages the gradients; this module holds the few other
collectives that keep every rank's state identical to a one-process run with the same
global batch: the L0 that the sparsity controller sees, which features fired, the
co-activation statistics and the initialisation sample. Outside torchrun (or with one
process) every function here is a no-op, so the single-process code path is unchanged.

Data: rank r of N trains on rows [r B/N, (r + 1) B/N) of every global batch of B rows.
A stream that can read just those rows (a :class:`PerRankStream`: an activation cache,
which then opens only the shards that part needs, or a .npy file) is asked for them;
any other stream (the planted forest, drawn rather than read) yields the whole global
batch and each rank keeps its slice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def init_from_env() -> None:
    """Join the process group that torchrun describes in the environment (NCCL on GPUs,
    gloo on CPU); nothing to do for a plain `hsae train`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str) -> torch.device:
    """'auto': this process's GPU (one per rank under torchrun) when there is one."""
    if name == "auto":
        name = f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def total(t: Tensor) -> Tensor:
    """The sum over ranks of a tensor of the same shape on every rank."""
    if not active():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def mean(t: Tensor) -> Tensor:
    """The mean over ranks of a tensor of the same shape on every rank."""
    return total(t) / world_size() if active() else t


def any_(mask: Tensor) -> Tensor:
    """Element-wise OR over ranks of a boolean tensor."""
    if not active():
        return mask
    as_int = mask.to(torch.int32)
    dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
    return as_int.bool()


def gather_rows(t: Tensor) -> Tensor:
    """Every rank's rows, concatenated in rank order (equal row counts on every rank)."""
    if not active():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


Stream = Callable[[int], Iterator[Tensor]]
"""stream(start_step) yields the raw batch of every step from start_step on."""


@dataclass(frozen=True)
class PerRankStream:
    """A stream of global batches of ``batch_size`` rows that can also read one rank's
    part alone: ``part(start_step, rank, world)`` yields rows ``[rank b, (rank + 1) b)``
    of every batch (``b = batch_size / world``), reading only what they need."""

    batch_size: int
    part: Callable[[int, int, int], Iterator[Tensor]]

    def __call__(self, start_step: int) -> Iterator[Tensor]:
        return self.part(start_step, 0, 1)


def check_divisible(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} is not divisible by {world} processes")


def local_slice(stream: Stream) -> Stream:
    """This rank's share of each global batch: rows [r*b, (r+1)*b) of batch k.

    Together the ranks see exactly the global batch of a one-process run. A
    :class:`PerRankStream` reads only this rank's rows; any other stream is read whole."""
    if not active():
        return stream
    r, n = rank(), world_size()
    if isinstance(stream, PerRankStream):
        check_divisible(stream.batch_size, n)
        return lambda start_step: stream.part(start_step, r, n)

    def sliced(start_step: int) -> Iterator[Tensor]:
        for x in stream(start_step):
            check_divisible(x.shape[0], n)
            share = x.shape[0] // n
            yield x[r * share : (r + 1) * share]

    return sliced


def global_batches(local: Iterator[Tensor]) -> Iterator[Tensor]:
    """Reassemble the global batches from every rank's local share."""
    for x in local:
        yield gather_rows(x)
