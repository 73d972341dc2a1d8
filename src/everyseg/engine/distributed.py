"""Several processes under torchrun: the process group, which rank this is, and the few
collective steps the engine needs (rank 0 writing while the others wait, errors that end
every rank instead of hanging them, evaluation results gathered).

torchrun (and `srun torchrun` under SLURM) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT; the process group rendezvouses through them (env://). One process started
without torchrun has world size 1 and no process group: every helper here then just runs
the work in place, so single-process training is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class PeerFailed(RuntimeError):
    """Another rank failed at a point where all ranks must agree; its error is in its output."""


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the process group torchrun's environment describes (NCCL on CUDA, gloo on CPU)
    for the duration of the block, and leave it however the block ends. Without torchrun
    (WORLD_SIZE unset or 1), or inside a group someone else started, it does nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())  # "cuda" below means this rank's own GPU
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def training_device(device: torch.device) -> torch.device:
    """The device this rank trains on: each rank its own GPU (cuda:LOCAL_RANK)."""
    if world_size() > 1 and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


def on_main(work: Callable[[], T]) -> T | None:
    """Run `work` on rank 0 alone while the others wait; if it raises, every rank raises
    (rank 0 its own error, the others PeerFailed with its message). Returns work's result
    on rank 0 and None elsewhere."""
    if world_size() == 1:
        return work()
    result, error = None, None
    if is_main():
        try:
            result = work()
        except Exception as err:
            error = err
    message = [f"{type(error).__name__}: {error}" if error is not None else None]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise PeerFailed(f"rank 0 failed: {message[0]}")
    return result


def on_every_rank(work: Callable[[], T]) -> T:
    """Run `work` on every rank; if it raises on any, every rank raises (the failing ones
    their own error, the others PeerFailed), instead of some waiting forever for the rest."""
    if world_size() == 1:
        return work()
    try:
        result, failed = work(), False
    except Exception as err:
        error, failed = err, True
    flags = torch.tensor([float(failed)], device=_collective_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if failed:
        raise error
    if flags.item():
        raise PeerFailed("another rank failed during set-up; its error is in its output")
    return result


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (any picklable object of plain values and tensors)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each number averaged over the ranks (all ranks hold the same keys): the logged losses
    of the global batch. A NaN on any rank makes the mean NaN everywhere, so all ranks stop
    or skip a step together."""
    if world_size() == 1:
        return values
    keys = sorted(values)
    numbers = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    numbers = numbers.to(_collective_device())
    dist.all_reduce(numbers)
    means = dict(zip(keys, (numbers / world_size()).tolist()))
    return {key: means[key] for key in values}


def _collective_device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo only CPU ones
    nccl = dist.get_backend() == "nccl"
    return torch.device("cuda", local_rank()) if nccl else torch.device("cpu")
